"""The masked Fourier-domain loss of DeepDeWedge (paper, Eq. 2)."""

from __future__ import annotations

import torch


def loss_weights(
    mw_mask: torch.Tensor, rot_mw_mask: torch.Tensor, *, inside_weight: float = 2.0
) -> torch.Tensor:
    """Per-frequency weights ``M·M_φ + w·(1 − M)·M_φ`` of the squared Fourier error.

    Parameters
    ----------
    mw_mask
        `(d, h, w')` mask M of the wedge added to every model input, or `(b, d, h, w')` one
        per sample (samples of tomograms with different tilt ranges).
    rot_mw_mask
        `(b, d, h, w')` rotated masks M_φ of each target's own missing wedge.
    inside_weight
        Weight of the squared error on frequencies that M removed but the target holds.

    Returns
    -------
    torch.Tensor
        `(b, d, h, w')` weights.

    Notes
    -----
    ``M·M_φ`` selects frequencies both the input and the target measured (the noise2noise
    part); ``(1 − M)·M_φ`` selects frequencies removed from the input by M but measured in the
    target (the noisier2noise part that teaches wedge filling). Frequencies the target never
    measured get weight 0. The factor applies to the squared error, as in the proof of
    Proposition 1 (appendix B), where the weighted term splits into two equal expectations.
    Eq. (2) is a per-sample loss: M and M_φ are the missing wedge of the sample's own
    tomogram, so in a batch that mixes tilt ranges each sample is weighted by its own wedge.
    """
    return rot_mw_mask * (mw_mask + inside_weight * (1.0 - mw_mask))


def _rfft_multiplicity(w: int, *, device: torch.device) -> torch.Tensor:
    """`(w // 2 + 1,)` how often each rfft column appears in the full spectrum."""
    mult = torch.full((w // 2 + 1,), 2.0, device=device)
    mult[0] = 1.0
    if w % 2 == 0:
        mult[-1] = 1.0
    return mult


def masked_fourier_loss(
    output: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None
) -> torch.Tensor:
    """Weighted squared Fourier error, averaged per voxel and over the batch.

    Parameters
    ----------
    output, target
        `(b, d, h, w)` or `(b, 1, d, h, w)` real volumes.
    weights
        `(b, d, h, w // 2 + 1)` weights from :func:`loss_weights`, or None for the plain
        mean squared error (the noise2noise-only loss).

    Returns
    -------
    torch.Tensor
        Scalar ``mean_b Σ_k weights_k |F(output − target)_k|² / N`` with an orthonormal F,
        so that all-ones weights give exactly the real-space MSE (Parseval).
    """
    diff = (output.float() - target.float()).reshape(output.shape[0], *output.shape[-3:])
    if weights is None:
        return diff.square().mean()
    spec = torch.fft.rfftn(diff, dim=(-3, -2, -1), norm="ortho")
    mult = _rfft_multiplicity(diff.shape[-1], device=diff.device)
    power = (spec.real.square() + spec.imag.square()) * mult
    return (weights * power).sum(dim=(-3, -2, -1)).mean() / diff[0].numel()
