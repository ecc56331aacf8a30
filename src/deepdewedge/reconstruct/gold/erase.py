"""Paint gold beads over with the local background and matching noise."""

from __future__ import annotations

import math

import torch

from deepdewedge.reconstruct.gold.filters import (
    _ERASE_MARGIN_PX,
    _ERASE_RADIUS,
    _MAD_TO_STD,
    _MIN_RING_PX,
    _check_positive,
    _grid,
)

__all__ = ["erase_gold_beads"]


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
