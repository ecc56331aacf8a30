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

from deepdewedge.reconstruct.gold.filters import (
    _BEADS_FOR_DIAMETER,
    _MAX_BUFFER_ELEMENTS,
    _RING_OUTER,
    _SCALE_STEP,
    _SIGMA_PER_DIAMETER,
    _VIEWS_FOR_DIAMETER,
    _blank_disks,
    _border,
    _check_diameter,
    _check_images,
    _check_positive,
    _check_range,
    _grid,
    _inside,
    _local_maxima,
    _log_responses,
    _pad,
    _patches,
    _robust_z,
    _screen,
    _suppress,
)

__all__ = ["find_gold_beads", "find_gold_beads_in_tilt_series"]


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
