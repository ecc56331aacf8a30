import threading
import tracemalloc

import numpy as np
import pytest
import torch

from deepdewedge import refine as refine_module
from deepdewedge.fourier import missing_wedge_mask
from deepdewedge.refine import refine_volume

SHAPE = (20, 37, 29)
CUDA = pytest.param(
    "cuda",
    marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ],
)


class Affine(torch.nn.Module):
    """`x -> scale * x + shift`, recording its mode and batch sizes."""

    def __init__(self, scale=1.0, shift=0.0):
        super().__init__()
        self.scale, self.shift = scale, shift
        self.modes, self.batch_sizes = [], []

    def forward(self, x):
        self.modes.append(self.training)
        self.batch_sizes.append(x.shape[0])
        return self.scale * x + self.shift


class TileMean(torch.nn.Module):
    """Replace each tile by its mean: a piecewise-constant-per-tile prediction."""

    def forward(self, x):
        return x.mean(dim=(2, 3, 4), keepdim=True).expand_as(x)


@pytest.fixture
def tomo():
    return np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)


@pytest.mark.parametrize("shape", [SHAPE, (5, 37, 29), (3, 2, 1)])
@pytest.mark.parametrize("overlap", [0, 3, 8, 12])
@pytest.mark.parametrize("batch_size", [1, 3, 1000])
def test_identity_model_reproduces_the_tomogram(shape, overlap, batch_size):
    tomo = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    refined = refine_volume(
        Affine(), tomo, subtomo_size=16, subtomo_overlap=overlap, batch_size=batch_size
    )
    assert refined.dtype == np.float32
    assert refined.shape == shape
    np.testing.assert_allclose(refined, tomo, rtol=0, atol=1e-5)


def test_identity_model_with_the_largest_overlap():
    # stride 1: every voxel sums 16**3 float32 contributions, hence the looser tolerance
    tomo = np.random.default_rng(3).standard_normal((5, 6, 7)).astype(np.float32)
    refined = refine_volume(Affine(), tomo, subtomo_size=16, subtomo_overlap=15, batch_size=64)
    np.testing.assert_allclose(refined, tomo, rtol=1e-4, atol=1e-5)


def test_identity_model_with_memmaps_in_and_out(tmp_path, tomo):
    source = np.memmap(tmp_path / "in.raw", dtype=np.float32, mode="w+", shape=SHAPE)
    source[:] = tomo
    source.flush()
    readonly = np.memmap(tmp_path / "in.raw", dtype=np.float32, mode="r", shape=SHAPE)
    out = np.memmap(tmp_path / "out.raw", dtype=np.float32, mode="w+", shape=SHAPE)
    out[:] = 123.0

    refined = refine_volume(
        Affine(), readonly, subtomo_size=12, subtomo_overlap=4, batch_size=5, out=out
    )

    assert refined is out
    out.flush()
    written = np.fromfile(tmp_path / "out.raw", dtype=np.float32).reshape(SHAPE)
    np.testing.assert_allclose(written, tomo, rtol=0, atol=1e-5)


def test_tensor_input_of_another_dtype(tomo):
    source = torch.from_numpy(tomo).to(torch.float64)
    refined = refine_volume(Affine(), source, subtomo_size=16, subtomo_overlap=6)
    np.testing.assert_allclose(refined, tomo, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("scale", "shift"), [(1.0, 1.0), (2.0, 0.0), (-0.5, 3.0)])
def test_blending_is_a_partition_of_unity(tomo, scale, shift):
    refined = refine_volume(
        Affine(scale, shift), tomo, subtomo_size=16, subtomo_overlap=8, batch_size=4
    )
    np.testing.assert_allclose(refined, scale * tomo + shift, rtol=0, atol=1e-5)


