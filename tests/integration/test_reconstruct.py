"""`ddw reconstruct` from an aligned tilt series, and `ddw run` starting from one."""

import json

import mrcfile
import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from deepdewedge import pipeline
from deepdewedge.cli import app
from deepdewedge.config import step_config
from deepdewedge.evaluate.metrics import correlation_coefficient
from deepdewedge.reconstruct.ctf import ctf_2d
from deepdewedge.simulate import add_noise, project, simulate_phantom

runner = CliRunner()
ANGLES = np.arange(-60.0, 60.1, 3.0)


def _write(path, data, voxel_size):
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.asarray(data, dtype=np.float32))
        mrc.voxel_size = voxel_size
    return path


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    root = tmp_path_factory.mktemp("ts")
    gt = simulate_phantom((24, 48, 48), generator=torch.Generator().manual_seed(3))
    ts = project(gt, torch.from_numpy(ANGLES))
    (root / "ts.tlt").write_text("\n".join(f"{a:.2f}" for a in ANGLES) + "\n")
    return root, gt.numpy(), ts


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_reconstruct_writes_three_tomograms_with_voxel_size(tmp_path, series):
    root, gt, ts = series
    noisy = add_noise(ts, snr=2.0, generator=torch.Generator().manual_seed(0))
    stack = _write(tmp_path / "ts.mrc", noisy, 2.5)
    result = _invoke(
        "reconstruct",
        "--tilt-series",
        stack,
        "--tilt-angles",
        root / "ts.tlt",
        "--thickness",
        24,
        "--output-dir",
        tmp_path / "out",
        "--filter",
        "hamming",
    )
    assert result.exit_code == 0, result.output
    vols = {}
    for name in ("full", "tomo0", "tomo1"):
        with mrcfile.open(tmp_path / "out" / f"ts_{name}.mrc") as mrc:
            assert mrc.data.shape == (24, 48, 48)
            assert mrc.voxel_size.x == pytest.approx(2.5)
            vols[name] = mrc.data.copy()
    cc = {k: correlation_coefficient(v, gt) for k, v in vols.items()}
    assert cc["full"] > 0.5 and cc["full"] > cc["tomo0"] > 0.3 and cc["tomo1"] > 0.3
    # Independent noise in the halves.
    assert correlation_coefficient(vols["tomo0"] - vols["full"], vols["tomo1"] - vols["full"]) < 0
    record = json.loads((tmp_path / "out" / "ts_reconstruct.json").read_text())
    assert record["split"] == "even-odd" and record["n_tilts_used"] == len(ANGLES)
    assert (
        _invoke(
            "reconstruct",
            "--tilt-series",
            stack,
            "--tilt-angles",
            root / "ts.tlt",
            "--thickness",
            24,
            "--output-dir",
            tmp_path / "out",
        ).exit_code
        == 1
    )


def test_binning_excluded_views_and_voxel_size(tmp_path, series):
    root, gt, ts = series
    stack = _write(tmp_path / "ts.mrc", ts, 2.5)
    result = _invoke(
        "reconstruct",
        "--tilt-series",
        stack,
        "--tilt-angles",
        root / "ts.tlt",
        "--thickness",
        24,
        "--bin",
        2,
        "--exclude-views",
        1,
        "--exclude-views",
        41,
        "--output-dir",
        tmp_path / "out",
    )
    assert result.exit_code == 0, result.output
    with mrcfile.open(tmp_path / "out" / "ts_full.mrc") as mrc:
        assert mrc.data.shape == (12, 24, 24) and mrc.voxel_size.x == pytest.approx(5.0)
        binned_gt = gt.reshape(12, 2, 24, 2, 24, 2).mean(axis=(1, 3, 5))
        assert correlation_coefficient(mrc.data, binned_gt) > 0.6
    record = json.loads((tmp_path / "out" / "ts_reconstruct.json").read_text())
    assert record["n_tilts_used"] == len(ANGLES) - 2


