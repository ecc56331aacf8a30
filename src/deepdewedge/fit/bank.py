"""Sub-tomogram banks: sliding-window selection of paired sub-tomograms with a rotation margin."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from deepdewedge.tiling import extract_windows, grid_starts


def bank_size(subtomo_size: int) -> int:
    """Edge of the stored crops: the smallest ``S >= √3 · subtomo_size`` with ``S - s`` even.

    A cube of edge s rotated arbitrarily reaches ``√3 s / 2`` from its centre, so a crop of
    edge √3·s around it leaves no empty corner under any rotation (√2 is not enough).
    """
    margin = math.ceil((math.sqrt(3.0) - 1.0) * subtomo_size / 2.0)
    return subtomo_size + 2 * margin


@dataclass
class SubtomoSelection:
    """Where the sub-tomograms of one tomogram pair lie.

    Attributes
    ----------
    starts
        `(n, 3)` int64 zyx corner of each `subtomo_size` window in the tomogram.
    is_val
        `(n,)` bool: the window belongs to the validation set.
    """

    starts: torch.Tensor
    is_val: torch.Tensor


def select_subtomos(
    shape_zyx: tuple[int, int, int],
    *,
    subtomo_size: int,
    strides_zyx: tuple[int, int, int],
    mask: np.ndarray | None,
    min_nonzero_mask_fraction: float,
    val_fraction: float,
    generator: torch.Generator,
) -> SubtomoSelection:
    """Choose fitting and validation windows of one tomogram.

    Windows come from a sliding window grid; those with less than
    `min_nonzero_mask_fraction` of mask are dropped. A random `val_fraction` of the kept
    windows, clustered around a random anchor, becomes the validation set, and fitting windows
    that overlap a validation window are dropped so that validation regions are spatially
    disjoint from fitting regions (validation loss is then not optimistic).
    """
    window = (subtomo_size,) * 3
    starts = grid_starts(shape_zyx, window, strides_zyx)
    if mask is not None:
        frac = torch.tensor(
            [
                float(
                    np.count_nonzero(
                        mask[z : z + subtomo_size, y : y + subtomo_size, x : x + subtomo_size]
                    )
                )
                / subtomo_size**3
                for z, y, x in starts.tolist()
            ]
        )
        starts = starts[frac >= min_nonzero_mask_fraction]
    n = len(starts)
    n_val = round(val_fraction * n)
    if val_fraction > 0 and n > 1:
        n_val = max(1, min(n_val, n - 1))
    is_val = torch.zeros(n, dtype=torch.bool)
    if n_val:
        # Validation windows form one compact cluster around a random anchor, so that few
        # fitting windows overlap them; those that do are dropped (spatially disjoint sets).
        anchor = starts[torch.randint(n, (1,), generator=generator)].float()
        jitter = torch.rand(n, generator=generator) * 1e-3
        distance = (starts.float() - anchor).norm(dim=1) + jitter
        is_val[distance.argsort()[:n_val]] = True
        diff = (starts[:, None, :] - starts[None, is_val, :]).abs()
        overlaps = (diff < subtomo_size).all(dim=-1).any(dim=1)
        keep = is_val | ~overlaps
        starts, is_val = starts[keep], is_val[keep]
    return SubtomoSelection(starts=starts, is_val=is_val)


def extract_crops(tomo: np.ndarray, starts: torch.Tensor, *, subtomo_size: int) -> torch.Tensor:
    """Cut rotation-ready crops of edge `bank_size(subtomo_size)` around each window.

    Parameters
    ----------
    tomo
        `(d, h, w)` tomogram.
    starts
        `(n, 3)` window corners from :func:`select_subtomos`.
    subtomo_size
        Edge s of the fitting windows.

    Returns
    -------
    torch.Tensor
        `(n, S, S, S)` float32 crops centred on the windows. Beyond the tomogram's borders
        the crops are mirror-padded, so rotated corners hold plausible content, never zeros.
    """
    big = bank_size(subtomo_size)
    margin = (big - subtomo_size) // 2
    return extract_windows(tomo, starts - margin, (big,) * 3, reflect=True)
