"""Blob phantoms, projection, noise, even/odd splits and simulated tomograms.

The geometry matches :mod:`deepdewedge.reconstruct.backproject`: volumes are `(z, y, x)`, the
tilt axis is y, and a positive tilt rotates the sample from z towards x (IMOD-like), so that a
voxel at centred coordinates ``(z, y, x)`` is imaged at detector position
``x' = x cos θ + z sin θ``.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from deepdewedge.reconstruct.backproject import weighted_backprojection
from deepdewedge.reconstruct.split import even_odd_indices

__all__ = [
    "simulate_phantom",
    "project",
    "add_noise",
    "split_even_odd",
    "simulate_tomogram",
]

# Densities relative to a macromolecule's peak of about 1.
_ICE_DENSITY = 0.15
_MEMBRANE_DENSITY = 0.7
_BEAD_DENSITY = 5.0
# Default object counts for a 128 x 128 (y, x) field of view with a 48 px thick slab.
_REFERENCE_AREA_PX = 128 * 128
_REFERENCE_SLAB_VOLUME_PX = 128 * 128 * 48
_DEFAULT_BLOBS = 1000
_DEFAULT_MEMBRANES = 5
_DEFAULT_BEADS = 4
# Sampling step along each ray of the projector, and the upper bound on the number of float
# elements of its per-chunk buffer.
_RAY_STEP_PX = 0.5
_MAX_BUFFER_ELEMENTS = 2**25


def _is_int(value) -> bool:
    """Whether ``value`` is an integer (Python or NumPy), excluding booleans."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_shape(shape_zyx) -> tuple[int, int, int]:
    shape = tuple(shape_zyx)
    if len(shape) != 3 or any(not _is_int(s) or s < 1 for s in shape):
        raise ValueError(f"shape_zyx must be three positive integers, got {shape_zyx!r}")
    return tuple(int(s) for s in shape)


def _check_snr(snr) -> None:
    if not isinstance(snr, numbers.Real) or isinstance(snr, bool):
        raise ValueError(f"snr must be a finite positive number, got {snr!r}")
    if not (math.isfinite(snr) and snr > 0):
        raise ValueError(f"snr must be a finite positive number, got {snr!r}")


def _check_count(name: str, value: int | None, default: int) -> int:
    if value is None:
        return default
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def _random_directions(n: int, generator: torch.Generator) -> torch.Tensor:
    """Uniformly distributed unit vectors, shape `(n, 3)`."""
    v = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _splat_gaussians(
    volume: torch.Tensor,
    centres: torch.Tensor,
    sigmas: torch.Tensor,
    amplitudes: torch.Tensor,
) -> None:
    """Add isotropic Gaussians to ``volume`` in place, each within a ±3σ box.

    ``volume`` is `(d, h, w)`, ``centres`` `(m, 3)` in voxel indices, ``sigmas`` and
    ``amplitudes`` `(m,)`. Gaussians are rendered in groups of similar width, each group with
    a box just large enough for its widest member, as separable products.
    """
    shape = volume.shape
    halves = torch.ceil(3.0 * sigmas).long()
    for half in torch.unique(halves).tolist():
        members = halves == half
        c = centres[members]
        sigma = sigmas[members, None].to(torch.float32)
        r = torch.arange(-half, half + 1)
        points = c.round().long()[:, :, None] + r  # (m, 3, k) voxel indices per axis
        offsets = (points - c[:, :, None]).to(torch.float32)
        profiles = torch.exp(-0.5 * (offsets / sigma[:, :, None]) ** 2)
        # Out-of-volume points get zero weight and a clamped (valid) index.
        profiles = profiles * torch.stack(
            [(points[:, i] >= 0) & (points[:, i] < shape[i]) for i in range(3)], dim=1
        )
        profiles[:, 0] *= amplitudes[members, None].to(torch.float32)
        values = (
            profiles[:, 0, :, None, None]
            * profiles[:, 1, None, :, None]
            * profiles[:, 2, None, None, :]
        )
        points = torch.stack([points[:, i].clamp(0, shape[i] - 1) for i in range(3)], dim=1)
        flat = (
            points[:, 0, :, None, None] * (shape[1] * shape[2])
            + points[:, 1, None, :, None] * shape[2]
            + points[:, 2, None, None, :]
        )
        volume.view(-1).index_add_(0, flat.reshape(-1), values.reshape(-1).to(volume.dtype))


