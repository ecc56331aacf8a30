"""Real-data preprocessing of raw tilt images before back-projection.

Raw images come in detector counts whose level changes with the tilt (the path through the ice
grows as ``1 / cos θ``), end in a hard border, and are rotated and shifted against the tilt
axis. Back-projected as they are, the count levels and borders draw bright arcs at the sides
of the tomogram that a self-supervised denoiser learns as signal. The functions here bring
each view to zero mean and unit variance, fade its border to that mean, weight it by its
accumulated exposure and resample it onto the aligned frame, so that everything outside the
recorded field of view is the mean and leaves no trace.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "normalize_tilts",
    "taper_borders",
    "critical_exposure",
    "exposure_filter",
    "align_tilts",
    "rotate_about_x",
]

# Grant & Grigorieff (2015) fit of the critical exposure at 300 kV, N_e(k) = a k^b + c.
_CRITICAL_A, _CRITICAL_B, _CRITICAL_C = 0.245, -1.665, 2.81


def _check_stack(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 3:
        shape = tuple(getattr(images, "shape", ()))
        raise ValueError(f"images must be a tensor of shape (n, h, w), got {shape}")


def normalize_tilts(
    images: torch.Tensor, *, log: bool = False, std: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring every view to zero mean and unit standard deviation.

    Parameters
    ----------
    images : torch.Tensor
        Views, shape `(n, h, w)`.
    log : bool
        Take ``log`` of the counts first (Beer–Lambert: the log of the transmitted intensity
        is proportional to the projected density); values are clamped to at least 1e-3 of
        the view's mean.
    std : torch.Tensor, optional
        Standard deviations to divide by, shape `(n,)`, instead of each view's own: frame
        halves of a view are scaled by the whole view's, so that they still add up to it.

    Returns
    -------
    tuple of torch.Tensor
        The float32 views, shape `(n, h, w)`, and the standard deviations used, shape `(n,)`.
        A constant view becomes all zeros.
    """
    _check_stack(images)
    x = images.to(torch.float32)
    if log:
        floor = 1e-3 * x.mean(dim=(1, 2), keepdim=True).abs().clamp_min(1e-12)
        x = torch.log(torch.maximum(x, floor))
    mean = x.mean(dim=(1, 2), keepdim=True, dtype=torch.float64).to(torch.float32)
    if std is None:
        std = x.std(dim=(1, 2))
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device).clamp_min(1e-12)
    if std.shape != x.shape[:1]:
        raise ValueError(f"std must have shape ({x.shape[0]},), got {tuple(std.shape)}")
    return (x - mean) / std[:, None, None], std


def _fade(n: int, width: int, *, device) -> torch.Tensor:
    """Raised-cosine ramp, shape `(n,)`: 0 at the ends, 1 beyond ``width`` from them."""
    i = torch.arange(n, device=device, dtype=torch.float32)
    distance = torch.minimum(i, n - 1 - i) + 0.5
    t = (distance / max(width, 1)).clamp(max=1.0)
    return 0.5 - 0.5 * torch.cos(math.pi * t)


def taper_borders(images: torch.Tensor, *, width_px: int) -> torch.Tensor:
    """Fade every view to zero over ``width_px`` pixels at its four edges.

    Parameters
    ----------
    images : torch.Tensor
        Views with zero mean, shape `(n, h, w)`.
    width_px : int
        Width of the raised-cosine fade, in pixels; 0 returns the views unchanged.

    Returns
    -------
    torch.Tensor
        Views, shape `(n, h, w)`, equal to the input farther than ``width_px`` from every
        edge and going smoothly to zero (the mean) at the edges, like IMOD's
        ``newstack -taper``.
    """
    _check_stack(images)
    if width_px < 0:
        raise ValueError(f"width_px must be >= 0, got {width_px}")
    if width_px == 0:
        return images
    _, h, w = images.shape
    window = (
        _fade(h, width_px, device=images.device)[:, None]
        * _fade(w, width_px, device=images.device)[None, :]
    )
    return images * window.to(images.dtype)