def test_overlap_removes_seams_of_a_piecewise_constant_model():
    x = np.arange(64, dtype=np.float32)
    tomo = np.broadcast_to(x, (16, 16, 64)).copy()

    def max_jump(overlap):
        refined = refine_volume(TileMean(), tomo, subtomo_size=16, subtomo_overlap=overlap)
        return np.abs(np.diff(refined, axis=2)).max()

    hard, blended = max_jump(0), max_jump(8)
    assert hard >= 10.0
    assert blended < 0.3 * hard


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"subtomo_size": 16, "subtomo_overlap": 16}, r"subtomo_overlap \(16\)"),
        ({"subtomo_size": 16, "subtomo_overlap": -1}, r"subtomo_overlap \(-1\)"),
        ({"subtomo_size": 0, "subtomo_overlap": 0}, "subtomo_size"),
        ({"subtomo_size": 16, "subtomo_overlap": 4, "batch_size": 0}, "batch_size"),
        (
            {"subtomo_size": 16, "subtomo_overlap": 4, "out": np.zeros((20, 37, 28), np.float32)},
            "out must be",
        ),
        (
            {"subtomo_size": 16, "subtomo_overlap": 4, "out": np.zeros(SHAPE, np.float64)},
            "out must be",
        ),
    ],
)
def test_bad_arguments_raise_before_any_work(tomo, kwargs, match):
    model = Affine()
    with pytest.raises(ValueError, match=match):
        refine_volume(model, tomo, **kwargs)
    assert model.batch_sizes == []


def test_refusing_to_run_in_place(tomo):
    with pytest.raises(ValueError, match="shares memory"):
        refine_volume(Affine(), tomo, subtomo_size=16, subtomo_overlap=4, out=tomo)


def test_tomogram_must_be_3d():
    with pytest.raises(ValueError, match="3D"):
        refine_volume(Affine(), np.zeros((4, 4)), subtomo_size=4, subtomo_overlap=0)


def test_model_on_another_device_is_rejected(tomo):
    model = torch.nn.Conv3d(1, 1, 1, device="meta")
    with pytest.raises(ValueError, match="model.to"):
        refine_volume(model, tomo, subtomo_size=16, subtomo_overlap=4)


def test_model_changing_the_shape_is_rejected(tomo):
    model = torch.nn.Conv3d(1, 1, 3)
    with pytest.raises(ValueError, match="preserve the shape"):
        refine_volume(model, tomo, subtomo_size=16, subtomo_overlap=4)


@pytest.mark.parametrize("training", [True, False])
def test_model_runs_in_eval_mode_and_mode_is_restored(tomo, training):
    model = Affine()
    model.train(training)
    refine_volume(model, tomo, subtomo_size=16, subtomo_overlap=4)
    assert model.modes and not any(model.modes)
    assert model.training is training


