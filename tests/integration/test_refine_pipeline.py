"""ddw refine-tomogram on disk: memory-mapped, atomic outputs; halves; devices; previews."""

import functools
import json
import mmap
import subprocess
import sys
import textwrap
import tracemalloc

import mrcfile
import numpy as np
import pytest
import torch

from deepdewedge import refine as refine_module
from deepdewedge import refine_tomogram
from deepdewedge.config import UNetParams, step_config
from deepdewedge.io import mrc as mrc_module
from deepdewedge.io.checkpoint import save_checkpoint
from deepdewedge.io.mrc import InputError, map_volume
from deepdewedge.pipeline import common
from deepdewedge.pipeline import refining as refining_module
from deepdewedge.pipeline.fitting import build_model, load_model
from deepdewedge.refine import refine_volume

SHAPE = (20, 28, 24)


def _write(path, data, voxel_size=7.5):
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.asarray(data, dtype=np.float32))
        mrc.voxel_size = voxel_size
    return path


@pytest.fixture
def checkpoint(tmp_path):
    """A randomly initialised small U-Net, saved as ddw fit-model would."""
    unet_params = UNetParams(chans=4, num_downsample_layers=1).model_dump(
        exclude={"in_chans", "out_chans"}
    )
    torch.manual_seed(0)
    model = build_model(unet_params)
    state = {"unet_params": unet_params, "model_state": model.state_dict(), "subtomo_size": 8}
    return save_checkpoint(tmp_path / "model.ckpt", state)


def _halves(tmp_path, shape=SHAPE):
    rng = np.random.default_rng(0)
    signal = rng.standard_normal(shape).astype(np.float32)
    return (
        _write(tmp_path / "tomo0.mrc", signal + rng.standard_normal(shape)),
        _write(tmp_path / "tomo1.mrc", signal + rng.standard_normal(shape)),
    )


def _config(tmp_path, checkpoint, halves, **overrides):
    if halves is not None:
        overrides = {"tomo0_files": [halves[0]], "tomo1_files": [halves[1]], **overrides}
    return step_config(
        "refine_tomogram",
        overrides={
            "project_dir": tmp_path / "proj",
            "model_checkpoint_file": checkpoint,
            "subtomo_overlap": 2,
            "batch_size": 3,
            **overrides,
        },
    )


def _refined_half(checkpoint, path):
    model, _ = load_model(checkpoint)
    tomo = mrcfile.read(path)
    model.set_normalization(
        float(tomo.astype(np.float64).mean()), float(tomo.std(dtype=np.float64))
    )
    return refine_volume(model, tomo, subtomo_size=8, subtomo_overlap=2, batch_size=3)


def test_halves_become_average_and_half_difference(tmp_path, checkpoint):
    halves = _halves(tmp_path)
    (path,) = refine_tomogram(_config(tmp_path, checkpoint, halves))

    first, second = (_refined_half(checkpoint, f) for f in halves)
    out_dir = tmp_path / "proj/refined_tomograms"
    with mrcfile.open(path) as avg, mrcfile.open(out_dir / "tomo0+tomo1_halfdiff.mrc") as diff:
        np.testing.assert_allclose(avg.data, (first + second) / 2, rtol=0, atol=1e-6)
        np.testing.assert_allclose(diff.data, first - second, rtol=0, atol=1e-6)
        for mrc in (avg, diff):
            data = mrc.data.astype(np.float64)
            assert mrc.voxel_size.x == pytest.approx(7.5)
            assert mrc.header.dmin == data.min() and mrc.header.dmax == data.max()
            assert mrc.header.dmean == pytest.approx(data.mean(), abs=1e-6)
            assert mrc.header.rms == pytest.approx(data.std(), rel=1e-5)
    assert not list(out_dir.glob(".*"))  # no temporary files left behind
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["devices"] == ["cpu"]
    assert record["outputs"]["half_difference"].endswith("tomo0+tomo1_halfdiff.mrc")
    assert (out_dir / "tomo0+tomo1_qc.png").stat().st_size > 10_000


def test_a_full_tomogram_is_refined_into_place(tmp_path, checkpoint):
    halves = _halves(tmp_path)
    config = _config(tmp_path, checkpoint, None, tomo_files=[halves[0]])
    (path,) = refine_tomogram(config)
    assert path.name == "tomo0_refined.mrc"
    np.testing.assert_allclose(
        mrcfile.read(path), _refined_half(checkpoint, halves[0]), rtol=0, atol=1e-6
    )
    assert not (path.parent / "tomo0_halfdiff.mrc").exists()