def critical_exposure(
    frequency_per_angstrom: torch.Tensor, *, voltage_kv: float = 300.0
) -> torch.Tensor:
    """Critical exposure ``N_e(k)`` in e/Å², at which a frequency has lost ``1 - 1/e`` of its power.

    Parameters
    ----------
    frequency_per_angstrom : torch.Tensor
        Spatial frequency ``k`` in 1/Å, any shape; 0 gives infinity.
    voltage_kv : float
        Accelerating voltage; below 250 kV the 300 kV curve is scaled by 0.8 (more damage per
        electron at 200 kV).

    Returns
    -------
    torch.Tensor
        ``a k^b + c`` with Grant & Grigorieff's ``a = 0.245``, ``b = -1.665``, ``c = 2.81``.

    References
    ----------
    T. Grant and N. Grigorieff, "Measuring the optimal exposure for single particle cryo-EM
    using a 2.6 Å reconstruction of rotavirus VP6", *eLife* 4, e06980 (2015).
    """
    k = frequency_per_angstrom.clamp_min(1e-12)
    exposure = _CRITICAL_A * k**_CRITICAL_B + _CRITICAL_C
    return exposure * (0.8 if voltage_kv < 250 else 1.0)


def exposure_filter(
    images: torch.Tensor,
    pre_exposure_e_per_a2: torch.Tensor,
    *,
    pixel_size_angstrom: float,
    voltage_kv: float = 300.0,
) -> torch.Tensor:
    """Attenuate each view's frequencies by the radiation damage of its accumulated exposure.

    Parameters
    ----------
    images : torch.Tensor
        Views, shape `(n, h, w)`.
    pre_exposure_e_per_a2 : torch.Tensor
        Dose each view had received before it was recorded, e/Å², shape `(n,)`.
    pixel_size_angstrom : float
        Pixel size of the views.
    voltage_kv : float
        Accelerating voltage, for :func:`critical_exposure`.

    Returns
    -------
    torch.Tensor
        Filtered views, shape `(n, h, w)`: each frequency ``k`` of view ``i`` multiplied by
        ``exp(-N_i / (2 N_e(k)))``, the amplitude that survives an exposure ``N_i``.

    Notes
    -----
    Views recorded late in the series carry little high-resolution signal; their noise at
    those frequencies only dilutes the early views. The filter keeps the mean (``N_e(0) = ∞``).
    """
    _check_stack(images)
    dose = torch.as_tensor(pre_exposure_e_per_a2, dtype=torch.float32, device=images.device)
    if dose.shape != images.shape[:1]:
        raise ValueError(
            f"pre_exposure_e_per_a2 must have shape ({images.shape[0]},), got {tuple(dose.shape)}"
        )
    if pixel_size_angstrom <= 0:
        raise ValueError(f"pixel_size_angstrom must be positive, got {pixel_size_angstrom}")
    _, h, w = images.shape
    ky = torch.fft.fftfreq(h, d=pixel_size_angstrom, device=images.device)
    kx = torch.fft.rfftfreq(w, d=pixel_size_angstrom, device=images.device)
    k = torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)
    exposure = critical_exposure(k, voltage_kv=voltage_kv)
    weight = torch.exp(-dose.clamp_min(0)[:, None, None] / (2.0 * exposure[None]))
    spectrum = torch.fft.rfft2(images.to(torch.float32))
    return torch.fft.irfft2(spectrum * weight, s=(h, w)).to(images.dtype)


