"""Find gold fiducials in tilt images and erase them before reconstruction.

Gold beads (5–15 nm) are by far the densest objects in a tilt series: in every view they are
round spots far darker than anything biological. Their back-projection streaks agree between
the two half tomograms, so a self-supervised denoiser keeps and sharpens them; like IMOD's
``findbeads3d`` / ``ccderaser`` workflow, the beads are therefore found and painted over with
the local background in every view before back-projection.

Detection is a scale-normalised Laplacian-of-Gaussian (LoG) matched filter at the bead scale,
thresholded robustly (median and MAD of the response, so that noise alone stays below the
threshold), with non-maximum suppression and two shape checks per candidate that only
compact dark spots pass: the Hessian of the smoothed image must be nearly isotropic (which
rejects membranes, carbon edges and the border of the recorded field), and the spot must be
darker than the ring around it, by a margin in units of the ring's pixel noise, in nearly all
directions (which rejects the inside and the corners of dark regions). When the bead diameter
is not given it is estimated by a search over LoG scales followed by the half-depth radius of
the median radial profile of the strongest beads.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

__all__ = ["find_gold_beads", "find_gold_beads_in_tilt_series", "erase_gold_beads"]

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


def _detect_in_view(
    z: torch.Tensor,
    padded: torch.Tensor,
    pad: int,
    diameter: float,
    threshold: float,
    min_contrast: float,
    border: int,
) -> torch.Tensor:
    """Integer bead centres `(k, 2)` from the robust z-score `(h, w)` of the matched filter.

    ``padded`` is the image mirrored by ``pad`` pixels on every side.
    """
    nms = max(1, round(0.4 * diameter))
    candidates = _local_maxima(z, z > threshold, (nms, nms))
    candidates = candidates[_inside(candidates, z.shape, max(border, 1))]
    strength = z[candidates[:, 0], candidates[:, 1]]
    passed = _screen(padded, pad, candidates, diameter, min_contrast)
    beads = candidates[passed][_suppress(candidates[passed], strength[passed], 0.75 * diameter)]
    if len(beads) > 0 and not passed.all():
        # A second look at rejected candidates next to a bead, with the bead blanked out of
        # their ring: pairs and clusters of beads are common.
        gap = torch.cdist(candidates.float(), beads.float()).min(dim=1).values
        again = ~passed & (gap < (_RING_OUTER + 0.6) * diameter + 1)
        if again.any():
            masked = _blank_disks(padded, beads + pad, 0.6 * diameter + 1)
            passed[again] = _screen(padded, pad, candidates[again], diameter, min_contrast, masked)
            keep = _suppress(candidates[passed], strength[passed], 0.75 * diameter)
            beads = candidates[passed][keep]
    return beads


def _detect(
    images: torch.Tensor,
    diameter: float,
    threshold: float,
    min_contrast: float,
    border: int,
) -> list[torch.Tensor]:
    """Bead centres at a known diameter, per image of `(m, h, w)`: a list of `(k, 2)` int64."""
    m, h, w = images.shape
    sigma = diameter * _SIGMA_PER_DIAMETER
    radius = max(math.ceil(_RING_OUTER * diameter), math.ceil(3 * sigma)) + 1
    found = []
    chunk = max(1, _MAX_BUFFER_ELEMENTS // (4 * h * w))
    for i0 in range(0, m, chunk):
        batch = images[i0 : i0 + chunk]
        z = _robust_z(_log_responses(batch, [sigma])[0], border)
        padded, pad = _pad(batch, radius)
        for j in range(z.shape[0]):
            found.append(
                _detect_in_view(z[j], padded[j], pad, diameter, threshold, min_contrast, border)
            )
    return found


def _scale_candidates(
    images: torch.Tensor,
    diameters: list[float],
    threshold: float,
    min_contrast: float,
    border_px: int | None,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Blobs in scale space that pass the checks at their own scale.

    Returns, for `(m, h, w)` images, the integer centres `(k_i, 2)` per image, and the
    diameters `(k,)` and robust z-scores `(k,)` of all of them (image by image), at most
    ``_BEADS_FOR_DIAMETER`` strongest per image. Without ``border_px`` each scale ignores a
    border of its own diameter.
    """
    sigmas = [d * _SIGMA_PER_DIAMETER for d in diameters]
    responses = _log_responses(images, sigmas)
    radius = max(math.ceil(_RING_OUTER * diameters[-1]), math.ceil(3 * sigmas[-1])) + 1
    padded, pad = _pad(images, radius)
    found, sizes, scores = [], [], []
    for j in range(images.shape[0]):
        response = responses[:, j]
        z = _robust_z(response, _border(border_px, diameters[0]))
        # Maxima over position and scale of the normalised response itself: its z-score
        # would favour the larger, less noisy scales.
        points = _local_maxima(response, z > threshold, (1, 1, 1))
        borders = torch.tensor([_border(border_px, d) for d in diameters], device=points.device)
        points = points[_inside(points[:, 1:], images.shape, borders[points[:, 0]].clamp_min(1))]
        passed = torch.zeros(len(points), dtype=torch.bool, device=images.device)
        for s, diameter in enumerate(diameters):
            at = points[:, 0] == s
            passed[at] = _screen(padded[j], pad, points[at, 1:], diameter, min_contrast)
        points = points[passed]
        size = torch.tensor(diameters, device=images.device)[points[:, 0]]
        score = z[points[:, 0], points[:, 1], points[:, 2]]
        # One blob answers at several scales: keep its strongest answer.
        keep = _suppress(points[:, 1:], score, 0.75 * size)[:_BEADS_FOR_DIAMETER]
        found.append(points[keep, 1:])
        sizes.append(size[keep])
        scores.append(score[keep])
    return found, torch.cat(sizes), torch.cat(scores)