def test_phase_flipping_restores_contrast(tmp_path, series):
    root, gt, ts = series
    defocus = np.full(len(ANGLES), 5.0)
    ctf = ctf_2d((48, 48), pixel_size_angstrom=4.0, defocus_um=5.0, rfft=True)
    modulated = torch.fft.irfft2(torch.fft.rfft2(ts) * ctf, s=(48, 48))
    stack = _write(tmp_path / "ts.mrc", modulated, 4.0)
    (tmp_path / "df.txt").write_text("\n".join("5.0" for _ in defocus) + "\n")
    common = [
        "reconstruct",
        "--tilt-series",
        stack,
        "--tilt-angles",
        root / "ts.tlt",
        "--thickness",
        24,
    ]
    assert _invoke(*common, "--output-dir", tmp_path / "raw").exit_code == 0
    result = _invoke(
        *common, "--defocus-file", tmp_path / "df.txt", "--output-dir", tmp_path / "flipped"
    )
    assert result.exit_code == 0, result.output
    with (
        mrcfile.open(tmp_path / "raw/ts_full.mrc") as raw,
        mrcfile.open(tmp_path / "flipped/ts_full.mrc") as flipped,
    ):
        # Phase flipping keeps the raw polarity (dense matter dark at low frequency), so the
        # flipped tomogram correlates with the negated ground truth.
        cc_raw = abs(correlation_coefficient(raw.data, gt))
        cc_flipped = correlation_coefficient(flipped.data, -gt)
    # Measured: 0.33 without correction, 0.68 phase-flipped.
    assert cc_flipped > cc_raw + 0.2 and cc_flipped > 0.5


def test_wrong_angle_count_is_one_line(tmp_path, series):
    root, _, ts = series
    stack = _write(tmp_path / "ts.mrc", ts[:-1], 2.5)
    result = _invoke(
        "reconstruct",
        "--tilt-series",
        stack,
        "--tilt-angles",
        root / "ts.tlt",
        "--thickness",
        24,
        "--output-dir",
        tmp_path / "out",
    )
    assert result.exit_code == 1
    assert "ts.tlt" in result.output and "41 tilt angles" in result.output


def test_run_from_tilt_series(tmp_path, series):
    root, gt, ts = series
    noisy = add_noise(ts, snr=1.0, generator=torch.Generator().manual_seed(1))
    stack = _write(tmp_path / "ts.mrc", noisy, 2.5)
    config = {
        "shared": {"project_dir": str(tmp_path / "proj"), "subtomo_size": 16, "seed": 0},
        "reconstruct": {
            "tilt_series": str(stack),
            "tilt_angles": str(root / "ts.tlt"),
            "thickness": 24,
        },
        "prepare_data": {"subtomo_extraction_strides": [8, 16, 16], "val_fraction": 0.0},
        "fit_model": {
            "unet_params_dict": {"chans": 4, "num_downsample_layers": 2},
            "num_epochs": 1,
            "batch_size": 4,
        },
        "refine_tomogram": {"subtomo_overlap": 4},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = _invoke("run", "--config", path)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "proj/tomograms/ts_full.mrc").exists()
    assert (tmp_path / "proj/refined_tomograms/ts_tomo0+ts_tomo1_refined.mrc").exists()


