"""Building blocks of the gold-bead search: input checks, LoG responses, candidate screens."""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

# The scale-normalised LoG response to a disk of radius r peaks at sigma = r / sqrt(2).
_SIGMA_PER_DIAMETER = 1.0 / (2.0 * math.sqrt(2.0))
# Scales searched for the diameter: a geometric grid with this ratio between neighbours.
_SCALE_STEP = 2.0**0.25
# Candidate checks: eigenvalue ratio of the Hessian, angular sectors of the surrounding ring
# and how many of them must be darker than the bead by ``min_contrast`` noise deviations.
_MIN_HESSIAN_RATIO = 0.4
_SECTORS = 8
_MIN_DARK_SECTORS = 6
# Ring around a candidate (in diameters) that gives the local background and noise level.
_RING_INNER, _RING_OUTER = 0.8, 1.3
# Number of the strongest beads per view that the diameter estimate uses.
_BEADS_FOR_DIAMETER = 40
# Low-tilt views that the tilt-series diameter estimate uses.
_VIEWS_FOR_DIAMETER = 5
# Erased disk: radius in diameters plus a margin in pixels (bead, Fresnel fringe, blur).
_ERASE_RADIUS, _ERASE_MARGIN_PX = 0.6, 1.5
# Fewest ring pixels that a plane is fitted to.
_MIN_RING_PX = 12
# MAD to standard deviation for Gaussian data.
_MAD_TO_STD = 1.4826
# Views filtered at once (bounds the FFT buffers).
_MAX_BUFFER_ELEMENTS = 2**24


def _check_images(images, name: str, ndim: int) -> torch.Tensor:
    shape = "(h, w)" if ndim == 2 else "(n, h, w)"
    if not isinstance(images, torch.Tensor) or images.ndim != ndim:
        got = tuple(getattr(images, "shape", ()))
        raise ValueError(f"{name} must be a tensor of shape {shape}, got shape {got}")
    if images.is_complex():
        raise ValueError(f"{name} must be real-valued")
    if min(images.shape[-2:]) < 16:
        raise ValueError(f"{name} must be at least 16 × 16 pixels, got {tuple(images.shape)}")
    return images.to(torch.float32)


def _check_positive(value, name: str) -> float:
    if (
        not isinstance(value, numbers.Real)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _check_diameter(diameter_px, shape: tuple[int, ...]) -> float:
    diameter = _check_positive(diameter_px, "diameter_px")
    if diameter > min(shape[-2:]) / 4:
        raise ValueError(
            f"diameter_px {diameter_px!r} is too large for images of shape {tuple(shape[-2:])}"
        )
    return diameter


def _check_range(diameter_range_px, shape: tuple[int, ...]) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in diameter_range_px)
    except (TypeError, ValueError):
        raise ValueError(
            f"diameter_range_px must be a pair (min, max), got {diameter_range_px!r}"
        ) from None
    if not (math.isfinite(low) and math.isfinite(high) and 2.0 <= low < high):
        raise ValueError(
            f"diameter_range_px must satisfy 2 <= min < max, got {diameter_range_px!r}"
        )
    largest = min(shape[-2:]) / 4
    if low >= largest:
        raise ValueError(
            f"diameter_range_px {diameter_range_px!r} starts above {largest:g} px, a quarter of "
            f"the image size {tuple(shape[-2:])}"
        )
    return low, min(high, largest)


def _border(border_px, diameter: float) -> int:
    if border_px is None:
        return math.ceil(diameter)
    if not isinstance(border_px, numbers.Integral) or isinstance(border_px, bool) or border_px < 0:
        raise ValueError(f"border_px must be a non-negative integer, got {border_px!r}")
    return int(border_px)