def _local_grid(
    shape: tuple[int, int, int], centre: torch.Tensor, half_extent: float
) -> tuple[tuple[slice, slice, slice], torch.Tensor] | None:
    """Slices of a box around ``centre`` and the voxel coordinates relative to it.

    Returns the box's slices and `(bd, bh, bw, 3)` float32 coordinates minus ``centre``, or
    None if the box misses the volume.
    """
    slices = []
    axes = []
    for size, c in zip(shape, centre.tolist(), strict=True):
        lo = max(0, int(math.floor(c - half_extent)))
        hi = min(size, int(math.ceil(c + half_extent)) + 1)
        if lo >= hi:
            return None
        slices.append(slice(lo, hi))
        axes.append(torch.arange(lo, hi, dtype=torch.float32) - c)
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    return tuple(slices), grid


def _bilayer(distance: torch.Tensor) -> torch.Tensor:
    """Two Gaussian leaflets about 2 px apart: a membrane about 3 px thick."""
    leaflet_offset, leaflet_sigma = 0.9, 0.6
    profile = torch.zeros_like(distance)
    near = distance.abs() < leaflet_offset + 4.0 * leaflet_sigma
    d = distance[near]
    profile[near] = _MEMBRANE_DENSITY * (
        torch.exp(-0.5 * ((d - leaflet_offset) / leaflet_sigma) ** 2)
        + torch.exp(-0.5 * ((d + leaflet_offset) / leaflet_sigma) ** 2)
    )
    return profile


def _add_vesicle(volume, z_range, generator) -> None:
    d, h, w = volume.shape
    z0, z1 = z_range
    max_radius = min(20.0, (z1 - z0) / 2 - 3.0, h / 2 - 2.0, w / 2 - 2.0)
    if max_radius < 3.0:
        return
    radius = float(_uniform(1, min(6.0, max_radius), max_radius, generator))
    axes_scale = _uniform(3, 0.88, 1.12, generator)
    margin = radius * float(axes_scale.max()) + 2.5
    lows = torch.tensor([z0 + margin, margin, margin], dtype=torch.float64)
    highs = torch.tensor([z1 - 1 - margin, h - 1 - margin, w - 1 - margin], dtype=torch.float64)
    highs = torch.maximum(highs, lows)
    centre = lows + (highs - lows) * torch.rand(3, generator=generator, dtype=torch.float64)
    local = _local_grid(volume.shape, centre, margin + 1.0)
    if local is None:
        return
    slices, coords = local
    # Approximate distance to a mildly ellipsoidal shell of mean radius ``radius``.
    scaled_radius = ((coords / axes_scale.float()) ** 2).sum(-1).sqrt()
    volume[slices] += _bilayer(scaled_radius - radius).to(volume.dtype)


def _add_sheet(volume, z_range, generator) -> None:
    d, h, w = volume.shape
    z0, z1 = z_range
    curvature_radius = float(_uniform(1, 60.0, 150.0, generator))
    patch_radius = float(_uniform(1, 20.0, 45.0, generator))
    normal = _random_directions(1, generator)[0]
    lows = torch.tensor([z0 + 2.0, 0.0, 0.0], dtype=torch.float64)
    highs = torch.tensor([max(z0 + 2.0, z1 - 3.0), h - 1.0, w - 1.0], dtype=torch.float64)
    anchor = lows + (highs - lows) * torch.rand(3, generator=generator, dtype=torch.float64)
    local = _local_grid(volume.shape, anchor, patch_radius + 3.0)
    if local is None:
        return
    slices, coords = local
    # A cap of a large sphere through the anchor point: a gently curved sheet.
    to_centre = coords + curvature_radius * normal.float()
    distance = to_centre.norm(dim=-1) - curvature_radius
    lateral = coords.norm(dim=-1)
    edge = torch.clamp((patch_radius - lateral) / 3.0, 0.0, 1.0)
    volume[slices] += (_bilayer(distance) * edge).to(volume.dtype)