def test_mdoc_acquisition_order_drives_the_split(tmp_path, series):
    root, _, ts = series
    stack = _write(tmp_path / "ts.mrc", ts, 2.5)
    # Dose-symmetric acquisition: 0, +3, +6, -3, -6, +9, ... recorded by DateTime.
    positive_first = sorted(
        range(len(ANGLES)),
        key=lambda i: ((abs(round(ANGLES[i] / 3)) + 1) // 2, ANGLES[i] < 0, abs(ANGLES[i])),
    )
    lines = ["PixelSpacing = 2.5", "Voltage = 300", ""]
    for z, angle in enumerate(ANGLES):
        minute = positive_first.index(z)
        lines += [
            f"[ZValue = {z}]",
            f"TiltAngle = {angle:.2f}",
            "ExposureDose = 3.0",
            f"DateTime = 09-Jun-22  14:{minute // 60:02d}:{minute % 60:02d}",
            "",
        ]
    (tmp_path / "ts.mrc.mdoc").write_text("\n".join(lines))
    result = _invoke(
        "reconstruct",
        "--tilt-series",
        stack,
        "--mdoc",
        tmp_path / "ts.mrc.mdoc",
        "--thickness",
        24,
        "--output-dir",
        tmp_path / "out",
    )
    assert result.exit_code == 0, result.output
    views = json.loads((tmp_path / "out/ts_reconstruct.json").read_text())["views"]
    acquired = [z + 1 for z in positive_first]
    assert views["tomo0"] == sorted(acquired[0::2]) and views["tomo1"] == sorted(acquired[1::2])
    # Each half covers both sides of the tilt range.
    angles0 = ANGLES[np.array(views["tomo0"]) - 1]
    assert angles0.min() < -50 and angles0.max() > 50


def test_frame_and_random_splits(tmp_path, series):
    root, gt, ts = series
    g = torch.Generator().manual_seed(5)
    even = add_noise(ts / 2, snr=1.0, generator=g)
    odd = add_noise(ts / 2, snr=1.0, generator=g)
    files = {
        n: _write(tmp_path / f"{n}.mrc", v, 2.5)
        for n, v in (("ts", even + odd), ("even", even), ("odd", odd))
    }
    result = _invoke(
        "reconstruct",
        "--tilt-series",
        files["ts"],
        "--tilt-angles",
        root / "ts.tlt",
        "--even-frames",
        files["even"],
        "--odd-frames",
        files["odd"],
        "--thickness",
        24,
        "--full-filter",
        "ramp",  # the filter of the halves, so that they add up to the full tomogram
        "--output-dir",
        tmp_path / "frames",
    )
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "frames/ts_reconstruct.json").read_text())
    assert record["split"] == "frames"
    with (
        mrcfile.open(tmp_path / "frames/ts_tomo0.mrc") as t0,
        mrcfile.open(tmp_path / "frames/ts_tomo1.mrc") as t1,
        mrcfile.open(tmp_path / "frames/ts_full.mrc") as full,
    ):
        # Frame halves use every tilt: their sum is the full reconstruction.
        np.testing.assert_allclose(
            t0.data + t1.data, full.data, atol=1e-3 * np.abs(full.data).max()
        )
    result = _invoke(
        "reconstruct",
        "--tilt-series",
        files["ts"],
        "--tilt-angles",
        root / "ts.tlt",
        "--split",
        "random",
        "--random-fraction",
        0.3,
        "--thickness",
        24,
        "--output-dir",
        tmp_path / "random",
    )
    assert result.exit_code == 0, result.output
    views = json.loads((tmp_path / "random/ts_reconstruct.json").read_text())["views"]
    assert len(views["tomo0"]) == round(0.3 * len(ANGLES))


def test_make_mask_then_prepare_with_it(tmp_path, series):
    root, gt, ts = series
    noisy = add_noise(ts, snr=2.0, generator=torch.Generator().manual_seed(2))
    stack = _write(tmp_path / "ts.mrc", noisy, 2.5)
    assert (
        _invoke(
            "reconstruct",
            "--tilt-series",
            stack,
            "--tilt-angles",
            root / "ts.tlt",
            "--thickness",
            24,
            "--output-dir",
            tmp_path / "tomos",
        ).exit_code
        == 0
    )
    result = _invoke(
        "make-mask",
        "--project-dir",
        tmp_path / "proj",
        "--tomo-files",
        tmp_path / "tomos/ts_full.mrc",
        "--bin-factor",
        1,
    )
    assert result.exit_code == 0, result.output
    mask_file = tmp_path / "proj/masks/ts_full_mask.mrc"
    with mrcfile.open(mask_file) as mrc:
        assert set(np.unique(mrc.data)) <= {0.0, 1.0} and mrc.voxel_size.x == pytest.approx(2.5)
        assert 0.05 < mrc.data.mean() < 0.95
    assert mask_file.with_suffix(".png").stat().st_size > 5_000
    result = _invoke(
        "prepare-data",
        "--project-dir",
        tmp_path / "proj",
        "--tomo0-files",
        tmp_path / "tomos/ts_tomo0.mrc",
        "--tomo1-files",
        tmp_path / "tomos/ts_tomo1.mrc",
        "--mask-files",
        mask_file,
        "--subtomo-size",
        8,
        "--val-fraction",
        0.0,
    )
    assert result.exit_code == 0, result.output