def _profile_diameter(
    images: list[torch.Tensor], centres: list[torch.Tensor], guess: float
) -> float:
    """Twice the half-depth radius of the median radial profile of beads around ``guess``.

    ``images`` are `(h, w)` and ``centres`` the matching integer `(k, 2)` bead centres.
    """
    radius = math.ceil(1.6 * guess) + 1
    y, x = _grid(radius, images[0].device)
    rho = torch.sqrt(y**2 + x**2).flatten()
    core = rho <= max(1.0, 0.2 * guess)
    ring = (rho >= 1.1 * guess) & (rho <= 1.6 * guess)
    bins = torch.floor(rho / 0.5).long()
    n_bins = int(bins.max()) + 1
    count = torch.bincount(bins, minlength=n_bins).to(torch.float32)
    centre_of_bin = torch.bincount(bins, weights=rho, minlength=n_bins) / count.clamp_min(1)
    profiles = []
    for image, at in zip(images, centres, strict=True):
        if len(at) == 0:
            continue
        padded, pad = _pad(image[None], radius)
        flat = _patches(padded[0], at, radius, pad).reshape(len(at), -1)
        background = flat[:, ring].median(dim=1).values
        depth = background - flat[:, core].mean(dim=1)
        valid = depth > 0
        normalised = (background[valid, None] - flat[valid]) / depth[valid, None]
        sums = torch.zeros((len(normalised), n_bins), device=image.device)
        sums.index_add_(1, bins, normalised)
        profiles.append(sums / count.clamp_min(1))
    if not profiles:
        return guess
    profile = torch.cat(profiles).median(dim=0).values[count > 0]
    where = centre_of_bin[count > 0]
    below = torch.nonzero(profile < 0.5)
    if len(below) == 0 or int(below[0]) == 0:
        return guess
    i = int(below[0])
    r0, r1, p0, p1 = float(where[i - 1]), float(where[i]), float(profile[i - 1]), float(profile[i])
    return 2.0 * (r0 + (p0 - 0.5) / (p0 - p1) * (r1 - r0))


def _estimate_diameter(
    images: torch.Tensor,
    diameter_range: tuple[float, float],
    threshold: float,
    min_contrast: float,
    border_px: int | None,
) -> float | None:
    """Bead diameter from a scale search over `(m, h, w)` images, or None if no beads."""
    low, high = diameter_range
    count = max(2, math.floor(math.log(high / low) / math.log(_SCALE_STEP)) + 1)
    diameters = [low * _SCALE_STEP**i for i in range(count)]
    found, sizes, scores = _scale_candidates(images, diameters, threshold, min_contrast, border_px)
    if len(sizes) < 3:
        return None
    # The scale that carries half of the total response, so that a few large dark blobs that
    # passed the checks do not pull the estimate.
    order = torch.argsort(sizes)
    cumulative = torch.cumsum(scores[order], 0)
    guess = float(sizes[order][torch.searchsorted(cumulative, 0.5 * cumulative[-1])])
    near = (sizes >= guess / 1.5) & (sizes <= guess * 1.5)
    selected = torch.split(near, [len(c) for c in found])
    centres = [c[keep] for c, keep in zip(found, selected, strict=True)]
    return _profile_diameter(list(images), centres, guess)