def _add_bead(volume, z_range, generator) -> None:
    d, h, w = volume.shape
    z0, z1 = z_range
    radius = float(_uniform(1, 1.5, 2.5, generator))
    margin = min(radius + 1.0, (z1 - z0 - 1) / 2)
    lows = torch.tensor([z0 + margin, 0.0, 0.0], dtype=torch.float64)
    highs = torch.tensor([z1 - 1 - margin, h - 1.0, w - 1.0], dtype=torch.float64)
    highs = torch.maximum(highs, lows)
    centre = lows + (highs - lows) * torch.rand(3, generator=generator, dtype=torch.float64)
    local = _local_grid(volume.shape, centre, radius + 1.5)
    if local is None:
        return
    slices, coords = local
    ball = torch.clamp(radius + 0.5 - coords.norm(dim=-1), 0.0, 1.0)
    # Gold displaces everything else: the bead sets the density where it is solid.
    region = volume[slices]
    volume[slices] = torch.maximum(region, (_BEAD_DENSITY * ball).to(volume.dtype))


def _add_blobs(volume, z_range, n_blobs, generator) -> None:
    """Macromolecule-like blobs: clusters of 3-5 Gaussians with different widths."""
    if n_blobs == 0:
        return
    d, h, w = volume.shape
    z0, z1 = z_range
    margin = min(3.0, (z1 - z0 - 1) / 2)
    lows = torch.tensor([z0 + margin, 0.0, 0.0], dtype=torch.float64)
    highs = torch.tensor([z1 - 1 - margin, h - 1.0, w - 1.0], dtype=torch.float64)
    highs = torch.maximum(highs, lows)
    centres = lows + (highs - lows) * torch.rand(
        n_blobs, 3, generator=generator, dtype=torch.float64
    )
    size = _uniform(n_blobs, 0.7, 1.4, generator)  # overall size of each blob
    max_parts = 5
    n_parts = torch.randint(3, max_parts + 1, (n_blobs,), generator=generator)
    # Part 0 is the core; the others sit around it in random directions (random orientation).
    radial = _uniform(n_blobs * max_parts, 1.0, 2.6, generator).reshape(n_blobs, max_parts)
    radial[:, 0] = 0.0
    directions = _random_directions(n_blobs * max_parts, generator).reshape(n_blobs, max_parts, 3)
    part_centres = centres[:, None, :] + (radial * size[:, None])[..., None] * directions
    sigmas = _uniform(n_blobs * max_parts, 0.6, 1.3, generator).reshape(n_blobs, max_parts)
    sigmas[:, 0] = _uniform(n_blobs, 1.1, 1.6, generator)
    sigmas = sigmas * size[:, None]
    amplitudes = _uniform(n_blobs * max_parts, 0.35, 0.7, generator).reshape(n_blobs, max_parts)
    used = torch.arange(max_parts)[None, :] < n_parts[:, None]
    _splat_gaussians(volume, part_centres[used], sigmas[used], amplitudes[used])


