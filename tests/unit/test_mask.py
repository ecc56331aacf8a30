import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from deepdewedge.mask import _bin, local_mean_std, sample_mask
from deepdewedge.simulate import simulate_phantom
from tests.conftest import DEVICES

SHAPE = (48, 64, 64)
SLAB = slice(12, 36)  # the phantom's 24-slice slab, centred in z


@pytest.fixture(scope="module")
def phantom():
    generator = torch.Generator().manual_seed(0)
    clean = simulate_phantom(SHAPE, slab_thickness_px=24, generator=generator)
    noisy = clean + 0.5 * torch.randn(SHAPE, generator=generator)
    matter = clean > 0.2  # macromolecules, membranes and beads on the ice density of 0.15
    outside = torch.ones(SHAPE, dtype=torch.bool)
    outside[SLAB] = False
    return noisy, matter, outside


@pytest.fixture(scope="module")
def default_mask(phantom):
    return sample_mask(phantom[0])


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.bool(), b.bool()
    return float((a & b).sum() / (a | b).sum())


def coverage(mask: torch.Tensor, region: torch.Tensor) -> float:
    return float(mask.bool()[region].float().mean())


@pytest.mark.parametrize("sigma_px", [0.7, 2.0])
def test_local_mean_std_matches_scipy(sigma_px):
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(9, 12, 14)) + np.linspace(0, 3, 14)
    mean, std = local_mean_std(torch.from_numpy(volume), sigma_px=sigma_px)
    assert mean.dtype == std.dtype == torch.float64

    def blur(v):
        return ndimage.gaussian_filter(v, sigma_px, mode="mirror", truncate=4.0)

    expected_mean = blur(volume)
    expected_std = np.sqrt(np.maximum(blur(volume**2) - expected_mean**2, 0.0))
    np.testing.assert_allclose(mean.numpy(), expected_mean, atol=1e-10)
    np.testing.assert_allclose(std.numpy(), expected_std, atol=1e-7)


def test_local_mean_std_of_constant_and_batches():
    volume = torch.full((2, 5, 6, 7), 3.5)
    mean, std = local_mean_std(volume, sigma_px=1.5)
    assert mean.shape == std.shape == volume.shape
    assert mean.dtype == torch.float32
    torch.testing.assert_close(mean, volume)
    assert float(std.abs().max()) < 1e-3
    # Each batch item is filtered on its own; axes shorter than the kernel still work.
    tiny = torch.randn(3, 1, 2, 4, generator=torch.Generator().manual_seed(0))
    batch_mean, batch_std = local_mean_std(tiny, sigma_px=3.0)
    for item, m, s in zip(tiny, batch_mean, batch_std, strict=True):
        m1, s1 = local_mean_std(item, sigma_px=3.0)
        torch.testing.assert_close(m, m1)
        torch.testing.assert_close(s, s1)


def test_mask_covers_the_slab_and_not_the_empty_ice(phantom, default_mask):
    volume, matter, outside = phantom
    assert default_mask.shape == SHAPE
    assert default_mask.dtype == torch.float32
    assert set(default_mask.unique().tolist()) == {0.0, 1.0}
    assert coverage(default_mask, matter) > 0.85
    assert coverage(default_mask, outside) < 0.2
    # Without auto_z the empty ice is not excluded: the test above measures auto_z.
    assert coverage(sample_mask(volume, auto_z=False), outside) > 0.4


@pytest.mark.parametrize("device", DEVICES)
def test_mask_is_independent_of_polarity(phantom, default_mask, device):
    volume = phantom[0].to(device)
    negated = sample_mask(-volume)
    assert negated.device == volume.device
    assert iou(default_mask, negated.cpu()) > 0.9
    torch.testing.assert_close(
        sample_mask(volume, polarity="bright"), sample_mask(-volume, polarity="dark")
    )


def test_higher_percentages_keep_more(phantom):
    volume = phantom[0][:, :32, :32]
    masks = [sample_mask(volume, density_percentage=p, std_percentage=p) for p in (0, 30, 100)]
    assert float(masks[0].max()) == 0.0
    assert 0.0 < float(masks[1].mean()) < 1.0
    assert float(masks[2][SLAB].min()) == 1.0
    for smaller, larger in zip(masks, masks[1:], strict=False):
        assert bool((larger >= smaller).all())
    density_only = sample_mask(volume, density_percentage=30.0, std_percentage=0.0)
    std_only = sample_mask(volume, density_percentage=0.0, std_percentage=30.0)
    assert bool((masks[1] >= torch.maximum(density_only, std_only)).all())
    assert not torch.equal(density_only, std_only)
    more_density = sample_mask(volume, density_percentage=60.0, std_percentage=0.0)
    assert bool((more_density >= density_only).all())
    assert more_density.sum() > density_only.sum()


