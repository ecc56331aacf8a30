import numpy as np
import pytest
import torch

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
