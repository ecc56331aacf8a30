"""Model inputs and targets for one batch, built on the training device (paper, step 2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deepdewedge.fourier import apply_fourier_mask, rotated_missing_wedge_mask
from deepdewedge.rotation import rotate_and_crop, sample_rotations


@dataclass
class Batch:
    """One batch of fitting data.

    Attributes
    ----------
    model_input
        `(b, 1, s, s, s)` rotated tomo0 sub-tomograms with the extra wedge M removed.
    target
        `(b, 1, s, s, s)` tomo1 sub-tomograms under the same rotations.
    rot_mw_mask
        `(b, s, s, s // 2 + 1)` rotated masks M_φ, or None in noise2noise-only mode.

    Notes
    -----
    M and M_φ of Eq. (2) are the missing wedge of the pair's own tomogram: the batch may mix
    pairs of tomograms with different tilt ranges, each then with its own masks.
    """

    model_input: torch.Tensor
    target: torch.Tensor
    rot_mw_mask: torch.Tensor | None


def centre_crop(volumes: torch.Tensor, size: int) -> torch.Tensor:
    """Centre crop of `(..., n, n, n)` volumes to `(..., size, size, size)`."""
    lo = (volumes.shape[-1] - size) // 2
    return volumes[..., lo : lo + size, lo : lo + size, lo : lo + size]


def make_batch(
    crops0: torch.Tensor,
    crops1: torch.Tensor,
    *,
    subtomo_size: int,
    mw_mask: torch.Tensor | None,
    mw_angle_deg: float | None = None,
    tilt_range_deg: tuple[float, float] | torch.Tensor | None = None,
    rotate: bool,
    generator: torch.Generator | None,
    interpolation: str = "cubic",
    rotmats: torch.Tensor | None = None,
) -> Batch:
    """Rotate, crop and mask a batch of paired crops, all on their device.

    Parameters
    ----------
    crops0, crops1
        `(b, S, S, S)` bank crops of tomo0 and tomo1 (``S >= √3 · subtomo_size``).
    subtomo_size
        Edge s of the model input and target.
    mw_mask
        `(s, s, s // 2 + 1)` wedge mask M added to every input, `(b, s, s, s // 2 + 1)` one
        mask per pair, or None for no extra wedge.
    mw_angle_deg, tilt_range_deg
        The target's own missing wedge (and M): its opening angle, or the tilt range of an
        asymmetric one, or a `(b, 2)` tensor of one tilt range per pair (with one `mw_mask`
        per pair, built from the same ranges); exactly one of the two when `mw_mask` is
        given.
    rotate
        Apply one uniformly random rotation per pair (the same for both halves).
    generator
        CPU generator for the rotations (reproducible across devices).
    interpolation
        ``"cubic"`` (B-spline) or ``"linear"`` rotation.
    rotmats
        `(b, 3, 3)` rotations to apply instead of drawing them from `generator`, e.g. this
        process's share of rotations drawn for a whole batch split across processes.
    """
    pairs = torch.stack([crops0, crops1], dim=1)
    if rotate:
        if rotmats is None:
            rotmats = sample_rotations(len(pairs), generator=generator, device=pairs.device)
        elif len(rotmats) != len(pairs):
            raise ValueError(f"got {len(rotmats)} rotations for {len(pairs)} pairs")
        pairs = rotate_and_crop(pairs, rotmats, subtomo_size, interpolation=interpolation)
    else:
        pairs = centre_crop(pairs, subtomo_size)
    model_input, target = pairs[:, :1], pairs[:, 1:]
    if mw_mask is None:
        return Batch(model_input.contiguous(), target.contiguous(), None)
    per_pair = mw_mask.dim() == 4
    if per_pair and len(mw_mask) != len(pairs):
        raise ValueError(f"got {len(mw_mask)} wedge masks for {len(pairs)} pairs")
    model_input = apply_fourier_mask(model_input, mw_mask[:, None] if per_pair else mw_mask)
    shape = (subtomo_size,) * 3
    if rotate:
        rot_mw_mask = rotated_missing_wedge_mask(
            shape, rotmats, mw_angle_deg=mw_angle_deg, tilt_range_deg=tilt_range_deg
        )
    elif per_pair:
        rot_mw_mask = mw_mask
    else:
        rot_mw_mask = mw_mask.expand(len(pairs), *mw_mask.shape)
    return Batch(model_input, target.contiguous(), rot_mw_mask)
