import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepdewedge.fourier import (
    apply_fourier_mask,
    frequency_grid,
    missing_wedge_mask,
    rotated_missing_wedge_mask,
    tilt_range_from_mw_angle,
    wedge_test,
)
from deepdewedge.rotation import sample_rotations


def _full_index_negation(mask):
    """mask(-k) on an unshifted full grid."""
    return torch.roll(torch.flip(mask, dims=(0, 1, 2)), shifts=(1, 1, 1), dims=(0, 1, 2))


@pytest.mark.parametrize("shape", [(17, 15, 19), (16, 16, 16), (20, 12, 18)])
@pytest.mark.parametrize("mw", [0.0, 30.0, 60.0, 90.0])
def test_mask_is_point_symmetric(shape, mw):
    mask = missing_wedge_mask(shape, mw_angle_deg=mw, rfft=False)
    assert torch.equal(mask, _full_index_negation(mask))


def test_asymmetric_mask_is_point_symmetric_on_odd_grid():
    mask = missing_wedge_mask((21, 9, 23), tilt_range_deg=(-50, 65), rfft=False)
    assert torch.equal(mask, _full_index_negation(mask))


@pytest.mark.parametrize("mw", [20.0, 60.0, 100.0])
def test_kept_fraction_matches_angle(mw):
    # On a thin spherical shell the measured fraction of the (kz, kx) directions is
    # (180 - mw) / 180 for every ky, hence also over the shell's (kz, kx) angle.
    k = frequency_grid((64, 1, 64), rfft=False)
    radius = k[..., [0, 2]].norm(dim=-1)
    shell = (radius > 0.3) & (radius < 0.45)
    kept = missing_wedge_mask((64, 1, 64), mw_angle_deg=mw, rfft=False)[shell].mean()
    assert kept.item() == pytest.approx((180 - mw) / 180, abs=0.01)


def test_wedge_orientation_kz_axis_missing_kx_axis_kept():
    mask = missing_wedge_mask((32, 32, 32), mw_angle_deg=60, rfft=False)
    assert mask[5, 0, 0] == 0 and mask[5, 7, 0] == 0  # on the kz axis, any ky
    assert mask[0, 0, 5] == 1 and mask[0, 3, 5] == 1  # on the kx axis
    assert mask[0, 0, 0] == 1  # zero frequency
    assert mask[0, 9, 0] == 1  # pure ky: ψ = 0, measured


def test_boundary_angle():
    # A frequency at angle ψ from kx: kept iff |ψ| <= 60° for mw_angle 60.
    for psi in (59.0, 61.0):
        k = torch.tensor([[math.sin(math.radians(psi)), 0.0, math.cos(math.radians(psi))]])
        kept = wedge_test(k, tilt_range_deg=tilt_range_from_mw_angle(60))
        assert kept.item() == (1.0 if psi < 60 else 0.0)


def test_asymmetric_range():
    lo, hi = -40.0, 65.0
    for psi, expected in ((-45, 0), (-35, 1), (60, 1), (70, 0)):
        k = torch.tensor([[math.sin(math.radians(psi)), 0.0, math.cos(math.radians(psi))]])
        assert wedge_test(k, tilt_range_deg=(lo, hi)).item() == expected
        assert wedge_test(-k, tilt_range_deg=(lo, hi)).item() == expected


def test_rfft_mask_is_half_of_full():
    full = missing_wedge_mask((16, 14, 18), mw_angle_deg=60, rfft=False)
    half = missing_wedge_mask((16, 14, 18), mw_angle_deg=60, rfft=True)
    assert torch.equal(half, full[..., : 18 // 2 + 1])


def test_identity_rotation_gives_plain_mask():
    rot = torch.eye(3)[None]
    assert torch.equal(
        rotated_missing_wedge_mask((12, 12, 12), rot, mw_angle_deg=60)[0],
        missing_wedge_mask((12, 12, 12), mw_angle_deg=60),
    )


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), mw=st.floats(0, 120))
def test_rotated_mask_is_wedge_test_on_rotated_coordinates(seed, mw):
    rot = sample_rotations(2, generator=torch.Generator().manual_seed(seed))
    shape = (10, 10, 10)
    masks = rotated_missing_wedge_mask(shape, rot, mw_angle_deg=mw)
    k = frequency_grid(shape)
    for b in range(2):
        expected = wedge_test(k @ rot[b], tilt_range_deg=tilt_range_from_mw_angle(mw))
        assert torch.equal(masks[b], expected)


def test_rotated_mask_matches_rotated_wedge_direction():
    # Rotating 90° about y swaps z and x: the wedge then lies around the kx axis.
    rot = torch.tensor([[[0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]])
    mask = rotated_missing_wedge_mask((16, 16, 16), rot, mw_angle_deg=60, rfft=False)[0]
    assert mask[0, 0, 5] == 0 and mask[5, 0, 0] == 1


def test_apply_fourier_mask_removes_power_and_is_projection():
    x = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    mask = missing_wedge_mask((16, 16, 16), mw_angle_deg=60)
    once = apply_fourier_mask(x, mask)
    twice = apply_fourier_mask(once, mask)
    assert torch.allclose(once, twice, atol=1e-5)
    assert once.square().sum() < x.square().sum()
    # Power kept matches the mask's share of the spectrum of white noise.
    assert (once.square().sum() / x.square().sum()).item() == pytest.approx(
        missing_wedge_mask((16, 16, 16), mw_angle_deg=60, rfft=False).mean().item(), abs=0.03
    )


def test_resolve_range_errors():
    with pytest.raises(ValueError, match="exactly one"):
        missing_wedge_mask((4, 4, 4))
    with pytest.raises(ValueError, match="mw_angle"):
        missing_wedge_mask((4, 4, 4), mw_angle_deg=190)


def test_a_batch_of_tilt_ranges_gives_each_volume_its_own_mask():
    from deepdewedge.fourier import missing_wedge_mask, rotated_missing_wedge_mask
    from deepdewedge.rotation import sample_rotations

    shape = (12, 10, 14)
    ranges = [(-60.0, 60.0), (-50.0, 65.0), (-30.5, 20.0)]
    batch = missing_wedge_mask(shape, tilt_range_deg=torch.tensor(ranges))
    single = torch.stack([missing_wedge_mask(shape, tilt_range_deg=r) for r in ranges])
    assert batch.shape == (3, 12, 10, 8) and torch.equal(batch, single)
    rotmats = sample_rotations(3, generator=torch.Generator().manual_seed(0))
    batch = rotated_missing_wedge_mask(shape, rotmats, tilt_range_deg=torch.tensor(ranges))
    single = torch.cat(
        [
            rotated_missing_wedge_mask(shape, rotmats[i : i + 1], tilt_range_deg=r)
            for i, r in enumerate(ranges)
        ]
    )
    assert torch.equal(batch, single)
    with pytest.raises(ValueError, match="-90 <= min <= max <= 90"):
        missing_wedge_mask(shape, tilt_range_deg=torch.tensor([[10.0, -10.0]]))