def _log_responses(images: torch.Tensor, sigmas_px: list[float]) -> torch.Tensor:
    """Scale-normalised LoG ``σ² ∇²(G_σ * I)``, shape `(s, m, h, w)` for `(m, h, w)` images.

    Dark spots give positive responses. Each image is mirrored at its edges before the FFT so
    that its opposite borders do not meet.
    """
    m, h, w = images.shape
    pad = min(math.ceil(4 * max(sigmas_px)), h - 1, w - 1)
    padded = F.pad(images[:, None], (pad, pad, pad, pad), mode="reflect")[:, 0]
    size = padded.shape[-2:]
    ky2 = (2 * math.pi * torch.fft.fftfreq(size[0], device=images.device)) ** 2
    kx2 = (2 * math.pi * torch.fft.rfftfreq(size[1], device=images.device)) ** 2
    k2 = ky2[:, None] + kx2[None, :]
    out = images.new_empty((len(sigmas_px), m, h, w))
    chunk = max(1, _MAX_BUFFER_ELEMENTS // (size[0] * size[1]))
    for i0 in range(0, m, chunk):
        spectrum = torch.view_as_real(torch.fft.rfft2(padded[i0 : i0 + chunk]))
        for s, sigma in enumerate(sigmas_px):
            # The Gaussian is separable: two 1-D exponentials instead of one per frequency.
            gauss = torch.outer(torch.exp(-0.5 * sigma**2 * ky2), torch.exp(-0.5 * sigma**2 * kx2))
            transfer = (-(sigma**2) * k2 * gauss)[..., None]
            filtered = torch.fft.irfft2(torch.view_as_complex(spectrum * transfer), s=size)
            out[s, i0 : i0 + chunk] = filtered[:, pad : pad + h, pad : pad + w]
    return out


def _robust_z(response: torch.Tensor, border: int) -> torch.Tensor:
    """Response in units of its MAD-derived deviation about the median, per image `(..., h, w)`.

    The statistics are taken on every fourth pixel in each direction inside the border (at
    most a quarter of the image size wide).
    """
    h, w = response.shape[-2:]
    border = min(border, min(h, w) // 4)
    inner = response[..., border : h - border : 4, border : w - border : 4]
    flat = inner.reshape(*inner.shape[:-2], -1)
    median = flat.median(dim=-1).values
    mad = (flat - median[..., None]).abs().median(dim=-1).values
    # A floor for flat images, whose response is rounding noise.
    floor = 1e-6 * flat.abs().amax(dim=-1) + torch.finfo(response.dtype).tiny
    scale = torch.maximum(_MAD_TO_STD * mad, floor)
    return (response - median[..., None, None]) / scale[..., None, None]


def _patches(padded: torch.Tensor, centres: torch.Tensor, radius: int, pad: int) -> torch.Tensor:
    """Square patches `(k, 2 radius + 1, 2 radius + 1)` around integer `(k, 2)` centres."""
    offsets = torch.arange(-radius, radius + 1, device=padded.device)
    rows = (centres[:, 0] + pad)[:, None, None] + offsets[None, :, None]
    cols = (centres[:, 1] + pad)[:, None, None] + offsets[None, None, :]
    return padded[rows, cols]


def _grid(radius: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    y, x = torch.meshgrid(offsets, offsets, indexing="ij")
    return y, x


def _screen(
    padded: torch.Tensor,
    pad: int,
    centres: torch.Tensor,
    diameter: float,
    min_contrast: float,
    masked: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which integer `(k, 2)` candidate centres look like beads of ``diameter``; `(k,)` bool.

    ``padded`` is the image mirrored by ``pad`` pixels on every side. The ring statistics are
    taken from ``masked`` instead when given: the same image with NaN over beads already
    found, so that a bead next to another one is judged by its true surroundings.
    """
    if len(centres) == 0:
        return torch.zeros(0, dtype=torch.bool, device=padded.device)
    sigma = diameter * _SIGMA_PER_DIAMETER
    radius = max(math.ceil(_RING_OUTER * diameter), math.ceil(3 * sigma)) + 1
    patches = _patches(padded, centres, radius, pad)
    y, x = _grid(radius, padded.device)

    # Hessian of the Gaussian-smoothed image at the centre, from derivative-of-Gaussian kernels.
    gauss = torch.exp(-(y**2 + x**2) / (2 * sigma**2))
    gauss = gauss / gauss.sum()
    kernels = torch.stack([(y**2 / sigma**2 - 1), (x**2 / sigma**2 - 1), (x * y / sigma**2)]) * (
        gauss / sigma**2
    )
    hyy, hxx, hxy = torch.einsum("kij,cij->ck", patches, kernels)
    mean = 0.5 * (hxx + hyy)
    spread = torch.sqrt(0.25 * (hxx - hyy) ** 2 + hxy**2)
    small, large = mean - spread, mean + spread
    isotropic = (small > 0) & (small >= _MIN_HESSIAN_RATIO * large)

    # Darker than the ring around it, in units of the ring's noise, in nearly all directions.
    rho = torch.sqrt(y**2 + x**2)
    core = rho <= max(1.0, 0.25 * diameter)
    ring = (rho >= _RING_INNER * diameter) & (rho <= _RING_OUTER * diameter)
    flat = patches.reshape(len(centres), -1)
    core_mean = flat[:, core.flatten()].mean(dim=1)
    if masked is not None:
        flat = _patches(masked, centres, radius, pad).reshape(len(centres), -1)
    ring_values = flat[:, ring.flatten()]
    ring_median = ring_values.nanmedian(dim=1).values
    noise = _MAD_TO_STD * (ring_values - ring_median[:, None]).abs().nanmedian(dim=1).values
    noise = noise.clamp_min(1e-6 * ring_median.abs().clamp_min(1.0))
    angle = torch.atan2(y, x)[ring]
    sector = ((angle + math.pi) / (2 * math.pi) * _SECTORS).long().clamp_max(_SECTORS - 1)
    dark = torch.zeros(len(centres), dtype=torch.long, device=padded.device)
    for s in range(_SECTORS):
        level = ring_values[:, sector == s].nanmedian(dim=1).values
        dark += ((level - core_mean) >= min_contrast * noise).long()
    return isotropic & (dark >= _MIN_DARK_SECTORS)


def _suppress(
    centres: torch.Tensor, strength: torch.Tensor, distance: float | torch.Tensor
) -> torch.Tensor:
    """Indices into `(k, 2)` centres of the strongest ones, none closer than ``distance``.

    ``distance`` is a number or, per centre, `(k,)`: how far the centre suppresses others.
    """
    order = torch.argsort(strength, descending=True)
    points = centres[order].to(torch.float32)
    reach = distance[order, None] if isinstance(distance, torch.Tensor) else distance
    close = (torch.cdist(points, points) < reach).cpu()
    keep = torch.ones(len(order), dtype=torch.bool)
    for i in range(len(order)):
        if keep[i]:
            keep[i + 1 :] &= ~close[i, i + 1 :]
    return order[keep.to(centres.device)]


def _pad(images: torch.Tensor, pad: int) -> tuple[torch.Tensor, int]:
    """`(m, h, w)` images mirrored by ``pad`` pixels (fewer for small images), and the pad."""
    pad = min(pad, images.shape[-2] - 1, images.shape[-1] - 1)
    return F.pad(images[:, None], (pad, pad, pad, pad), mode="reflect")[:, 0], pad


def _blank_disks(image: torch.Tensor, centres: torch.Tensor, radius: float) -> torch.Tensor:
    """A copy of an `(h, w)` image with NaN within ``radius`` of integer `(k, 2)` centres."""
    y, x = _grid(math.ceil(radius), image.device)
    disk = y**2 + x**2 <= radius**2
    rows = (centres[:, 0, None] + y[disk].long()).clamp(0, image.shape[0] - 1)
    cols = (centres[:, 1, None] + x[disk].long()).clamp(0, image.shape[1] - 1)
    blanked = image.clone()
    blanked[rows, cols] = torch.nan
    return blanked


def _local_maxima(values: torch.Tensor, mask: torch.Tensor, radii: tuple[int, ...]) -> torch.Tensor:
    """Indices `(k, D)` of the points of ``mask`` that are maxima of their neighbourhood.

    ``values`` and ``mask`` have the same `D`-dimensional shape; the neighbourhood reaches
    ``radii[i]`` points along axis ``i`` (clipped at the edges). Only the (few) points of the
    mask are examined, so this is much cheaper than a dense max filter.
    """
    points = torch.nonzero(mask)
    if len(points) == 0:
        return points
    axes = [torch.arange(-r, r + 1, device=values.device) for r in radii]
    offsets = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(radii))
    neighbours = points[:, None, :] + offsets[None]
    for axis, size in enumerate(values.shape):
        neighbours[..., axis].clamp_(0, size - 1)
    around = values[tuple(neighbours.unbind(-1))]
    centre = values[tuple(points.unbind(-1))]
    return points[(around <= centre[:, None]).all(dim=1)]


def _inside(
    centres: torch.Tensor, shape: tuple[int, ...], border: int | torch.Tensor
) -> torch.Tensor:
    """Which integer `(k, 2)` centres lie ``border`` (scalar or `(k,)`) pixels inside `(h, w)`."""
    h, w = shape[-2:]
    y, x = centres[:, -2], centres[:, -1]
    return (y >= border) & (y < h - border) & (x >= border) & (x < w - border)