def find_gold_beads(
    image: torch.Tensor,
    *,
    diameter_px: float | None = None,
    threshold: float = 6.0,
    min_contrast: float = 1.0,
    diameter_range_px: tuple[float, float] = (4.0, 32.0),
    border_px: int | None = None,
) -> tuple[torch.Tensor, float | None]:
    """Find the centres of gold beads in one tilt image.

    Parameters
    ----------
    image : torch.Tensor
        Tilt image, shape `(h, w)`, at least 16 × 16: raw counts or normalised, with the
        beads darker than their surroundings.
    diameter_px : float, optional
        Bead diameter in pixels; estimated from the image when None (see Notes).
    threshold : float
        Detection threshold on the matched-filter response, in robust standard deviations
        (``1.4826 MAD``) of the response over the image. Pure noise stays below about 5.
    min_contrast : float
        How much darker than the ring around it (at 0.8–1.3 diameters) a bead must be, in
        standard deviations of the pixel noise in that ring, in at least 6 of 8 directions.
    diameter_range_px : tuple of float
        Smallest and largest diameter that the estimate considers.
    border_px : int, optional
        Width of the image border in which no bead is reported; one diameter when None (while
        estimating the diameter, one of each diameter tried).

    Returns
    -------
    centres : torch.Tensor
        Bead centres ``(y, x)`` in pixels, shape `(k, 2)`, float32, on the image's device,
        strongest first; `(0, 2)` when there are none.
    diameter_px : float or None
        The diameter used, or None when it was to be estimated and no beads were found.

    Notes
    -----
    The image is filtered with the scale-normalised Laplacian of Gaussian ``σ² ∇²(G_σ * I)``
    at ``σ = d / (2 √2)``, where the response to a dark disk of diameter ``d`` is largest
    (Lindeberg's scale selection). Local maxima more than ``threshold`` robust deviations
    above the median response are candidates; the threshold is relative to the spread of the
    response over the whole image, so that noise alone does not cross it. A candidate is
    kept if the Hessian of the smoothed image there is positive definite with its smaller
    eigenvalue at least 0.4 of the larger (along a line or an edge one eigenvalue is near
    zero), and if its centre is darker than the median of the ring around it by
    ``min_contrast`` noise deviations in at least 6 of 8 angular sectors (the inside and the
    corners of a dark region are not). Candidates that fail only because a bead found next to
    them darkens their ring are judged again with that bead left out, and candidates closer
    than 0.75 diameters to a stronger one are dropped.

    Without ``diameter_px`` the same filter runs on a geometric grid of scales (ratio
    ``2^(1/4)``). Blobs that are local maxima in position and scale and pass the checks at
    their scale vote for their diameter, weighted by their response; the weighted median is
    then refined to twice the radius at which the median radial profile of the beads near it
    falls halfway from their centre to their surroundings.

    References
    ----------
    .. [1] T. Lindeberg, "Feature detection with automatic scale selection", International
       Journal of Computer Vision 30, 79–116 (1998).
    .. [2] D. N. Mastronarde and S. R. Held, "Automated tilt series alignment and tomographic
       reconstruction in IMOD", Journal of Structural Biology 197, 102–113 (2017).
    """
    image = _check_images(image, "image", 2)
    threshold = _check_positive(threshold, "threshold")
    min_contrast = _check_positive(min_contrast, "min_contrast")
    _border(border_px, 1.0)
    if diameter_px is None:
        diameter = _estimate_diameter(
            image[None],
            _check_range(diameter_range_px, image.shape),
            threshold,
            min_contrast,
            border_px,
        )
        if diameter is None:
            return image.new_zeros((0, 2)), None
    else:
        diameter = _check_diameter(diameter_px, image.shape)
    border = _border(border_px, diameter)
    centres = _detect(image[None], diameter, threshold, min_contrast, border)[0]
    return centres.to(torch.float32), diameter


