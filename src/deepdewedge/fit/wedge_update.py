"""Periodic missing-wedge update of the model-input bank."""

from __future__ import annotations

import torch
from torch import nn

from deepdewedge.fourier import missing_wedge_mask


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, int]:
    n = x.shape[-1]
    total = -n % multiple
    lo = total // 2
    if total:
        x = nn.functional.pad(x, (lo, total - lo) * 3, mode="reflect")
    return x, lo


@torch.no_grad()
def fill_missing_wedges(
    model: nn.Module,
    crops: torch.Tensor,
    *,
    mw_angle_deg: float | None = None,
    tilt_range_deg: tuple[float, float] | torch.Tensor | None = None,
    size_multiple: int,
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    """Replace the missing-wedge content of bank crops with the model's prediction.

    Parameters
    ----------
    model
        Maps `(b, 1, n, n, n)` to `(b, 1, n, n, n)` for n a multiple of `size_multiple`.
    crops
        `(n_crops, S, S, S)` model-input bank (tomo0 crops), any device.
    mw_angle_deg, tilt_range_deg
        The crops' missing wedge: its opening angle, or the tilt range of an asymmetric one,
        or a `(n_crops, 2)` tensor of each crop's own tilt range (exactly one of the two).
    size_multiple
        Crops are mirror-padded to a multiple of this for the network.
    batch_size
        Crops per forward pass.
    device
        Device the model runs on.

    Returns
    -------
    torch.Tensor
        `(n_crops, S, S, S)` on the device of `crops`:
        ``F⁻¹(M · F(crop) + (1 − M) · F(model(F⁻¹(M · F(crop)))))``.

    Notes
    -----
    Only the input bank is updated, as in the published implementation: the measured data
    outside the wedge is kept, while the wedge, which the network learns to fill from the
    extra masks of Eq. (2), is replaced by its current estimate. Later inputs then carry less
    missing-wedge artefact, closer to the inputs seen in refinement. Targets stay measured
    data, which the loss needs.

    The network predicts from the crop with its wedge emptied (``M · F(crop)``), as the
    published update does: fitting inputs never hold anything in the masked region, and
    predicting from an earlier fill would feed the network its own output. Each update thus
    depends only on the measured data and the current network, however many came before.

    With one tilt range per crop, M is each crop's own wedge: a crop of a tomogram with a
    wider tilt range keeps more of its measured data, and only its own wedge is filled.
    """
    was_training = model.training
    model.eval()
    big = crops.shape[-1]
    ranges = tilt_range_deg if isinstance(tilt_range_deg, torch.Tensor) else None
    if ranges is not None and tuple(ranges.shape) != (len(crops), 2):
        raise ValueError(
            f"need one tilt range per crop, (n_crops, 2), got {tuple(ranges.shape)} for "
            f"{len(crops)} crops"
        )
    if ranges is None:  # `(S, S, S')`: one wedge for all crops
        shared = missing_wedge_mask(
            (big,) * 3, mw_angle_deg=mw_angle_deg, tilt_range_deg=tilt_range_deg, device=device
        )
    out = torch.empty_like(crops)
    for i in range(0, len(crops), batch_size):
        x = crops[i : i + batch_size].to(device)
        mask = (
            shared
            if ranges is None  # else `(k, S, S, S')`: each crop's own wedge
            else missing_wedge_mask(
                (big,) * 3, tilt_range_deg=ranges[i : i + batch_size], device=device
            )
        )
        measured = mask * torch.fft.rfftn(x, dim=(-3, -2, -1))
        masked = torch.fft.irfftn(measured, s=x.shape[-3:], dim=(-3, -2, -1))
        padded, lo = _pad_to_multiple(masked[:, None], size_multiple)
        pred = model(padded)[:, 0, lo : lo + big, lo : lo + big, lo : lo + big]
        spec_pred = torch.fft.rfftn(pred.float(), dim=(-3, -2, -1))
        filled = torch.fft.irfftn(
            measured + (1 - mask) * spec_pred, s=x.shape[-3:], dim=(-3, -2, -1)
        )
        out[i : i + batch_size] = filled.to(out.device)
    model.train(was_training)
    return out
