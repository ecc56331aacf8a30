"""A score without ground truth: a tomogram's reprojections against tilt images left out of it.

Views held out of the reconstruction (and so of the fit) carry noise independent of
everything fitted. Reprojecting a tomogram at their angles and correlating the result with
the measured images therefore scores the tomogram's content, not its noise, and ranks
reconstructions of the same data without bias.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from deepdewedge.evaluate.metrics import correlation_coefficient, fsc
from deepdewedge.simulate.phantom import project

_SCHEME = re.compile(r"^(every|highest):(\d+)$")


def heldout_views(tilt_angles_deg: np.ndarray | torch.Tensor, scheme: str) -> list[int]:
    """Stack indices (from 0) of the views to leave out, by `scheme`.

    ``"every:N"``: every N-th view in order of tilt angle, starting at the (N // 2)-th from
    the lowest angle, so that both ends of the tilt range stay in the reconstruction;
    ``"highest:K"``: the K views of largest absolute tilt. Raises ValueError for another
    scheme or one that leaves fewer than two views in.
    """
    match = _SCHEME.match(scheme.strip())
    if match is None:
        raise ValueError(f"holdout scheme {scheme!r} is not every:N or highest:K")
    kind, count = match.group(1), int(match.group(2))
    angles = np.asarray(tilt_angles_deg, dtype=np.float64)
    order = np.argsort(angles, kind="stable")
    if kind == "every":
        if count < 2:
            raise ValueError(f"holdout scheme {scheme!r} needs N >= 2")
        chosen = order[count // 2 :: count]
    else:
        chosen = np.argsort(-np.abs(angles), kind="stable")[:count]
    if len(chosen) == 0 or len(angles) - len(chosen) < 2:
        raise ValueError(
            f"holdout scheme {scheme!r} holds out {len(chosen)} of {len(angles)} views; it "
            "must hold out at least one and leave at least two"
        )
    return sorted(int(i) for i in chosen)


@dataclass
class ReprojectionScore:
    """Agreement of reprojections with held-out views.

    Attributes
    ----------
    tilt_angles_deg
        `(n,)` angles of the held-out views.
    cc
        `(n,)` correlation coefficient of each reprojection with its measured view, over the
        columns every ray of which crosses the whole tomogram.
    frc_frequencies
        `(m,)` ring frequencies in 1/Å (or cycles per pixel with a pixel size of 1).
    frc
        `(n, m)` Fourier ring correlation per view, of the same region, tapered.
    """

    tilt_angles_deg: np.ndarray
    cc: np.ndarray
    frc_frequencies: np.ndarray
    frc: np.ndarray

    @property
    def mean_cc(self) -> float:
        """Mean CC over the held-out views."""
        return float(self.cc.mean())

    @property
    def mean_frc(self) -> float:
        """Mean FRC over views and rings up to half the Nyquist frequency, one number."""
        half = self.frc.shape[1] // 2
        return float(np.nanmean(self.frc[:, : max(half, 1)]))


def reprojection_score(
    volume: torch.Tensor | np.ndarray,
    views: torch.Tensor | np.ndarray,
    tilt_angles_deg: torch.Tensor | np.ndarray,
    *,
    pixel_size_angstrom: float = 1.0,
) -> ReprojectionScore:
    """Score `volume` `(d, h, w)` by its reprojections against measured `views` `(n, h, w_det)`.

    The projection geometry is that of :func:`deepdewedge.simulate.phantom.project` and of the
    reconstruction (tilt axis y, angles in degrees). Only detector columns whose rays cross
    the volume from top to bottom are compared: ``|x'| <= (w/2) cos θ - (d/2) |sin θ|``, for
    the FRC with a raised-cosine edge over the 8 columns inside that border. Both the CC and
    the FRC are invariant to the scale and offset of either image.
    """
    vol = torch.as_tensor(np.asarray(volume), dtype=torch.float32)
    measured = torch.as_tensor(np.asarray(views), dtype=torch.float32)
    angles = torch.as_tensor(np.asarray(tilt_angles_deg), dtype=torch.float32).reshape(-1)
    if vol.ndim != 3 or measured.ndim != 3 or len(measured) != len(angles):
        raise ValueError(
            f"need a (d, h, w) volume, (n, h, w) views and n angles; got {tuple(vol.shape)}, "
            f"{tuple(measured.shape)} and {len(angles)}"
        )
    if measured.shape[1] != vol.shape[1]:
        raise ValueError(
            f"views have {measured.shape[1]} rows along the tilt axis, the volume "
            f"{vol.shape[1]}; they must come from the same reconstruction"
        )
    reprojected = project(vol, angles, width=measured.shape[-1])
    weights = _valid_columns(vol.shape, angles, measured.shape[-1])
    cc = np.array(
        [_weighted_cc(a, b, w) for a, b, w in zip(reprojected, measured, weights, strict=True)]
    )
    taper = weights[:, None, :].expand_as(measured)
    rows = measured.shape[1]
    n_rings = min(rows, measured.shape[-1]) // 2
    curve = fsc(
        ((reprojected - _mean(reprojected, taper)) * taper)[:, None].double(),
        ((measured - _mean(measured, taper)) * taper)[:, None].double(),
        voxel_size_angstrom=pixel_size_angstrom,
        n_shells=n_rings,
    )
    return ReprojectionScore(
        tilt_angles_deg=angles.numpy().astype(np.float64),
        cc=cc,
        frc_frequencies=curve.frequencies_per_angstrom.numpy(),
        frc=curve.fsc.numpy(),
    )


def _valid_columns(shape_zyx: tuple[int, ...], angles: torch.Tensor, width: int) -> torch.Tensor:
    """`(n, width)` column weights in [0, 1].

    Above 0 where a column's ray crosses the whole volume, rising to 1 over the 8 columns
    inside that region's border.
    """
    d, _, w = shape_zyx
    x = torch.arange(width, dtype=torch.float32) - (width - 1) / 2
    theta = torch.deg2rad(angles)[:, None]
    reach = (w / 2) * torch.cos(theta) - (d / 2) * torch.sin(theta).abs()
    inside = ((reach - x.abs() + 0.5) / 8.0).clamp(0.0, 1.0)
    return 0.5 - 0.5 * torch.cos(math.pi * inside)


def _mean(images: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`(n, 1, 1)` weighted mean of each image."""
    total = weights.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    return (images * weights).sum(dim=(-2, -1), keepdim=True) / total


def _weighted_cc(a: torch.Tensor, b: torch.Tensor, column_weights: torch.Tensor) -> float:
    """CC of two `(h, w)` images over the columns of nonzero weight."""
    keep = column_weights > 0
    if int(keep.sum()) < 2:
        return math.nan
    x, y = a[:, keep], b[:, keep]
    if float(x.std()) == 0 or float(y.std()) == 0:
        return 0.0  # a constant image correlates with nothing
    return correlation_coefficient(x, y)
