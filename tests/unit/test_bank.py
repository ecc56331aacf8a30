import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepdewedge.fit.bank import bank_size, extract_crops, select_subtomos
from deepdewedge.fit.batch import centre_crop
from deepdewedge.rotation import rotate_and_crop, sample_rotations
from deepdewedge.tiling import grid_starts


@given(s=st.integers(4, 160))
def test_bank_size_has_sqrt3_margin_and_even_difference(s):
    big = bank_size(s)
    assert big >= math.sqrt(3) * s and (big - s) % 2 == 0 and big - math.sqrt(3) * s < 3


def test_rotated_crop_never_sees_beyond_the_bank():
    # A bank of ones with zero padding around it: any rotation of the centre crop reads ones.
    s = 16
    big = bank_size(s)
    ones = torch.ones(1, big, big, big)
    padded = torch.nn.functional.pad(ones, (8,) * 6)
    rot = sample_rotations(64, generator=torch.Generator().manual_seed(0))
    out = rotate_and_crop(padded.expand(64, -1, -1, -1), rot, s, interpolation="linear")
    assert out.min() > 0.999


def test_crops_are_centred_on_windows():
    tomo = np.arange(20 * 22 * 24, dtype=np.float32).reshape(20, 22, 24)
    starts = torch.tensor([[2, 3, 4], [12, 14, 16]])
    crops = extract_crops(tomo, starts, subtomo_size=8)
    assert crops.shape == (2, 14, 14, 14)
    for crop, (z, y, x) in zip(crops, starts.tolist(), strict=True):
        assert np.array_equal(centre_crop(crop, 8).numpy(), tomo[z : z + 8, y : y + 8, x : x + 8])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 1000), val_fraction=st.floats(0.05, 0.5), stride=st.integers(3, 8))
def test_validation_windows_are_disjoint_from_fitting_windows(seed, val_fraction, stride):
    sel = select_subtomos(
        (24, 30, 30),
        subtomo_size=8,
        strides_zyx=(stride,) * 3,
        mask=None,
        min_nonzero_mask_fraction=0.0,
        val_fraction=val_fraction,
        generator=torch.Generator().manual_seed(seed),
    )
    val, fit = sel.starts[sel.is_val], sel.starts[~sel.is_val]
    assert len(val) >= 1
    overlap = ((val[:, None] - fit[None]).abs() < 8).all(-1)
    assert not overlap.any()


def test_validation_split_is_seeded_and_keeps_most_windows():
    kwargs = dict(
        subtomo_size=8,
        strides_zyx=(4, 4, 4),
        mask=None,
        min_nonzero_mask_fraction=0.0,
        val_fraction=0.1,
    )
    a = select_subtomos((32, 48, 48), generator=torch.Generator().manual_seed(1), **kwargs)
    b = select_subtomos((32, 48, 48), generator=torch.Generator().manual_seed(1), **kwargs)
    assert torch.equal(a.starts, b.starts) and torch.equal(a.is_val, b.is_val)
    n_all = 7 * 11 * 11
    # Clustering the validation windows keeps most of the fitting windows.
    assert (~a.is_val).sum() > 0.7 * n_all


def test_mask_fraction_selects_windows():
    mask = np.zeros((16, 16, 16), dtype=np.float32)
    mask[:8, :8, :8] = 1
    mask[8:, 8:, 8:][:4] = 1  # half of that window
    sel = select_subtomos(
        (16, 16, 16),
        subtomo_size=8,
        strides_zyx=(8, 8, 8),
        mask=mask,
        min_nonzero_mask_fraction=0.5,
        val_fraction=0.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert sorted(map(tuple, sel.starts.tolist())) == [(0, 0, 0), (8, 8, 8)]
    sel = select_subtomos(
        (16, 16, 16),
        subtomo_size=8,
        strides_zyx=(8, 8, 8),
        mask=mask,
        min_nonzero_mask_fraction=0.6,
        val_fraction=0.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert sel.starts.tolist() == [[0, 0, 0]]


def test_window_larger_than_tomogram_is_an_error():
    with pytest.raises(ValueError, match="larger than"):
        select_subtomos(
            (6, 30, 30),
            subtomo_size=8,
            strides_zyx=(8, 8, 8),
            mask=None,
            min_nonzero_mask_fraction=0.0,
            val_fraction=0.0,
            generator=torch.Generator(),
        )


@pytest.mark.parametrize("seed", range(5))
def test_validation_costs_at_most_a_tenth_of_the_fitting_windows(seed):
    """A 192×512×512 tomogram, 96³ windows, strides 64/80/80: dropping every fitting window
    that overlapped the validation cluster lost 18-36% of them; moving them loses ≤ 10%."""
    shape, size, strides = (192, 512, 512), 96, (64, 80, 80)
    sel = select_subtomos(
        shape,
        subtomo_size=size,
        strides_zyx=strides,
        mask=None,
        min_nonzero_mask_fraction=0.0,
        val_fraction=0.1,
        generator=torch.Generator().manual_seed(seed),
    )
    n_all = len(grid_starts(shape, (size,) * 3, strides))
    n_val = int(sel.is_val.sum())
    assert n_val == round(0.1 * n_all)
    assert (~sel.is_val).sum() >= 0.9 * (n_all - n_val)
    # Nearly every voxel outside the validation windows still lies in a fitting window (the
    # cluster's concave corners leave pockets of 1-2% of the volume).
    covered = torch.zeros(shape[0] // 8, shape[1] // 8, shape[2] // 8, dtype=torch.int8)
    for split, value in ((~sel.is_val, 1), (sel.is_val, 2)):
        for z, y, x in (sel.starts[split] // 8).tolist():
            covered[z : z + size // 8, y : y + size // 8, x : x + size // 8] |= value
    assert float((covered == 0).float().mean()) < 0.03
    assert not bool((covered == 3).any())  # and no voxel is in both


def test_moved_fitting_windows_keep_the_mask_fraction():
    mask = np.zeros((16, 40, 40), dtype=np.float32)
    mask[:, 4:36, 4:36] = 1
    for seed in range(5):
        sel = select_subtomos(
            mask.shape,
            subtomo_size=8,
            strides_zyx=(4, 6, 6),
            mask=mask,
            min_nonzero_mask_fraction=0.9,
            val_fraction=0.15,
            generator=torch.Generator().manual_seed(seed),
        )
        for z, y, x in sel.starts.tolist():
            assert mask[z : z + 8, y : y + 8, x : x + 8].mean() >= 0.9
        val, fit = sel.starts[sel.is_val], sel.starts[~sel.is_val]
        assert not ((val[:, None] - fit[None]).abs() < 8).all(-1).any()