def test_tomograms_stored_as_integers_are_read_lazily(tmp_path, checkpoint):
    data = np.random.default_rng(3).integers(-500, 500, SHAPE).astype(np.int16)
    with mrcfile.new(tmp_path / "int.mrc") as mrc:
        mrc.set_data(data)
    config = _config(tmp_path, checkpoint, None, tomo_files=[tmp_path / "int.mrc"])
    (path,) = refine_tomogram(config)
    model, _ = load_model(checkpoint)
    model.set_normalization(float(data.mean()), float(data.std()))
    expected = refine_volume(
        model, data.astype(np.float32), subtomo_size=8, subtomo_overlap=2, batch_size=3
    )
    np.testing.assert_allclose(mrcfile.read(path), expected, rtol=0, atol=1e-4)


def test_a_failed_refinement_leaves_the_old_files_and_no_temporaries(
    tmp_path, checkpoint, monkeypatch
):
    halves = _halves(tmp_path)
    out_dir = tmp_path / "proj/refined_tomograms"
    out_dir.mkdir(parents=True)
    old = _write(out_dir / "tomo0+tomo1_refined.mrc", np.ones(SHAPE))
    calls = []

    def fails_on_the_second_half(model, tomo, *, out, **kwargs):
        calls.append(out.shape)
        out[:] = 5.0
        if len(calls) == 2:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(refining_module, "refine_volume", fails_on_the_second_half)
    with pytest.raises(KeyboardInterrupt):
        refine_tomogram(_config(tmp_path, checkpoint, halves, overwrite=True))

    assert len(calls) == 2
    assert sorted(p.name for p in out_dir.iterdir()) == ["tomo0+tomo1_refined.mrc"]
    assert np.array_equal(mrcfile.read(old), np.ones(SHAPE, np.float32))


def test_stale_temporaries_of_the_outputs_are_removed(tmp_path, checkpoint):
    halves = _halves(tmp_path)
    out_dir = tmp_path / "proj/refined_tomograms"
    out_dir.mkdir(parents=True)
    stale = [out_dir / ".tomo0+tomo1_refined.mrc.k3j_x9qa.tmp"]
    stale.append(out_dir / ".tomo0+tomo1_halfdiff.mrc.0abc1234.tmp")
    others = [out_dir / ".tomo0+tomo1_refined.mrc.json.0abc1234.tmp", out_dir / ".notes.tmp"]
    for path in stale + others:
        path.write_bytes(b"x" * 100)

    refine_tomogram(_config(tmp_path, checkpoint, halves))

    assert not any(p.exists() for p in stale) and all(p.exists() for p in others)


def test_out_of_memory_for_a_single_tile_is_reported_on_one_line(tmp_path, checkpoint, monkeypatch):
    halves = _halves(tmp_path)

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("cuda:0: a single tile of 8³ voxels does not fit")

    monkeypatch.setattr(refining_module, "refine_volume", no_memory)
    with pytest.raises(InputError, match=r"tomo0\.mrc: cuda:0: a single tile"):
        refine_tomogram(_config(tmp_path, checkpoint, halves))
    assert not list((tmp_path / "proj/refined_tomograms").iterdir())


def test_refinement_holds_no_full_size_arrays(tmp_path, checkpoint, monkeypatch):
    shape = (80, 128, 128)
    halves = _halves(tmp_path, shape)
    for module in (refine_module, refining_module, mrc_module):
        monkeypatch.setattr(module, "_SLAB_VOXELS", shape[1] * shape[2])  # one plane
    monkeypatch.setattr(refining_module, "_PREVIEW_VOXELS", 1 << 14)
    monkeypatch.setattr(common, "sha256", functools.partial(common.sha256, chunk=1 << 16))
    # The figure costs the same whatever the tomogram's size: check only what it is given.
    shown = []
    monkeypatch.setattr(refining_module, "orthoslice_figure", lambda volumes: shown.append(volumes))
    monkeypatch.setattr(refining_module, "save_figure", lambda figure, path: path)
    config = _config(tmp_path, checkpoint, halves, subtomo_size=16, subtomo_overlap=4, batch_size=8)

    tracemalloc.start()
    try:
        (path,) = refine_tomogram(config)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    volume_bytes = 4 * int(np.prod(shape))
    assert peak < volume_bytes / 4, f"{peak / 1e6:.1f} MB for a {volume_bytes / 1e6:.1f} MB volume"
    assert mrcfile.read(path).shape == shape
    (volumes,) = shown
    assert [v.shape for v in volumes.values()] == [(16, 26, 26)] * 2  # binned by 5