@pytest.mark.parametrize("z_crop", [0.1, 0.3])
@pytest.mark.parametrize("bin_factor", [1, 3])
def test_z_crop_zeroes_the_requested_slices(z_crop, bin_factor):
    d = 20
    volume = torch.randn((d, 16, 16), generator=torch.Generator().manual_seed(0))
    mask = sample_mask(
        volume, z_crop=z_crop, auto_z=False, std_percentage=100.0, bin_factor=bin_factor
    )
    n = round(z_crop * d)
    assert float(mask[:n].max()) == 0.0
    assert float(mask[d - n :].max()) == 0.0
    assert float(mask[n : d - n].min()) == 1.0


def test_binning_averages_partial_blocks_over_the_voxels_they_hold():
    volume = torch.randn((7, 8, 10), dtype=torch.float64)
    binned = _bin(volume, 3, torch.float64)
    assert binned.shape == (3, 3, 4)
    torch.testing.assert_close(binned[1, 1, 1], volume[3:6, 3:6, 3:6].mean())
    torch.testing.assert_close(binned[2, 2, 3], volume[6:, 6:, 9:].mean())


@pytest.mark.parametrize("bin_factor", [2, 3])
def test_bin_factor_gives_a_full_size_mask_with_similar_coverage(phantom, default_mask, bin_factor):
    volume, matter, outside = phantom
    # 3 does not divide 64: the partial blocks at the edges must be handled.
    mask = sample_mask(volume, bin_factor=bin_factor)
    assert mask.shape == SHAPE
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert coverage(mask, matter) > 0.8
    assert coverage(mask, outside) < 0.3
    assert iou(mask, default_mask) > 0.65


def test_auto_z_keeps_every_slice_of_uniform_structure():
    # Texture throughout z: no slice is empty, so none is cut.
    volume = torch.randn((24, 48, 48), generator=torch.Generator().manual_seed(0))
    assert bool(sample_mask(volume).any(dim=(1, 2)).all())


def test_sample_mask_accepts_other_dtypes(phantom, default_mask):
    volume = phantom[0]
    assert iou(sample_mask(volume.double()), default_mask) > 0.99
    integers = sample_mask((volume * 100).round().to(torch.int16))
    assert integers.dtype == torch.float32
    assert iou(integers, default_mask) > 0.95


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"density_percentage": -1.0}, "density_percentage"),
        ({"std_percentage": 101.0}, "std_percentage"),
        ({"std_percentage": math.nan}, "std_percentage"),
        ({"sigma_px": 0.0}, "sigma_px"),
        ({"sigma_px": math.inf}, "sigma_px"),
        ({"bin_factor": 0}, "bin_factor"),
        ({"bin_factor": 2.0}, "bin_factor"),
        ({"z_crop": 0.5}, "z_crop"),
        ({"z_crop": -0.1}, "z_crop"),
        ({"auto_z": 1}, "auto_z"),
        ({"polarity": "positive"}, "polarity"),
        ({"morphology_px": -1}, "morphology_px"),
    ],
)
def test_sample_mask_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_mask(torch.zeros(8, 8, 8), **kwargs)


def test_rejects_bad_volumes():
    with pytest.raises(ValueError, match="shape"):
        sample_mask(torch.zeros(8, 8))
    with pytest.raises(ValueError, match="shape"):
        sample_mask(torch.zeros(2, 8, 8, 8))
    with pytest.raises(ValueError, match="empty"):
        sample_mask(torch.zeros(0, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        sample_mask(torch.full((4, 4, 4), math.nan))
    with pytest.raises(ValueError, match="torch.Tensor"):
        sample_mask(np.zeros((4, 4, 4)))
    with pytest.raises(ValueError, match="real"):
        local_mean_std(torch.zeros(4, 4, 4, dtype=torch.complex64), sigma_px=1.0)
    with pytest.raises(ValueError, match="shape"):
        local_mean_std(torch.zeros(4, 4), sigma_px=1.0)
    with pytest.raises(ValueError, match="sigma_px"):
        local_mean_std(torch.zeros(4, 4, 4), sigma_px=-1.0)