def _reconstruct_tomograms(tmp_path, series, name, **options):
    """The volumes and the record of ``reconstruct`` of a noisy stack, `options` as in YAML."""
    root, _, ts = series
    noisy = add_noise(ts, snr=1.0, generator=torch.Generator().manual_seed(2))
    stack = _write(tmp_path / "ts.mrc", noisy, 2.5)
    step = {"tilt_series": str(stack), "tilt_angles": str(root / "ts.tlt"), "thickness": 24}
    step |= {"output_dir": str(tmp_path / name), **options}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"reconstruct": step}))
    paths = pipeline.reconstruct(step_config("reconstruct", config_file=path))
    volumes = {k: mrcfile.read(paths[k]) for k in ("full", "tomo0", "tomo1")}
    return volumes, json.loads(paths["record"].read_text())


def test_full_filter_changes_only_the_full_tomogram(tmp_path, series):
    ramp, _ = _reconstruct_tomograms(tmp_path, series, "ramp", filter="ramp", full_filter="ramp")
    sirt, _ = _reconstruct_tomograms(tmp_path, series, "sirt", filter="sirt", full_filter="sirt")
    mixed, record = _reconstruct_tomograms(
        tmp_path, series, "mixed", filter="ramp", full_filter="sirt", sirt_iterations=10
    )
    assert not np.allclose(ramp["full"], sirt["full"])
    np.testing.assert_array_equal(mixed["full"], sirt["full"])
    for half in ("tomo0", "tomo1"):
        np.testing.assert_array_equal(mixed[half], ramp[half])
    assert record["filters"] == {
        "tomo0": "ramp",
        "tomo1": "ramp",
        "full": "sirt (10 iterations)",
    }


def test_full_filter_null_is_the_filter_of_the_halves(tmp_path, series):
    _, record = _reconstruct_tomograms(tmp_path, series, "null", filter="hamming", full_filter=None)
    assert record["filters"] == {"tomo0": "hamming", "tomo1": "hamming", "full": "hamming"}


def test_default_filters_ramp_halves_sirt_full_tomogram(tmp_path, series):
    _, record = _reconstruct_tomograms(tmp_path, series, "defaults")
    assert record["filters"] == {"tomo0": "ramp", "tomo1": "ramp", "full": "sirt (10 iterations)"}


def test_full_filter_on_the_command_line(tmp_path, series):
    root, _, ts = series
    stack = _write(tmp_path / "ts.mrc", ts, 2.5)
    args = ["reconstruct", "--tilt-series", stack, "--tilt-angles", root / "ts.tlt"]
    args += ["--thickness", 24, "--output-dir", tmp_path / "out", "--filter", "ramp"]
    result = _invoke(*args, "--full-filter", "shepp")
    assert result.exit_code == 1
    assert "--full-filter" in result.output and "'hamming'" in result.output
    assert not (tmp_path / "out").exists()
    result = _invoke(*args, "--full-filter", "hamming")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out" / "ts_reconstruct.json").read_text())
    assert record["filters"] == {"tomo0": "ramp", "tomo1": "ramp", "full": "hamming"}