def find_gold_beads_in_tilt_series(
    stack: torch.Tensor,
    *,
    diameter_px: float | None = None,
    threshold: float = 6.0,
    min_contrast: float = 1.0,
    tilt_angles_deg: torch.Tensor | None = None,
    min_beads: int = 3,
    min_view_fraction: float = 0.5,
    diameter_range_px: tuple[float, float] = (4.0, 32.0),
    border_px: int | None = None,
) -> tuple[list[torch.Tensor], float | None]:
    """Find gold beads in every view of a tilt series, with one diameter for all views.

    Parameters
    ----------
    stack : torch.Tensor
        Tilt images, shape `(n, h, w)`, beads darker than their surroundings.
    diameter_px : float, optional
        Bead diameter in pixels; estimated from the five views of lowest tilt when None (from
        the five central views when ``tilt_angles_deg`` is not given, which assumes the
        views are ordered by angle).
    threshold, min_contrast, diameter_range_px, border_px
        As in :func:`find_gold_beads`.
    tilt_angles_deg : torch.Tensor, optional
        Tilt angles of the views in degrees, shape `(n,)`; they only choose the views for the
        diameter estimate.
    min_beads : int
        A view counts as showing gold when at least this many beads are found in it.
    min_view_fraction : float
        Gold is reported only when at least this fraction of the views show gold; otherwise
        no beads are reported in any view, so that data without gold stays untouched.

    Returns
    -------
    centres : list of torch.Tensor
        Per view, the bead centres ``(y, x)``, shape `(k_i, 2)`, float32.
    diameter_px : float or None
        The diameter used, or None when it was to be estimated and no gold was reported.
    """
    stack = _check_images(stack, "stack", 3)
    n = stack.shape[0]
    threshold = _check_positive(threshold, "threshold")
    min_contrast = _check_positive(min_contrast, "min_contrast")
    _border(border_px, 1.0)
    if not isinstance(min_beads, numbers.Integral) or isinstance(min_beads, bool) or min_beads < 1:
        raise ValueError(f"min_beads must be a positive integer, got {min_beads!r}")
    if not isinstance(min_view_fraction, numbers.Real) or not 0 <= min_view_fraction <= 1:
        raise ValueError(f"min_view_fraction must lie in [0, 1], got {min_view_fraction!r}")
    if tilt_angles_deg is not None:
        angles = torch.as_tensor(tilt_angles_deg, dtype=torch.float32).cpu()
        if angles.shape != (n,):
            raise ValueError(f"tilt_angles_deg must have shape ({n},), got {tuple(angles.shape)}")
        low_tilt = torch.argsort(angles.abs())[:_VIEWS_FOR_DIAMETER].sort().values
    else:
        first = max(0, n // 2 - _VIEWS_FOR_DIAMETER // 2)
        low_tilt = torch.arange(first, min(n, first + _VIEWS_FOR_DIAMETER))
    empty = [stack.new_zeros((0, 2)) for _ in range(n)]
    if diameter_px is None:
        diameter = _estimate_diameter(
            stack[low_tilt.to(stack.device)],
            _check_range(diameter_range_px, stack.shape),
            threshold,
            min_contrast,
            border_px,
        )
        if diameter is None:
            return empty, None
    else:
        diameter = _check_diameter(diameter_px, stack.shape)
    border = _border(border_px, diameter)
    centres = _detect(stack, diameter, threshold, min_contrast, border)
    showing = sum(len(c) >= min_beads for c in centres)
    if showing == 0 or showing < min_view_fraction * n:
        return empty, (diameter if diameter_px is not None else None)
    return [c.to(torch.float32) for c in centres], diameter


def erase_gold_beads(
    image: torch.Tensor,
    centres: torch.Tensor,
    *,
    diameter_px: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Paint beads over with the local background and noise.

    Parameters
    ----------
    image : torch.Tensor
        Tilt image, shape `(h, w)`.
    centres : torch.Tensor
        Bead centres ``(y, x)`` in pixels, shape `(k, 2)`; may be empty.
    diameter_px : float
        Bead diameter in pixels.
    generator : torch.Generator, optional
        Source of the fill noise, on the image's device; the global generator when None.

    Returns
    -------
    torch.Tensor
        A new image, shape `(h, w)`, in the image's floating dtype (float32 for integer
        input). Pixels farther than ``0.6 d + 2.5`` pixels from every centre are copied
        unchanged.

    Notes
    -----
    Around each centre, the disk of radius ``r = 0.6 d + 1.5`` (the bead, its bright Fresnel
    fringe and a margin for blur) is painted with a plane fitted to the ring from ``r + 1`` to
    ``r + 1 + max(3, d / 2)`` (leaving out pixels of other beads and, in a second pass,
    outliers beyond 3 robust deviations), plus Gaussian noise with the standard deviation of
    the ring about that plane. The paint covers the disk up to ``r - 1`` completely and is
    blended into the original from ``r - 1`` to ``r + 1`` as
    ``(1 - a) I + a P + sqrt(1 - (1 - a)²) σ ε``, with ``a`` falling from 1 to 0 along a
    raised cosine, which keeps the noise variance unchanged across the seam so that no rim
    remains. Where beads overlap, each pixel takes the paint of the bead that covers it most,
    then of the nearest.
    """
    if not isinstance(image, torch.Tensor) or image.ndim != 2 or image.is_complex():
        got = tuple(getattr(image, "shape", ()))
        raise ValueError(f"image must be a real tensor of shape (h, w), got shape {got}")
    if not isinstance(centres, torch.Tensor) or centres.ndim != 2 or centres.shape[1] != 2:
        got = tuple(getattr(centres, "shape", ()))
        raise ValueError(f"centres must be a tensor of shape (k, 2), got shape {got}")
    diameter = _check_positive(diameter_px, "diameter_px")
    dtype = image.dtype if image.is_floating_point() else torch.float32
    out = image.to(dtype).clone(memory_format=torch.contiguous_format)
    if not torch.isfinite(centres).all():
        raise ValueError("centres must be finite")
    if len(centres) == 0:
        return out
    device, (h, w), k = image.device, image.shape, len(centres)
    work = image.to(torch.float32).reshape(-1)
    centres = centres.to(device, torch.float32)
    fill_radius = _ERASE_RADIUS * diameter + _ERASE_MARGIN_PX
    ring_inner = fill_radius + 1.0
    ring_outer = ring_inner + max(3.0, 0.5 * diameter)

    # Pixels of a square around each bead, flattened: `(k, n)`.
    y, x = _grid(math.ceil(ring_outer) + 1, device)
    rows = torch.round(centres[:, 0, None]) + y.flatten()
    cols = torch.round(centres[:, 1, None]) + x.flatten()
    valid = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    index = (rows.clamp(0, h - 1) * w + cols.clamp(0, w - 1)).long()
    dy, dx = rows - centres[:, 0, None], cols - centres[:, 1, None]
    rho = torch.sqrt(dy**2 + dx**2)
    values = work[index]

    # The background comes from a ring around each bead, without the pixels of other beads
    # (all of the ring where other beads cover nearly all of it).
    covered = torch.zeros(h * w, dtype=torch.bool, device=device)
    covered[index[valid & (rho < ring_inner)]] = True
    ring = valid & (rho >= ring_inner) & (rho <= ring_outer)
    free = ring & ~covered[index]
    ring = torch.where((free.sum(dim=1) >= _MIN_RING_PX)[:, None], free, ring)

    # A plane through the ring by least squares, fitted again without outliers; a constant
    # where the ring is too small to carry a slope (a bead in a corner).
    design = torch.stack([torch.ones_like(dy), dy / ring_outer, dx / ring_outer], dim=-1)
    slope = (ring.sum(dim=1) >= _MIN_RING_PX).to(torch.float32)
    design = design * torch.stack([torch.ones_like(slope), slope, slope], dim=-1)[:, None]
    # Unit weight on the dropped slope terms keeps the normal equations regular.
    regular = torch.diag_embed(torch.stack([torch.zeros_like(slope), 1 - slope, 1 - slope], -1))
    regular = regular + 1e-6 * torch.eye(3, device=device)
    weight = ring.to(torch.float32)
    for _ in range(2):
        weighted = design * weight[..., None]
        normal = weighted.transpose(1, 2) @ design + regular
        coefficients = torch.linalg.solve(normal, (weighted * values[..., None]).sum(dim=1))
        plane = (design * coefficients[:, None]).sum(dim=-1)
        residual = values - plane
        spread = torch.where(ring, residual.abs(), torch.nan).nanmedian(dim=1).values
        inlier = ring & (residual.abs() <= 3 * _MAD_TO_STD * spread.nan_to_num(0.0)[:, None])
        weight = inlier.to(torch.float32)
    sigma = torch.sqrt((residual**2 * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1))

    alpha = ((fill_radius + 1.0 - rho) / 2.0).clamp(0.0, 1.0)
    alpha = 0.5 - 0.5 * torch.cos(math.pi * alpha)
    noise = torch.randn(rho.shape, generator=generator, device=device)
    fill = (1 - alpha) * values + alpha * plane
    fill = fill + torch.sqrt(1 - (1 - alpha) ** 2) * sigma[:, None] * noise

    # Each pixel takes the fill of the bead with the largest weight there, then the nearest,
    # then the first: an integer key whose maximum is unique.
    changed = valid & (alpha > 0)
    priority = torch.round((alpha - 1e-3 * rho / (ring_outer + 2) + 0.01) * 1e7).long()
    key = priority * k + (k - 1 - torch.arange(k, device=device))[:, None]
    best = torch.full((h * w,), -1, dtype=torch.long, device=device)
    best.scatter_reduce_(0, index[changed], key[changed], reduce="amax")
    winner = changed & (key == best[index])
    out.view(-1)[index[winner]] = fill[winner].to(out.dtype)
    return out
