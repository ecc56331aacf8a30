import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from deepdewedge.evaluate.figures import (
    gold_erasure_figure,
    loss_curve_figure,
    mask_overlay_figure,
    orthoslice_figure,
)


@pytest.fixture(scope="module")
def volumes():
    generator = torch.Generator().manual_seed(0)
    return {
        "ground truth": torch.rand((16, 24, 32), generator=generator),
        "reconstruction": np.random.default_rng(0).normal(size=(16, 24, 32)),
        "constant": torch.zeros((8, 12, 12)),
    }


def test_orthoslice_figure_has_four_panels_per_volume(volumes, tmp_path):
    fig = orthoslice_figure(volumes, clip_std=2.0)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 4 * len(volumes)
    assert [fig.axes[4 * i].get_ylabel() for i in range(len(volumes))] == list(volumes)
    path = tmp_path / "orthoslices.png"
    fig.savefig(path)
    assert path.read_bytes().startswith(b"\x89PNG")


def test_orthoslice_panels_show_the_central_slices(volumes):
    volume = volumes["ground truth"]
    fig = orthoslice_figure({"v": volume})
    xy, xz, yz, spectrum = (ax.get_images()[0].get_array() for ax in fig.axes)
    np.testing.assert_allclose(xy, volume[8].double().numpy())
    np.testing.assert_allclose(xz, volume[:, 12, :].double().numpy())
    np.testing.assert_allclose(yz, volume[:, :, 16].double().numpy())
    assert spectrum.shape == (16, 32)


def test_orthoslice_figure_rejects_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        orthoslice_figure({})
    with pytest.raises(ValueError, match="shape"):
        orthoslice_figure({"flat": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match="clip_std"):
        orthoslice_figure({"v": torch.rand(4, 4, 4)}, clip_std=0.0)


def test_loss_curve_figure(tmp_path):
    epochs = np.arange(10)
    fig = loss_curve_figure(epochs, 1.0 / (epochs + 1), torch.linspace(1.0, 0.5, 10))
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    assert len(ax.get_lines()) == 2
    fig.savefig(tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert len(loss_curve_figure(epochs, 1.0 / (epochs + 1)).axes[0].get_lines()) == 1


def test_loss_curve_figure_skips_missing_validation_losses():
    fig = loss_curve_figure([1, 2, 3, 4], [1.0, 0.8, 0.6, 0.5], [None, 0.9, None, 0.7])
    val_line = fig.axes[0].get_lines()[1]
    np.testing.assert_array_equal(val_line.get_xdata(), [2, 4])
    np.testing.assert_array_equal(val_line.get_ydata(), [0.9, 0.7])


def test_loss_curve_figure_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="epochs"):
        loss_curve_figure([0, 1, 2], [1.0, 0.5])
    with pytest.raises(ValueError, match="epochs"):
        loss_curve_figure([0, 1], [1.0, 0.5], [1.0])


def test_mask_overlay_figure_shows_the_central_slices_and_the_mask(tmp_path):
    volume = torch.rand((16, 24, 32), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(16, 24, 32)
    mask[4:12, 6:18, 8:24] = 1.0
    fig = mask_overlay_figure(volume, mask, clip_std=2.0)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 3
    assert [ax.get_title().split(",")[0] for ax in fig.axes] == [
        "xy (z = d//2)",
        "xz (y = h//2)",
        "yz (x = w//2)",
    ]
    grey = [ax.get_images()[0].get_array() for ax in fig.axes]
    np.testing.assert_allclose(grey[0], volume[8].double().numpy())
    np.testing.assert_allclose(grey[1], volume[:, 12, :].double().numpy())
    np.testing.assert_allclose(grey[2], volume[:, :, 16].double().numpy())
    overlay = fig.axes[0].get_images()[1].get_array()
    assert overlay.shape == (24, 32, 4)
    np.testing.assert_array_equal(overlay[..., 3] > 0, mask[8].numpy() > 0.5)
    path = tmp_path / "mask_overlay.png"
    fig.savefig(path)
    assert path.read_bytes().startswith(b"\x89PNG")


def test_mask_overlay_figure_handles_empty_and_full_masks(tmp_path):
    volume = np.random.default_rng(0).normal(size=(8, 12, 12))
    for mask in (np.zeros((8, 12, 12), dtype=bool), np.ones((8, 12, 12), dtype=bool)):
        fig = mask_overlay_figure(volume, mask)
        fig.savefig(tmp_path / "overlay.png")
        assert len(fig.axes) == 3


def test_mask_overlay_figure_rejects_bad_input():
    with pytest.raises(ValueError, match="must match"):
        mask_overlay_figure(torch.zeros(4, 4, 4), torch.zeros(4, 4, 5))
    with pytest.raises(ValueError, match="shape"):
        mask_overlay_figure(torch.zeros(4, 4), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="clip_std"):
        mask_overlay_figure(torch.zeros(4, 4, 4), torch.zeros(4, 4, 4), clip_std=-1.0)


def test_gold_erasure_figure_writes_a_png(tmp_path):
    generator = torch.Generator().manual_seed(0)
    before = 40.0 + 6.0 * torch.randn((96, 128), generator=generator)
    yy, xx = torch.meshgrid(torch.arange(96.0), torch.arange(128.0), indexing="ij")
    centres = torch.tensor([[30.0, 40.0], [60.0, 90.0], [2.0, 3.0]])
    for y, x in centres:
        before[(yy - y) ** 2 + (xx - x) ** 2 <= 16] = 10.0
    after = 40.0 + 6.0 * torch.randn((96, 128), generator=generator)
    fig = gold_erasure_figure(before, after, centres, diameter_px=8.0, title="view 0")
    # Two overviews, and a before/after close-up of each bead shown.
    assert len(fig.axes) == 2 + 2 * 3
    path = tmp_path / "gold.png"
    fig.savefig(path)
    assert path.read_bytes().startswith(b"\x89PNG")
    # Without beads only the two overviews are drawn.
    empty = gold_erasure_figure(before.numpy(), after.numpy(), np.zeros((0, 2)), diameter_px=8.0)
    assert len(empty.axes) == 2
    with pytest.raises(ValueError, match="must match"):
        gold_erasure_figure(before, after[:90], centres, diameter_px=8.0)
    with pytest.raises(ValueError, match="diameter_px"):
        gold_erasure_figure(before, after, centres, diameter_px=0.0)