def align_tilts(images: torch.Tensor, raw_position: torch.Tensor) -> torch.Tensor:
    """Resample raw views onto the aligned frame (tilt axis along y through the centre).

    Parameters
    ----------
    images : torch.Tensor
        Raw views, shape `(n, h, w)`, with zero mean (outside the raw image counts as 0).
    raw_position : torch.Tensor
        Affine maps from aligned to raw image coordinates, shape `(n, 2, 3)`, in pixels
        relative to the image centre ``((w - 1) / 2, (h - 1) / 2)``, as
        :meth:`deepdewedge.io.geometry.TiltSeriesGeometry.raw_position_matrix` gives them.

    Returns
    -------
    torch.Tensor
        Aligned views, shape `(n, h, w)`, sampled with bicubic interpolation; float32.
    """
    _check_stack(images)
    n, h, w = images.shape
    maps = torch.as_tensor(raw_position, dtype=torch.float64)
    if maps.shape != (n, 2, 3):
        raise ValueError(f"raw_position must have shape ({n}, 2, 3), got {tuple(maps.shape)}")
    # grid_sample's normalised coordinates (align_corners=True): g = 2 p / (size - 1) for a
    # position p relative to the centre, so theta = D_out^-1 M D_in with D = diag(2/(size-1)).
    to_norm = torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)], dtype=torch.float64)
    theta = torch.empty((n, 2, 3), dtype=torch.float64)
    theta[:, :, :2] = maps[:, :, :2] * to_norm[:, None] / to_norm[None, :]
    theta[:, :, 2] = maps[:, :, 2] * to_norm
    grid = F.affine_grid(
        theta.to(device=images.device, dtype=torch.float32), [n, 1, h, w], align_corners=True
    )
    aligned = F.grid_sample(
        images.to(torch.float32)[:, None],
        grid,
        mode="bicubic",
        padding_mode="zeros",
        align_corners=True,
    )
    return aligned[:, 0]


def rotate_about_x(volume: torch.Tensor, angle_deg: float) -> torch.Tensor:
    """Undo a specimen tilt ``α`` about the x axis: return ``V`` from ``V'(q) = V(R_x(α)^T q)``.

    Parameters
    ----------
    volume : torch.Tensor
        Reconstruction of the tilted specimen, shape `(d, h, w)` (z, y, x), voxels cubic.
    angle_deg : float
        ``α`` in degrees, the x-axis tilt of :class:`deepdewedge.io.geometry.TiltSeriesGeometry`.

    Returns
    -------
    torch.Tensor
        ``V(p) = V'(R_x(α) p)`` sampled with trilinear interpolation, shape `(d, h, w)`;
        outside the input counts as 0.
    """
    if volume.ndim != 3:
        raise ValueError(f"volume must have shape (d, h, w), got {tuple(volume.shape)}")
    d, h, w = volume.shape
    a = math.radians(angle_deg)
    # Centred voxel coordinates of every output voxel, rotated into the input.
    z = torch.arange(d, device=volume.device, dtype=torch.float32) - (d - 1) / 2
    y = torch.arange(h, device=volume.device, dtype=torch.float32) - (h - 1) / 2
    zz, yy = torch.meshgrid(z, y, indexing="ij")
    y_in = math.cos(a) * yy - math.sin(a) * zz
    z_in = math.sin(a) * yy + math.cos(a) * zz
    grid_zy = torch.stack(
        [y_in / max((h - 1) / 2, 0.5), z_in / max((d - 1) / 2, 0.5)], dim=-1
    )  # (d, h, 2) as (y, z) normalised
    out = torch.empty_like(volume, dtype=torch.float32)
    # The map does not involve x: sample each x column block as a 2D (z, y) image.
    block = max(1, 2**24 // max(1, d * h))
    for x0 in range(0, w, block):
        x1 = min(w, x0 + block)
        planes = volume[:, :, x0:x1].permute(2, 0, 1)[:, None].to(torch.float32)
        grid = grid_zy.expand(x1 - x0, d, h, 2)
        sampled = F.grid_sample(planes, grid, mode="bilinear", align_corners=True)
        out[:, :, x0:x1] = sampled[:, 0].permute(1, 2, 0)
    return out.to(volume.dtype)
