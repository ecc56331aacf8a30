import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepdewedge.fit.bank import bank_size, extract_crops, select_subtomos
from deepdewedge.fit.batch import centre_crop
from deepdewedge.rotation import rotate_and_crop, sample_rotations


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
    assert (~a.is_val).sum() > 0.6 * n_all


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