def test_previews_are_block_means(monkeypatch):
    volume = np.random.default_rng(2).standard_normal((7, 10, 11)).astype(np.float32)
    assert np.array_equal(refining_module._preview(volume), volume)  # small: unchanged
    monkeypatch.setattr(refining_module, "_PREVIEW_VOXELS", 100)
    monkeypatch.setattr(refining_module, "_SLAB_VOXELS", 30)
    preview = refining_module._preview(volume)
    factor = 2  # ceil(cbrt(770 / 100)); the blocks at the far borders are partial
    assert preview.shape == (4, 5, 6)
    for index in np.ndindex(preview.shape):
        block = volume[tuple(slice(i * factor, (i + 1) * factor) for i in index)]
        assert preview[index] == pytest.approx(block.mean(), abs=1e-6)


@pytest.mark.parametrize("slab_voxels", [1, 3 * 28 * 24, 1 << 22])
def test_streamed_mean_and_std_of_a_memory_map(tmp_path, slab_voxels):
    volume, _ = map_volume(_halves(tmp_path)[0])
    mean, std = common.mean_std(volume, slab_voxels=slab_voxels)
    values = np.asarray(volume, dtype=np.float64)
    assert mean == pytest.approx(values.mean(), rel=1e-12, abs=1e-12)
    assert std == pytest.approx(values.std(), rel=1e-9)


@pytest.mark.parametrize(
    ("gpu", "message"),
    [([0, 0], "names a GPU more than once"), ([-1, 1], "mixes the CPU")],
)
def test_gpu_lists_must_name_distinct_gpus(gpu, message):
    with pytest.raises(InputError, match=message):
        step_config("refine_tomogram", overrides={"tomo_files": ["a.mrc"], "gpu": gpu})


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="needs fewer than two GPUs")
def test_several_gpus_must_be_visible(tmp_path, checkpoint):
    halves = _halves(tmp_path)
    with pytest.raises(InputError, match="was requested but"):
        refine_tomogram(_config(tmp_path, checkpoint, halves, gpu=[0, 1]))
    assert not (tmp_path / "proj/refined_tomograms").exists()


# Refines a pair of halves in a fresh process and prints how much its peak resident set
# (VmHWM, mapped file pages included) grew over the resident set before refining. A small pair
# is refined first, so that lazy imports and first allocations do not count; host slabs,
# checksum reads and the figure, which cost the same whatever the tomogram's size, are kept
# small or left out.
_PEAK_GROWTH = textwrap.dedent(
    """
    import functools, json, sys
    from deepdewedge import refine
    from deepdewedge.config import step_config
    from deepdewedge.io import mrc
    from deepdewedge.pipeline import common, refining

    checkpoint, warm, main = sys.argv[1:]
    for module in (refine, refining, mrc):
        module._SLAB_VOXELS = 1 << 17  # two planes of 256 x 256
    common.sha256 = functools.partial(common.sha256, chunk=1 << 16)
    refining.orthoslice_figure = lambda volumes: None
    refining.save_figure = lambda figure, path: path

    def kib(field):
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) for line in handle if line.startswith(field))

    def refine_pair(folder):
        refining.refine_tomogram(step_config("refine_tomogram", overrides={
            "project_dir": folder + "/proj", "model_checkpoint_file": checkpoint,
            "tomo0_files": [folder + "/tomo0.mrc"], "tomo1_files": [folder + "/tomo1.mrc"],
            "subtomo_size": 16, "subtomo_overlap": 4, "batch_size": 8,
        }))

    refine_pair(warm)
    before = kib("VmRSS:")
    refine_pair(main)
    print(json.dumps({"growth_kib": kib("VmHWM:") - before}))
    """
)


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and hasattr(mmap, "MADV_DONTNEED")),
    reason="needs Linux: /proc/self/status and madvise(MADV_DONTNEED)",
)
def test_peak_resident_memory_is_a_window_of_slabs(tmp_path, checkpoint):
    shape = (128, 256, 256)
    for name, size in [("warm", (8, 48, 48)), ("main", shape)]:
        (tmp_path / name).mkdir()
        _halves(tmp_path / name, size)

    child = subprocess.run(
        [sys.executable, "-c", _PEAK_GROWTH, str(checkpoint)]
        + [str(tmp_path / name) for name in ("warm", "main")],
        capture_output=True,
        text=True,
        check=True,
    )

    growth = 1024 * json.loads(child.stdout.splitlines()[-1])["growth_kib"]
    volume_bytes = 4 * int(np.prod(shape))
    # Inputs and outputs kept resident once touched would add up to several volumes.
    assert growth < volume_bytes, f"{growth / 1e6:.1f} MB for {volume_bytes / 1e6:.1f} MB halves"
    refined = tmp_path / "main/proj/refined_tomograms/tomo0+tomo1_refined.mrc"
    assert mrcfile.read(refined).shape == shape