def simulate_phantom(
    shape_zyx: tuple[int, int, int],
    *,
    slab_thickness_px: int | None = None,
    n_blobs: int | None = None,
    n_membranes: int | None = None,
    n_beads: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Simulate a cryo-ET-like density: a slab of ice with macromolecules, membranes and beads.

    Parameters
    ----------
    shape_zyx : tuple of int
        Shape `(d, h, w)` of the volume.
    slab_thickness_px : int, optional
        Thickness of the ice slab along z, centred in the volume; everything lies inside it.
        Defaults to ``round(0.75 d)``.
    n_blobs : int, optional
        Number of macromolecule-like blobs: clusters of 3–5 overlapping Gaussians of different
        widths around a core, in random directions, so each is asymmetric, randomly oriented
        and about 3–8 px across, with a peak density of about 1. Defaults to 1000 per
        128 × 128 × 48 px of slab (scaled with the slab volume).
    n_membranes : int, optional
        Number of membranes (about 3 px thick, bilayer-like profile): about two thirds are
        spherical or mildly ellipsoidal vesicles of radius 6–20 px, the rest are patches of
        gently curved sheets with random orientation. Defaults to 5 per 128 × 128 px of
        field of view (scaled with ``h w``).
    n_beads : int, optional
        Number of gold-bead-like solid balls of radius 1.5–2.5 px and density 5, much denser
        than anything else. Defaults to 4 per 128 × 128 px of field of view.
    generator : torch.Generator, optional
        Source of randomness (a CPU generator). Defaults to a fresh generator seeded with 0, so
        the default output is reproducible.

    Returns
    -------
    torch.Tensor
        The phantom, shape `(d, h, w)`, float32, on the CPU. Matter has positive density on top
        of an ice density of 0.15; the volume is exactly zero outside the slab.
    """
    d, h, w = _check_shape(shape_zyx)
    thickness = round(0.75 * d) if slab_thickness_px is None else slab_thickness_px
    if not _is_int(thickness) or not 1 <= thickness <= d:
        raise ValueError(
            f"slab_thickness_px must be an integer in [1, {d}], got {slab_thickness_px!r}"
        )
    thickness = int(thickness)
    area_scale = h * w / _REFERENCE_AREA_PX
    volume_scale = h * w * thickness / _REFERENCE_SLAB_VOLUME_PX
    n_blobs = _check_count("n_blobs", n_blobs, round(_DEFAULT_BLOBS * volume_scale))
    n_membranes = _check_count("n_membranes", n_membranes, round(_DEFAULT_MEMBRANES * area_scale))
    n_beads = _check_count("n_beads", n_beads, round(_DEFAULT_BEADS * area_scale))
    if generator is None:
        generator = torch.Generator().manual_seed(0)

    z0 = (d - thickness) // 2
    z1 = z0 + thickness
    volume = torch.zeros((d, h, w), dtype=torch.float32)
    for _ in range(n_membranes):
        if float(torch.rand(1, generator=generator)) < 2.0 / 3.0:
            _add_vesicle(volume, (z0, z1), generator)
        else:
            _add_sheet(volume, (z0, z1), generator)
    _add_blobs(volume, (z0, z1), n_blobs, generator)
    volume[z0:z1] += _ICE_DENSITY
    for _ in range(n_beads):
        _add_bead(volume, (z0, z1), generator)
    volume[:z0] = 0.0
    volume[z1:] = 0.0
    return volume


def project(
    volume: torch.Tensor,
    tilt_angles_deg: torch.Tensor,
    *,
    width: int | None = None,
) -> torch.Tensor:
    """Parallel-beam projections of a volume tilted about the y axis.

    Parameters
    ----------
    volume : torch.Tensor
        Density, shape `(d, h, w)`.
    tilt_angles_deg : torch.Tensor
        Tilt angles in degrees, shape `(n,)`. A positive angle rotates the volume in the z–x
        plane from z towards x (IMOD-like): the voxel at centred coordinates ``(z, y, x)``
        (measured from ``(n - 1) / 2`` along each axis) lands on detector column
        ``x' = x cos θ + z sin θ``, so a feature above the centre (``z > 0``) moves to larger x
        as the angle grows. In Fourier space the projection measures the central plane with
        ``atan(kz / kx) = θ``.
    width : int, optional
        Number of detector columns ``w_det``, centred on the volume's centre. Defaults to
        ``w``.

    Returns
    -------
    torch.Tensor
        Projections, shape `(n, h, w_det)`, on the device and floating dtype of ``volume``.

    Notes
    -----
    Each detector pixel is the line integral along the tilted beam direction of the volume's
    bilinear interpolant in the z–x plane, sampled at half-voxel steps along the ray
    (unit steps give errors of about 1% in the projected mass). The volume is
    taken to be zero outside its box, so rays that leave through the x borders simply
    collect no density there: projecting a volume that has matter near its x borders at high
    tilt is equivalent to imaging a sample that ends there. To mimic a sample that extends
    beyond the field of view, simulate a phantom wider in x and keep only the central part of
    the reconstruction, as :func:`simulate_tomogram` does. Angles are processed in chunks so
    the intermediate buffer stays bounded.
    """
    if volume.ndim != 3:
        raise ValueError(f"volume must have shape (d, h, w), got {tuple(volume.shape)}")
    d, h, w = volume.shape
    angles = torch.as_tensor(tilt_angles_deg).reshape(-1).to(torch.float64)
    if angles.numel() == 0:
        raise ValueError("tilt_angles_deg must contain at least one angle")
    if not torch.isfinite(angles).all() or (angles.abs() >= 90.0).any():
        raise ValueError("tilt_angles_deg must be finite and strictly between -90 and 90 degrees")
    width = w if width is None else width
    if not _is_int(width) or width < 1:
        raise ValueError(f"width must be a positive integer, got {width!r}")
    width = int(width)

    device = volume.device
    dtype = volume.dtype if volume.is_floating_point() else torch.float32
    source = volume.to(dtype).permute(1, 0, 2)[None]  # (1, h, d, w): y as channels
    angles = angles.to(device)
    x_det = torch.arange(width, device=device, dtype=torch.float64) - (width - 1) / 2
    half_thickness = (d - 1) / 2 + 1.0  # beyond this the interpolant is zero

    # Order by |angle| so that chunks hold rays of similar length.
    order = torch.argsort(angles.abs(), stable=True)
    cos_sorted = torch.cos(torch.deg2rad(angles[order])).tolist()
    out = torch.empty((angles.numel(), h, width), device=device, dtype=dtype)
    start = 0
    while start < angles.numel():
        chunk = 1
        while start + chunk < angles.numel():
            n_t = 2 * math.ceil(half_thickness / (_RAY_STEP_PX * cos_sorted[start + chunk])) + 1
            if (chunk + 1) * n_t * h * width > _MAX_BUFFER_ELEMENTS:
                break
            chunk += 1
        idx = order[start : start + chunk]
        theta = torch.deg2rad(angles[idx])
        cos_t, sin_t = torch.cos(theta), torch.sin(theta)
        half_steps = math.ceil(half_thickness / (_RAY_STEP_PX * float(cos_t.min())))
        steps = torch.arange(-half_steps, half_steps + 1, device=device, dtype=torch.float64)
        t = _RAY_STEP_PX * steps
        # Ray through detector column x' at angle θ, by arc length t:
        # z = t cos θ, x = x' / cos θ - t sin θ (so that x cos θ + z sin θ = x').
        z = cos_t[:, None, None] * t[None, :, None]
        x = x_det[None, None, :] / cos_t[:, None, None] - sin_t[:, None, None] * t[None, :, None]
        z = z.expand_as(x)
        # align_corners=False maps centred coordinate p on an axis of size n to 2 p / n.
        grid = torch.stack([2.0 * x / w, 2.0 * z / d], dim=-1).to(dtype)
        samples = F.grid_sample(
            source.expand(len(idx), -1, -1, -1),
            grid,
            mode="bilinear",
            padding_mode="zeros",
            align_corners=False,
        )  # (chunk, h, n_t, width)
        out[idx] = _RAY_STEP_PX * samples.sum(dim=2)
        start += chunk
    return out


def add_noise(
    tilt_series: torch.Tensor,
    *,
    snr: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Add pixel-wise independent Gaussian noise at a given signal-to-noise ratio.

    Parameters
    ----------
    tilt_series : torch.Tensor
        Noise-free projections, shape `(n, h, w)` (any shape is accepted).
    snr : float
        Target ``var(signal) / var(noise)``, variances taken over the whole tilt series.
    generator : torch.Generator
        Source of randomness. Noise is drawn on the generator's device and moved to the
        tilt series' device.

    Returns
    -------
    torch.Tensor
        ``tilt_series`` plus zero-mean Gaussian noise of variance ``var(tilt_series) / snr``,
        same shape, device and floating dtype.
    """
    _check_snr(snr)
    if tilt_series.numel() < 2:
        raise ValueError("tilt_series must have at least two elements to define its variance")
    signal = tilt_series if tilt_series.is_floating_point() else tilt_series.float()
    signal_var = float(signal.to(torch.float64).var(correction=0))
    if signal_var == 0.0:
        raise ValueError("tilt_series is constant, so its SNR is undefined")
    noise = torch.randn(
        signal.shape, generator=generator, device=generator.device, dtype=torch.float64
    )
    noise = noise * math.sqrt(signal_var / snr)
    return signal + noise.to(device=signal.device, dtype=signal.dtype)


def split_even_odd(
    tilt_series: torch.Tensor,
    tilt_angles_deg: torch.Tensor,
    *,
    acquisition_order: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a tilt series into two halves by the order in which the tilts were acquired.

    Parameters
    ----------
    tilt_series : torch.Tensor
        Projections, shape `(n, h, w)`.
    tilt_angles_deg : torch.Tensor
        Tilt angles in degrees, shape `(n,)`.
    acquisition_order : torch.Tensor, optional
        Integer tensor, shape `(n,)`, a permutation of ``0 .. n-1``: ``acquisition_order[k]``
        is the index (into ``tilt_series``) of the ``k``-th acquired projection. Defaults to
        the tilts sorted by angle, i.e. sequential acquisition from the most negative angle.

    Returns
    -------
    tilt_series_0 : torch.Tensor
        Projections acquired at even positions ``0, 2, 4, ...`` of the acquisition order,
        shape `(n0, h, w)`, in their original relative order.
    tilt_angles_0_deg : torch.Tensor
        Their angles, shape `(n0,)`.
    tilt_series_1 : torch.Tensor
        Projections acquired at odd positions ``1, 3, 5, ...``, shape `(n1, h, w)`.
    tilt_angles_1_deg : torch.Tensor
        Their angles, shape `(n1,)`.

    Notes
    -----
    Splitting by acquisition order gives two tilt series that cover the same angular range
    (for sequential or dose-symmetric schemes, with alternating angles) and have independent
    noise, so their reconstructions are noise2noise-style pairs (DeepDeWedge, section 2).
    """
    if tilt_series.ndim != 3:
        raise ValueError(f"tilt_series must have shape (n, h, w), got {tuple(tilt_series.shape)}")
    n = tilt_series.shape[0]
    angles = torch.as_tensor(tilt_angles_deg).reshape(-1)
    if angles.numel() != n:
        raise ValueError(
            f"tilt_angles_deg has {angles.numel()} angles but tilt_series has {n} projections"
        )
    if acquisition_order is None:
        acquisition_order = torch.argsort(angles.detach().cpu(), stable=True)
    elif torch.as_tensor(acquisition_order).numel() != n:
        raise ValueError(f"acquisition_order must be a permutation of 0..{n - 1}")
    index_0, index_1 = even_odd_indices(acquisition_order)
    index_0_dev = index_0.to(tilt_series.device)
    index_1_dev = index_1.to(tilt_series.device)
    angles_0 = angles[index_0.to(angles.device)]
    angles_1 = angles[index_1.to(angles.device)]
    return tilt_series[index_0_dev], angles_0, tilt_series[index_1_dev], angles_1


def simulate_tomogram(
    shape_zyx: tuple[int, int, int],
    *,
    tilt_range_deg: tuple[float, float] = (-60.0, 60.0),
    tilt_step_deg: float = 2.0,
    snr: float = 0.25,
    filter: str = "hamming",
    full_filter: str | None = None,
    slab_thickness_px: int | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Simulate a phantom, its noisy tilt series and even, odd and full FBP tomograms.

    Parameters
    ----------
    shape_zyx : tuple of int
        Shape `(d, h, w)` of the ground truth and of the tomograms.
    tilt_range_deg : tuple of float
        Smallest and largest tilt angle in degrees, each strictly between -90 and 90.
    tilt_step_deg : float
        Angular increment in degrees; tilts run from the smallest angle in these steps up to
        the largest.
    snr : float
        Signal-to-noise ratio ``var(signal) / var(noise)`` of the tilt series
        (:func:`add_noise`). The paper's synthetic experiments use 1/2, 1/4 and 1/6.
    filter : {"ramp", "hamming", "sirt"}
        Filter of the weighted back-projection of the halves; the paper's synthetic
        experiments use the Hamming-like one.
    full_filter : {"ramp", "hamming", "sirt"}, optional
        Filter of the full tomogram; default: `filter`.
    slab_thickness_px : int, optional
        Ice thickness passed to :func:`simulate_phantom`.
    generator : torch.Generator, optional
        Source of all randomness (phantom and noise). Defaults to a fresh generator seeded
        with 0.

    Returns
    -------
    dict of str to torch.Tensor
        ``"ground_truth"``: the phantom, `(d, h, w)`. ``"tomo0"``, ``"tomo1"``: reconstructions
        of the even and odd halves of the noisy tilt series (:func:`split_even_odd` with
        sequential acquisition, i.e. alternate tilts), `(d, h, w)`. ``"tomo_full"``:
        reconstruction of the whole noisy tilt series, `(d, h, w)`. ``"tilt_angles_deg"``: the
        angles, `(n,)`. Tomograms are float32 and ``tomo_full`` has zero mean and unit
        standard deviation. The halves have the affine normalisation that maps the full
        tomogram of their own filter to zero mean and unit standard deviation, so with one
        filter ``tomo_full`` equals the average of ``tomo0`` and ``tomo1`` up to rounding.

    Notes
    -----
    The phantom is simulated wider in x than the output, by ``d tan(max |θ|)`` on each side
    (so cost grows quickly for tilts near 90°), so that every ray through the output region at
    every tilt crosses only simulated sample and none is truncated. It is projected onto a
    detector just wide enough for those rays, noise is added to that tilt series, and the
    central `(d, h, w)` region is reconstructed.
    """
    d, h, w = _check_shape(shape_zyx)
    lo, hi = (float(a) for a in tilt_range_deg)
    if not (-90.0 < lo <= hi < 90.0):
        raise ValueError(
            f"tilt_range_deg must satisfy -90 < min <= max < 90, got {tilt_range_deg!r}"
        )
    if not isinstance(tilt_step_deg, numbers.Real) or not (
        math.isfinite(tilt_step_deg) and tilt_step_deg > 0
    ):
        raise ValueError(f"tilt_step_deg must be positive, got {tilt_step_deg!r}")
    _check_snr(snr)
    full_filter = full_filter or filter
    for name, value in (("filter", filter), ("full_filter", full_filter)):
        if value not in ("ramp", "hamming", "sirt"):
            raise ValueError(f"{name} must be 'ramp', 'hamming' or 'sirt', got {value!r}")
    n_tilts = int(math.floor((hi - lo) / tilt_step_deg + 1e-6)) + 1
    if n_tilts < 2:
        raise ValueError("tilt_range_deg and tilt_step_deg must give at least two tilts")
    angles = lo + tilt_step_deg * torch.arange(n_tilts, dtype=torch.float64)
    if generator is None:
        generator = torch.Generator().manual_seed(0)

    theta_max = math.radians(max(abs(lo), abs(hi)))
    pad = math.ceil(d * math.tan(theta_max)) + 2
    phantom = simulate_phantom(
        (d, h, w + 2 * pad), slab_thickness_px=slab_thickness_px, generator=generator
    )
    ground_truth = phantom[..., pad : pad + w].clone()

    # Detector just wide enough for all rays through the central (d, h, w) region.
    theta = torch.deg2rad(angles)
    reach = (torch.cos(theta) * (w - 1) / 2 + torch.sin(theta).abs() * (d - 1) / 2).max()
    det_pad = max(0, math.ceil(float(reach) - (w - 1) / 2) + 1)
    clean = project(phantom, angles.float(), width=w + 2 * det_pad)
    noisy = add_noise(clean, snr=snr, generator=generator)

    series_0, angles_0, series_1, angles_1 = split_even_odd(noisy, angles)
    tomo0 = weighted_backprojection(series_0, angles_0, thickness=d, filter=filter, width=w)
    tomo1 = weighted_backprojection(series_1, angles_1, thickness=d, filter=filter, width=w)
    tomo_full = weighted_backprojection(noisy, angles, thickness=d, filter=full_filter, width=w)
    reference = tomo_full
    if full_filter != filter:
        reference = weighted_backprojection(noisy, angles, thickness=d, filter=filter, width=w)
    mean, std = reference.mean(), reference.std()
    return {
        "ground_truth": ground_truth,
        "tomo0": ((tomo0 - mean) / std).float(),
        "tomo1": ((tomo1 - mean) / std).float(),
        "tomo_full": ((tomo_full - tomo_full.mean()) / tomo_full.std()).float(),
        "tilt_angles_deg": angles.float(),
    }