def test_training_mode_is_restored_when_the_model_fails(tomo):
    class Failing(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model = Failing()
    with pytest.raises(RuntimeError, match="boom"):
        refine_volume(model, tomo, subtomo_size=16, subtomo_overlap=4)
    assert model.training


@pytest.mark.parametrize("batch_size", [1, 3, 7, 1000])
def test_progress_reports_every_batch_with_the_total(tomo, batch_size):
    model, calls = Affine(), []
    refine_volume(
        model,
        tomo,
        subtomo_size=16,
        subtomo_overlap=4,
        batch_size=batch_size,
        progress=lambda done, total: calls.append((done, total)),
    )
    total = sum(model.batch_sizes)
    assert all(size <= batch_size for size in model.batch_sizes)
    assert [done for done, _ in calls] == np.cumsum(model.batch_sizes).tolist()
    assert {t for _, t in calls} == {total}
    assert calls[-1] == (total, total)


def test_autocast_returns_float32(tomo):
    model = torch.nn.Conv3d(1, 1, 1, bias=False)
    torch.nn.init.ones_(model.weight)
    refined = refine_volume(
        model, tomo, subtomo_size=16, subtomo_overlap=4, autocast_dtype=torch.bfloat16
    )
    assert refined.dtype == np.float32
    np.testing.assert_allclose(refined, tomo, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_identity_model_on_each_device(tomo, device):
    model = torch.nn.Conv3d(1, 1, 1, bias=False, device=device)
    torch.nn.init.ones_(model.weight)
    source = torch.from_numpy(tomo).to(device)
    refined = refine_volume(
        model, source, subtomo_size=16, subtomo_overlap=8, batch_size=3, device=device
    )
    np.testing.assert_allclose(refined, tomo, rtol=0, atol=1e-5)


class RunsOutOfMemory(torch.nn.Module):
    """A nonlinear voxel-wise map that fails like a full device above `limit` tiles.

    With ``conv=True`` a fixed random 3x3x3 convolution follows: a network whose output
    depends on neighbouring voxels, though in float32 bit for bit only for equal batches.
    """

    def __init__(self, limit=1000, error=torch.OutOfMemoryError, *, conv=False):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(1, 1, 3, padding=1) if conv else torch.nn.Identity()
        self.limit, self.error = limit, error
        self.batch_sizes = []

    def forward(self, x):
        self.batch_sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.conv(torch.tanh(1.5 * x) - 0.3 * x**2)


def _refine(model, tomo, **kwargs):
    return refine_volume(model, tomo, subtomo_size=12, subtomo_overlap=4, **kwargs)


@pytest.mark.parametrize(
    "error",
    [torch.OutOfMemoryError, lambda message: RuntimeError(f"CUDA error: {message.lower()}")],
)
def test_out_of_memory_halves_the_batch_and_gives_the_same_result(tomo, caplog, error):
    expected = _refine(RunsOutOfMemory(), tomo, batch_size=7)
    model = RunsOutOfMemory(limit=2, error=error)

    with caplog.at_level("WARNING", logger="deepdewedge.refine"):
        refined = _refine(model, tomo, batch_size=7)

    np.testing.assert_array_equal(refined, expected)
    # 7 fails, 4 fails, then every pass has at most 2 tiles: the same tiles are retried.
    assert model.batch_sizes[:3] == [7, 4, 2] and max(model.batch_sizes[2:]) <= 2
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and warnings[-1].endswith("continuing with batch size 2")
    assert "with 7 tiles per batch" in warnings[0] and "batch size 4" in warnings[0]


def test_a_tile_that_never_fits_raises_one_line(tomo):
    model = RunsOutOfMemory(limit=0)
    with pytest.raises(torch.OutOfMemoryError, match="a single tile of 12³ voxels") as err:
        _refine(model, tomo, batch_size=4)
    assert "\n" not in str(err.value) and "subtomo_size" in str(err.value)
    assert model.training


def test_other_runtime_errors_are_not_taken_for_out_of_memory(tomo):
    model = RunsOutOfMemory(limit=1, error=RuntimeError)
    model.error = lambda message: RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR")
    with pytest.raises(RuntimeError, match="CUDNN_STATUS"):
        _refine(model, tomo, batch_size=4)
    assert model.batch_sizes == [4]


@pytest.mark.parametrize(("n_devices", "batch_size"), [(2, 3), (3, 2), (2, 1000)])
def test_several_devices_give_the_single_device_result_exactly(tomo, n_devices, batch_size):
    single, expected_calls = RunsOutOfMemory(conv=True), []
    expected = _refine(
        single, tomo, batch_size=batch_size, progress=lambda *args: expected_calls.append(args)
    )
    model, calls = RunsOutOfMemory(conv=True), []

    refined = _refine(
        model,
        tomo,
        batch_size=batch_size,
        device=[torch.device("cpu")] * n_devices,
        progress=lambda *args: calls.append(args),
    )

    np.testing.assert_array_equal(refined, expected)
    assert calls == expected_calls  # batches are added in order, one progress call each
    # The model given ran batches 0, n, 2n, ...; copies of it ran the others.
    assert len(model.batch_sizes) == len(range(0, len(single.batch_sizes), n_devices))
    assert model.training


def test_several_devices_with_out_of_memory_on_each(tomo):
    expected = _refine(RunsOutOfMemory(), tomo, batch_size=5)
    refined = _refine(RunsOutOfMemory(limit=2), tomo, batch_size=5, device=["cpu", "cpu"])
    np.testing.assert_array_equal(refined, expected)


def test_a_failure_on_another_device_reaches_the_caller(tomo):
    class FailsOnCopies(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.original = True

        def __deepcopy__(self, memo):
            copy = FailsOnCopies()
            copy.original = False
            return copy

        def forward(self, x):
            if not self.original:
                raise ValueError("broken replica")
            return x

    threads = threading.active_count()
    with pytest.raises(ValueError, match="broken replica"):
        _refine(FailsOnCopies(), tomo, batch_size=2, device=["cpu", "cpu"])
    assert threading.active_count() == threads


def test_an_empty_device_list_is_rejected(tomo):
    with pytest.raises(ValueError, match="at least one device"):
        _refine(Affine(), tomo, device=[])


def test_memmaps_are_refined_in_slabs_without_full_size_arrays(tmp_path, monkeypatch):
    shape = (40, 96, 128)
    rng = np.random.default_rng(4)
    source = np.memmap(tmp_path / "in.raw", dtype=np.float32, mode="w+", shape=shape)
    source[:] = rng.standard_normal(shape, dtype=np.float32)
    out = np.memmap(tmp_path / "out.raw", dtype=np.float32, mode="w+", shape=shape)
    monkeypatch.setattr(refine_module, "_SLAB_VOXELS", 2 * 96 * 128)

    tracemalloc.start()
    try:
        refine_volume(Affine(), source, subtomo_size=16, subtomo_overlap=6, batch_size=4, out=out)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    np.testing.assert_allclose(out, source, rtol=0, atol=1e-5)
    assert peak < source.nbytes / 4  # a few slabs and tiles


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Greedy(torch.nn.Module):
    """Asks the device for a petabyte above `limit` tiles: a real out-of-memory error."""

    def __init__(self, limit):
        super().__init__()
        self.limit = limit

    def forward(self, x):
        if x.shape[0] > self.limit:
            torch.empty(1 << 50, dtype=torch.uint8, device=x.device)
        return torch.tanh(1.5 * x) - 0.3 * x**2


@pytest.mark.cuda
@needs_cuda
def test_cuda_out_of_memory_backs_off_to_the_same_result(tomo, caplog):
    expected = _refine(Greedy(limit=1000), tomo, batch_size=5, device="cuda")
    with caplog.at_level("WARNING", logger="deepdewedge.refine"):
        refined = _refine(Greedy(limit=2), tomo, batch_size=5, device="cuda")
    np.testing.assert_array_equal(refined, expected)
    assert "continuing with batch size 2" in caplog.records[-1].getMessage()
    np.testing.assert_allclose(refined, _refine(Greedy(limit=1000), tomo), rtol=0, atol=1e-5)


@pytest.mark.cuda
@needs_cuda
def test_several_cuda_workers_give_the_single_device_result(tomo):
    model = Greedy(limit=1000)
    expected = _refine(model, tomo, batch_size=3, device="cuda")
    devices = [f"cuda:{i % torch.cuda.device_count()}" for i in range(2)]
    refined = _refine(model, tomo, batch_size=3, device=devices)
    np.testing.assert_array_equal(refined, expected)


class Seen(torch.nn.Module):
    """The identity, keeping every batch of tiles it is given."""

    def __init__(self):
        super().__init__()
        self.tiles = []

    def forward(self, x):
        self.tiles.append(x.clone())
        return x


@pytest.mark.parametrize("wedge", [{"mw_angle_deg": 60.0}, {"tilt_range_deg": (-50.0, 65.0)}])
def test_tile_wedge_empties_the_wedge_of_every_tile(tomo, wedge):
    model = Seen()
    out = refine_volume(model, tomo, subtomo_size=16, subtomo_overlap=4, tile_wedge=wedge)
    mask = missing_wedge_mask((16, 16, 16), **wedge)
    tiles = torch.cat(model.tiles)[:, 0]
    spectra = torch.fft.rfftn(tiles, dim=(-3, -2, -1))
    assert float((spectra * (1 - mask)).abs().max()) < 1e-3 * float(spectra.abs().max())
    # The measured part of each tile is untouched, so the result differs from the input
    # only by what the wedges held.
    kept = torch.fft.irfftn(spectra * mask, s=(16, 16, 16), dim=(-3, -2, -1))
    torch.testing.assert_close(kept, tiles, atol=1e-4, rtol=1e-4)
    assert not np.allclose(out, np.asarray(tomo), atol=1e-3)
