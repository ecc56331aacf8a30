"""A cryo-ET sample with ground truth: macromolecules, membranes and gold beads in ice.

Volumes are `(z, y, x)` with z the beam direction at zero tilt. Orientations follow
``docs/conventions.md``: a `(3, 3)` matrix ``R`` acts on ``zyx`` column vectors and the rotated
template is ``v_R(p) = v(Rᵀ p)`` about the box centre, as in
:func:`deepdewedge.rotation.rotate_and_crop`. They are also recorded as ZYZ Euler angles, see
:func:`euler_zyz_to_matrix`.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from deepdewedge.rotation import rotate_and_crop, sample_rotations
from deepdewedge.simulate.templates import Template

__all__ = [
    "Particle",
    "SimulatedSample",
    "euler_zyz_to_matrix",
    "matrix_to_euler_zyz",
    "simulate_sample",
]

log = logging.getLogger(__name__)

# Densities relative to a protein's interior of about 1 (the templates' scale).
ICE_DENSITY = 0.15
MEMBRANE_DENSITY = 0.7
BEAD_DENSITY = 5.0
# Bilayer: two leaflets (head-group layers) ±18 Å from the mid-plane, each 5 Å wide (σ).
_LEAFLET_OFFSET_ANGSTROM = 18.0
_LEAFLET_SIGMA_ANGSTROM = 5.0
# Vesicle radii and flat-sheet sizes in Å.
_VESICLE_RADIUS_ANGSTROM = (150.0, 400.0)
_SHEET_PATCH_RADIUS_ANGSTROM = (250.0, 600.0)
_SHEET_CURVATURE_RADIUS_ANGSTROM = (1500.0, 5000.0)
# Membrane density above which a voxel counts as taken, and the gap kept around objects.
_OCCUPIED = 0.05
_GAP_PX = 1
# Placement tries per gold bead before giving up on it.
_MAX_TRIES = 200
# Random candidate positions drawn per round, and rounds, when placing a particle.
_CANDIDATES = 4096
_CANDIDATE_ROUNDS = 16
# Exact checks per round of the candidates that the free-space mask lets through.
_MAX_CHECKS = 64
# Fraction of the ice that the particles' bounding spheres fill by default.
_DEFAULT_FILL = 0.15


@dataclass(frozen=True)
class Particle:
    """One macromolecule placed in the sample.

    Attributes
    ----------
    index
        0-based number of the particle among those recorded.
    template
        Name of its template.
    centre_zyx_px
        Voxel indices ``(z, y, x)`` of the particle's centre of mass in the ground-truth volume.
    euler_zyz_deg
        Its orientation ``(φ, θ, ψ)`` in degrees, see :func:`euler_zyz_to_matrix`.
    rotation_zyx
        The same orientation as a `(3, 3)` matrix acting on ``zyx`` vectors: the template's
        voxel at offset ``t`` (zyx) from its box centre lands at ``centre + R t``.
    box_px
        Edge of the template's cubic box in voxels (odd).
    radius_px
        Radius in voxels of the sphere that holds the particle in every orientation.
    """

    index: int
    template: str
    centre_zyx_px: tuple[int, int, int]
    euler_zyz_deg: tuple[float, float, float]
    rotation_zyx: torch.Tensor = field(repr=False)
    box_px: int
    radius_px: float


@dataclass(frozen=True, eq=False)
class SimulatedSample:
    """The simulated density and what it contains.

    Attributes
    ----------
    volume
        `(d, h, w + 2 p)` float32 density with the ice, wider in x than the field of view by
        the lateral padding ``p`` on each side (sample beyond the field of view). This is what
        is imaged.
    lateral_padding_px
        ``p``.
    ground_truth
        `(d, h, w)` density of the field of view above the ice (see the property).
    particles
        The particles inside the ground truth, with coordinates in it; a box of the largest
        template's size around each lies inside it.
    n_particles_outside
        Number of particles placed in the padding, not recorded.
    ice_z_range_px
        First and one-past-last z index of the ice slab.
    ice_density
        Density of the ice, uniform in the slab.
    """

    volume: torch.Tensor
    lateral_padding_px: int
    particles: list[Particle]
    n_particles_outside: int
    ice_z_range_px: tuple[int, int]
    ice_density: float = ICE_DENSITY

    @property
    def ground_truth(self) -> torch.Tensor:
        """`(d, h, w)` density of the field of view above the ice, a new tensor.

        The central part of :attr:`volume` minus the uniform ice: what tomography can recover.
        The ice slab is uniform in x and y, so its Fourier transform lies on the kz axis, inside
        the missing wedge of any tilt range short of ±90°; no reconstruction shows it, and
        leaving it in would let it dominate correlations with reconstructions. Matter (and
        gold, which displaces the ice) keeps its density relative to the ice.
        """
        p = self.lateral_padding_px
        field = self.volume[..., p : self.volume.shape[-1] - p].clone()
        z0, z1 = self.ice_z_range_px
        field[z0:z1] -= self.ice_density
        return field


def _rz(angle: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(angle), torch.sin(angle)
    zero, one = torch.zeros_like(angle), torch.ones_like(angle)
    return torch.stack(
        [
            torch.stack([c, -s, zero], -1),
            torch.stack([s, c, zero], -1),
            torch.stack([zero, zero, one], -1),
        ],
        -2,
    )


def _ry(angle: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(angle), torch.sin(angle)
    zero, one = torch.zeros_like(angle), torch.ones_like(angle)
    return torch.stack(
        [
            torch.stack([c, zero, s], -1),
            torch.stack([zero, one, zero], -1),
            torch.stack([-s, zero, c], -1),
        ],
        -2,
    )


def _flip(matrix: torch.Tensor) -> torch.Tensor:
    """The same linear map written in the reversed axis order (xyz <-> zyx)."""
    return matrix.flip(-1).flip(-2)


def euler_zyz_to_matrix(euler_zyz_deg: torch.Tensor) -> torch.Tensor:
    """Rotation matrices from ZYZ Euler angles.

    Parameters
    ----------
    euler_zyz_deg : torch.Tensor
        Angles ``(φ, θ, ψ)`` in degrees, shape `(..., 3)`.

    Returns
    -------
    torch.Tensor
        `(..., 3, 3)` matrices acting on ``zyx`` column vectors, in the dtype of the input
        (float64 for integer input).

    Notes
    -----
    In ``xyz`` coordinates the matrix is ``R = Rz(φ) Ry(θ) Rz(ψ)``, with ``Rz`` and ``Ry`` the
    right-handed (counter-clockwise) rotations about the x-y-z frame's z and y axes: the
    template is turned by ψ about z, then by θ about y, then by φ about z, and a template point
    at offset ``t`` from its centre lands at ``R t`` from the particle centre. The returned
    ``zyx`` matrix is ``R`` with rows and columns reversed.
    """
    angles = torch.as_tensor(euler_zyz_deg)
    if not angles.is_floating_point():
        angles = angles.to(torch.float64)
    if angles.shape[-1:] != (3,):
        raise ValueError(f"euler_zyz_deg must have shape (..., 3), got {tuple(angles.shape)}")
    phi, theta, psi = torch.deg2rad(angles).unbind(-1)
    return _flip(_rz(phi) @ _ry(theta) @ _rz(psi))


def matrix_to_euler_zyz(rotation_zyx: torch.Tensor) -> torch.Tensor:
    """ZYZ Euler angles of rotation matrices; the inverse of :func:`euler_zyz_to_matrix`.

    Parameters
    ----------
    rotation_zyx : torch.Tensor
        `(..., 3, 3)` rotation matrices acting on ``zyx`` column vectors.

    Returns
    -------
    torch.Tensor
        `(..., 3)` angles ``(φ, θ, ψ)`` in degrees with ``θ`` in ``[0, 180]`` and ``φ``, ``ψ``
        in ``(-180, 180]``. When ``θ`` is 0 or 180 only ``φ ± ψ`` is defined; ``ψ`` is then 0.
    """
    r = _flip(torch.as_tensor(rotation_zyx).to(torch.float64))
    if r.shape[-2:] != (3, 3):
        raise ValueError(f"rotation_zyx must have shape (..., 3, 3), got {tuple(r.shape)}")
    theta = torch.arccos(r[..., 2, 2].clamp(-1.0, 1.0))
    sin_theta = torch.sin(theta)
    regular = sin_theta > 1e-9
    phi = torch.where(
        regular,
        torch.atan2(r[..., 1, 2], r[..., 0, 2]),
        torch.where(
            r[..., 2, 2] > 0,
            torch.atan2(r[..., 1, 0], r[..., 0, 0]),
            torch.atan2(-r[..., 1, 0], -r[..., 0, 0]),
        ),
    )
    psi = torch.where(regular, torch.atan2(r[..., 2, 1], -r[..., 2, 0]), torch.zeros_like(phi))
    angles = torch.rad2deg(torch.stack([phi, theta, psi], -1))
    # atan2 gives (-180, 180]; keep -180 out of it after rounding.
    return torch.where(angles <= -180.0 + 1e-12, angles + 360.0, angles)


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * float(torch.rand(1, generator=generator, dtype=torch.float64))


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    """Uniform integer in ``[low, high]``."""
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def _local_box(shape, centre, half_extent: float):
    """Slices of the box within ``half_extent`` of ``centre`` and its `(bd, bh, bw, 3)` offsets.

    Returns None if the box misses the volume.
    """
    slices, axes = [], []
    for size, c in zip(shape, centre, strict=True):
        lo = max(0, math.floor(c - half_extent))
        hi = min(size, math.ceil(c + half_extent) + 1)
        if lo >= hi:
            return None
        slices.append(slice(lo, hi))
        axes.append(torch.arange(lo, hi, dtype=torch.float32) - c)
    return tuple(slices), torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def _bilayer(distance_px: torch.Tensor, voxel_size_angstrom: float) -> torch.Tensor:
    """Density across a lipid bilayer at signed distances (voxels) from its mid-plane.

    The leaflets are Gaussians widened by half a voxel, so that thin layers stay visible on
    coarse grids instead of falling between voxel centres.
    """
    offset = _LEAFLET_OFFSET_ANGSTROM / voxel_size_angstrom
    sigma = math.hypot(_LEAFLET_SIGMA_ANGSTROM / voxel_size_angstrom, 0.5)
    return MEMBRANE_DENSITY * (
        torch.exp(-0.5 * ((distance_px - offset) / sigma) ** 2)
        + torch.exp(-0.5 * ((distance_px + offset) / sigma) ** 2)
    )


def _add_vesicle(volume, z_range, voxel_size_angstrom, generator) -> None:
    d, h, w = volume.shape
    z0, z1 = z_range
    thickness_px = (_LEAFLET_OFFSET_ANGSTROM + 3 * _LEAFLET_SIGMA_ANGSTROM) / voxel_size_angstrom
    low, high = (r / voxel_size_angstrom for r in _VESICLE_RADIUS_ANGSTROM)
    # A vesicle must fit in the ice, axes scaled by up to 1.1.
    high = min(high, ((z1 - z0) / 2 - thickness_px - 1) / 1.1, (h / 2 - thickness_px - 1) / 1.1)
    if high < 2.0:
        return
    radius = _uniform(min(low, high), high, generator)
    scale = torch.tensor([_uniform(0.9, 1.1, generator) for _ in range(3)])
    reach = radius * float(scale.max()) + thickness_px + 1
    centre = [
        _uniform(z0 + reach, max(z0 + reach, z1 - 1 - reach), generator),
        _uniform(reach, max(reach, h - 1 - reach), generator),
        _uniform(0.0, w - 1.0, generator),
    ]
    local = _local_box(volume.shape, centre, reach + 1)
    if local is None:
        return
    slices, offsets = local
    scaled_radius = (offsets / scale).norm(dim=-1)  # about the distance to a mild ellipsoid
    volume[slices] += _bilayer(scaled_radius - radius, voxel_size_angstrom)


def _add_sheet(volume, z_range, voxel_size_angstrom, generator) -> None:
    """A gently curved membrane patch: a cap of a large sphere, tilted at random."""
    d, h, w = volume.shape
    z0, z1 = z_range
    thickness_px = (_LEAFLET_OFFSET_ANGSTROM + 3 * _LEAFLET_SIGMA_ANGSTROM) / voxel_size_angstrom
    patch = _uniform(*_SHEET_PATCH_RADIUS_ANGSTROM, generator) / voxel_size_angstrom
    curvature = _uniform(*_SHEET_CURVATURE_RADIUS_ANGSTROM, generator) / voxel_size_angstrom
    # Mostly flat in the ice (normal within 30° of z), as membranes squeezed by thin ice are.
    normal = torch.randn(3, generator=generator, dtype=torch.float64)
    normal[0] = abs(float(normal[0])) + 2.0 * float(normal[1:].norm())
    normal = (normal / normal.norm()).float()
    margin = thickness_px + 1
    anchor = [
        _uniform(z0 + margin, max(z0 + margin, z1 - 1 - margin), generator),
        _uniform(0.0, h - 1.0, generator),
        _uniform(0.0, w - 1.0, generator),
    ]
    local = _local_box(volume.shape, anchor, patch + margin + 1)
    if local is None:
        return
    slices, offsets = local
    distance = (offsets + curvature * normal).norm(dim=-1) - curvature
    lateral = (offsets - (offsets @ normal)[..., None] * normal).norm(dim=-1)
    edge = torch.clamp((patch - lateral) / 3.0, 0.0, 1.0)
    sheet = _bilayer(distance, voxel_size_angstrom) * edge
    # Keep the sheet inside the ice.
    z = torch.arange(slices[0].start, slices[0].stop)[:, None, None]
    sheet = sheet * ((z >= z0) & (z < z1))
    volume[slices] += sheet


# The bookkeeping of taken space uses NumPy: its many small in-place updates are single
# calls to NumPy but would each start (and, on a busy machine, wait for) torch's threads.


@functools.lru_cache(maxsize=64)
def _ball(radius: float) -> np.ndarray:
    """`(2R + 1,) * 3` boolean mask of the voxels within ``radius`` of the central voxel.

    Cached and read-only.
    """
    r = math.ceil(radius)
    axis = np.arange(-r, r + 1, dtype=np.float64)
    r2 = axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2
    ball = r2 <= radius**2
    ball.setflags(write=False)
    return ball


def _ball_view(occupied: np.ndarray, centre: tuple[int, int, int], ball: np.ndarray):
    """The part of ``occupied`` under ``ball`` centred at ``centre`` and the matching ball part."""
    r = (ball.shape[0] - 1) // 2
    target, source = [], []
    for size, c in zip(occupied.shape, centre, strict=True):
        lo, hi = max(c - r, 0), min(c + r + 1, size)
        target.append(slice(lo, hi))
        source.append(slice(lo - (c - r), hi - (c - r)))
    return tuple(target), ball[tuple(source)]


def _try_claim(occupied: np.ndarray, centre: tuple[int, int, int], ball: np.ndarray) -> bool:
    """Claim the ball's voxels if none is taken; say whether it was."""
    target, mask = _ball_view(occupied, centre, ball)
    region = occupied[target]
    if bool((region & mask).any()):
        return False
    region |= mask
    return True


def _dilate(mask: np.ndarray, ball: np.ndarray) -> np.ndarray:
    """Voxels within the ball's reach of ``mask`` (binary dilation by FFT convolution)."""
    r = (ball.shape[0] - 1) // 2
    padded = F.pad(torch.from_numpy(mask).to(torch.float32)[None, None], (r,) * 6)[0, 0]
    kernel = torch.zeros_like(padded)
    kernel[: 2 * r + 1, : 2 * r + 1, : 2 * r + 1] = torch.from_numpy(ball.astype(np.float32))
    kernel = torch.roll(kernel, (-r, -r, -r), (0, 1, 2))  # centred on voxel 0
    spectrum = torch.fft.rfftn(padded) * torch.fft.rfftn(kernel)
    conv = torch.fft.irfftn(spectrum, s=padded.shape)
    inner = conv[r : r + mask.shape[0], r : r + mask.shape[1], r : r + mask.shape[2]]
    return (inner > 0.5).numpy()


def _place_particles(occupied, templates, jobs, *, z_range, pad, width_fov, generator):
    """Place particles, in the order of ``jobs``, at random free positions.

    ``jobs`` lists ``(template name, inside the field of view)``. A mask of the centres where
    the smallest particle's ball would touch nothing taken is kept up to date, so candidates
    are drawn from the free space even when it is crowded; each candidate is then checked
    exactly against the voxels taken. Returns the placed ``(name, zyx centre, inside)``.
    """
    d, h, width = occupied.shape
    z0, z1 = z_range
    claim_radius = {name: t.radius_px + _GAP_PX for name, t in templates.items()}
    smallest = min(claim_radius[name] for name, _ in jobs) if jobs else 0.0
    largest_half_box = max((t.box_px - 1) // 2 for t in templates.values())
    free = ~_dilate(occupied, _ball(smallest))
    placed: list[tuple[str, torch.Tensor, bool]] = []
    full: set[tuple[str, bool]] = set()  # (template, region) with no free position left
    for name, inside in jobs:
        r = math.ceil(templates[name].radius_px)
        # Recorded particles keep a box of the largest template's size in the field of view
        # (for per-particle measures with one box size); the others only need to stay in the
        # ice and the simulated width.
        m = max(r, largest_half_box) if inside else r
        z_lo, z_hi = max(z0 + r, m if inside else 0), min(z1 - 1 - r, d - 1 - m if inside else d)
        span_x = width_fov - 2 * m if inside else 2 * (pad - r)
        if (name, inside) in full or span_x <= 0 or z_hi < z_lo or h <= 2 * m:
            continue
        ball = _ball(claim_radius[name])
        centre = None
        for _ in range(_CANDIDATE_ROUNDS):
            size = (_CANDIDATES,)
            z = torch.randint(z_lo, z_hi + 1, size, generator=generator)
            y = torch.randint(m, h - m, size, generator=generator)
            k = torch.randint(0, span_x, size, generator=generator)
            if inside:
                x = pad + m + k
            else:  # left padding, or right padding for k beyond its width
                x = torch.where(k < pad - r, k, width - pad + r + (k - (pad - r)))
            z, y, x = z.numpy(), y.numpy(), x.numpy()
            hits = np.flatnonzero(free[z, y, x])[:_MAX_CHECKS].tolist()
            for i in hits:
                candidate = (int(z[i]), int(y[i]), int(x[i]))
                if _try_claim(occupied, candidate, ball):
                    centre = candidate
                    break
            if centre is not None:
                break
        if centre is None:
            full.add((name, inside))
            continue
        placed.append((name, torch.tensor(centre), inside))
        # No centre within the two claim radii of this one is free any more.
        target, mask = _ball_view(free, centre, _ball(claim_radius[name] + smallest))
        free[target] &= ~mask
    return placed


def _check_count(name: str, value) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _place_beads(occupied, n_beads, z_range, radius, generator) -> list[torch.Tensor]:
    """Positions of gold beads against the top or bottom ice surface; claims their space."""
    d, h, width = occupied.shape
    z0, z1 = z_range
    r = math.ceil(radius)
    ball = _ball(radius + _GAP_PX)
    beads = []
    for _ in range(n_beads):
        for _ in range(_MAX_TRIES):
            if z1 - z0 > 2 * r + 1:
                z = z0 + r if _randint(0, 1, generator) == 0 else z1 - 1 - r
            else:
                z = (z0 + z1 - 1) // 2
            y = _randint(r, h - 1 - r, generator) if h > 2 * r else h // 2
            x = _randint(0, width - 1, generator)
            if _try_claim(occupied, (z, y, x), ball):
                beads.append(torch.tensor([z, y, x]))
                break
    return beads


def _box_slices(shape, centre: torch.Tensor, n: int):
    """Slices of an ``n``-voxel box centred on ``centre`` clipped to ``shape``, both ways.

    Returns the slices into the volume and into the box, or None if they do not meet.
    """
    half = (n - 1) // 2
    target, source = [], []
    for size, c in zip(shape, centre.tolist(), strict=True):
        lo, hi = c - half, c + half + 1
        clo, chi = max(lo, 0), min(hi, size)
        if clo >= chi:
            return None
        target.append(slice(clo, chi))
        source.append(slice(clo - lo, chi - lo))
    return tuple(target), tuple(source)


def _render_particles(volume, templates, placed, rotations) -> None:
    """Add each placed particle, its template rotated about the box centre, to ``volume``."""
    for name in sorted({name for name, _, _ in placed}):
        template = templates[name]
        indices = [i for i, (n, _, _) in enumerate(placed) if n == name]
        box = template.box_px
        density = template.density[None].expand(len(indices), -1, -1, -1)
        rotated = rotate_and_crop(
            density, rotations[indices].to(torch.float32), box, interpolation="cubic"
        )
        # Outside the support sphere only interpolation noise remains; cut it off, and the
        # spline's slight undershoot next to steep edges too (densities are non-negative).
        axis = torch.arange(box, dtype=torch.float32) - (box - 1) / 2
        r2 = axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2
        rotated = rotated.clamp_min(0.0) * (r2 <= (template.radius_px + 1.0) ** 2)
        for k, i in enumerate(indices):
            slices = _box_slices(volume.shape, placed[i][1], box)
            if slices is not None:
                volume[slices[0]] += rotated[k][slices[1]]


def _render_beads(volume, beads, radius) -> None:
    """Set solid gold balls (with a one-voxel soft edge) where the beads are."""
    for centre in beads:
        local = _local_box(volume.shape, centre.tolist(), radius + 1.5)
        if local is None:
            continue
        slices, offsets = local
        ball = torch.clamp(radius + 0.5 - offsets.norm(dim=-1), 0.0, 1.0)
        volume[slices] = torch.maximum(volume[slices], BEAD_DENSITY * ball)


def simulate_sample(
    shape_zyx: tuple[int, int, int],
    templates: Mapping[str, Template],
    *,
    n_particles: int | None = None,
    ice_thickness_px: int | None = None,
    n_vesicles: int = 2,
    n_sheets: int = 1,
    n_beads: int = 4,
    bead_radius_angstrom: float = 50.0,
    lateral_padding_px: int = 0,
    generator: torch.Generator | None = None,
) -> SimulatedSample:
    """Simulate a slab of ice holding macromolecules, membranes and gold beads.

    Parameters
    ----------
    shape_zyx : tuple of int
        Shape `(d, h, w)` of the ground truth (the field of view).
    templates : mapping of str to Template
        Macromolecules to place (:func:`~deepdewedge.simulate.templates.load_templates`), all
        at the same voxel size; each particle takes one of them uniformly at random.
    n_particles : int, optional
        Number of particles placed entirely inside the field of view. By default, as many as
        fill 15% of the ice in the field of view with the spheres that hold them (about 100 in
        192 x 192 x 48 voxels at 10 Å). Particles that cannot be placed without overlap after
        many tries are left out (with a logged warning), so crowded samples may hold fewer.
    ice_thickness_px : int, optional
        Thickness of the ice slab along z, centred in the volume; everything lies inside it.
        Defaults to ``round(0.75 d)``.
    n_vesicles : int
        Number of vesicles (bilayers 4–5 nm thick, mildly ellipsoidal, radius 15–40 nm or as
        much as the ice allows), centred anywhere in the simulated width.
    n_sheets : int
        Number of flat (gently curved, 1.5–5 µm curvature radius) membrane patches of radius
        25–60 nm, lying within 30° of the ice plane.
    n_beads : int
        Number of gold beads, solid balls of density 5 (five times a protein's interior),
        resting against the top or the bottom surface of the ice.
    bead_radius_angstrom : float
        Radius of the gold beads in Å (10 nm beads by default).
    lateral_padding_px : int
        Extra width simulated on each side in x, beyond the field of view, so that tilted rays
        through the field of view cross sample all the way; it gets the same density of
        particles, membranes and beads.
    generator : torch.Generator, optional
        Source of all randomness; defaults to a fresh generator seeded with 0.

    Returns
    -------
    SimulatedSample
        The density `(d, h, w + 2 lateral_padding_px)` and the particle records.

    Notes
    -----
    Objects never overlap: membranes are drawn first, then beads and particles (largest
    first) are placed one by one at random integer positions where the sphere that holds them
    in any orientation, plus a one-voxel gap, touches nothing placed before. Each particle is
    its template rotated by a uniformly random rotation (cubic B-spline interpolation) about
    the template's centre of mass, which lands on the recorded voxel. Particles lie either
    inside the field of view, with a box of the largest template's size around them
    (recorded), or entirely outside it (in the padding).
    Densities are relative to a protein's interior of about 1: particles and membranes sit on
    an ice density of 0.15, and the gold displaces everything where it is.
    """
    if len(tuple(shape_zyx)) != 3 or any(
        not isinstance(s, numbers.Integral) or isinstance(s, bool) or s < 1 for s in shape_zyx
    ):
        raise ValueError(f"shape_zyx must be three positive integers, got {shape_zyx!r}")
    d, h, w = (int(s) for s in shape_zyx)
    if not templates:
        raise ValueError("templates must hold at least one template")
    voxel_sizes = {t.voxel_size_angstrom for t in templates.values()}
    if len(voxel_sizes) != 1:
        raise ValueError(f"templates must share one voxel size, got {sorted(voxel_sizes)}")
    voxel_size = voxel_sizes.pop()
    n_vesicles = _check_count("n_vesicles", n_vesicles)
    n_sheets = _check_count("n_sheets", n_sheets)
    n_beads = _check_count("n_beads", n_beads)
    pad = _check_count("lateral_padding_px", lateral_padding_px)
    thickness = round(0.75 * d) if ice_thickness_px is None else ice_thickness_px
    if not isinstance(thickness, numbers.Integral) or not 1 <= thickness <= d:
        raise ValueError(f"ice_thickness_px must be an integer in [1, {d}], got {thickness!r}")
    if not (math.isfinite(bead_radius_angstrom) and bead_radius_angstrom > 0):
        raise ValueError(f"bead_radius_angstrom must be positive, got {bead_radius_angstrom!r}")
    z0 = (d - int(thickness)) // 2
    z1 = z0 + int(thickness)
    if n_particles is None:
        sphere = sum(4 / 3 * math.pi * t.radius_px**3 for t in templates.values()) / len(templates)
        n_particles = round(_DEFAULT_FILL * h * w * (z1 - z0) / sphere)
    n_particles = _check_count("n_particles", n_particles)
    too_big = [t.name for t in templates.values() if 2 * math.ceil(t.radius_px) + 1 > z1 - z0]
    if too_big and n_particles > 0:
        raise ValueError(
            f"ice_thickness_px {z1 - z0} is thinner than template(s) {', '.join(too_big)}; "
            "make the ice thicker or use a larger voxel size"
        )
    if generator is None:
        generator = torch.Generator().manual_seed(0)

    width = w + 2 * pad
    volume = torch.zeros((d, h, width), dtype=torch.float32)
    for _ in range(n_vesicles):
        _add_vesicle(volume, (z0, z1), voxel_size, generator)
    for _ in range(n_sheets):
        _add_sheet(volume, (z0, z1), voxel_size, generator)
    occupied = volume > _OCCUPIED
    # Dilate the membranes by the gap.
    occupied = (
        F.max_pool3d(occupied[None, None].float(), 2 * _GAP_PX + 1, stride=1, padding=_GAP_PX)[0, 0]
        > 0
    ).numpy()
    # Objects per region scale with the area, so the padding is as crowded as the field.
    area_ratio = width / w
    bead_radius = bead_radius_angstrom / voxel_size
    beads = _place_beads(occupied, round(n_beads * area_ratio), (z0, z1), bead_radius, generator)
    names = sorted(templates)
    n_outside = round(n_particles * (width - w) / w) if pad > 0 else 0
    choice = torch.randint(len(names), (n_particles + n_outside,), generator=generator).tolist()
    jobs = [(names[k], i < n_particles) for i, k in enumerate(choice)]
    jobs.sort(key=lambda job: -templates[job[0]].radius_px)  # largest first, stable
    placed = _place_particles(
        occupied, templates, jobs, z_range=(z0, z1), pad=pad, width_fov=w, generator=generator
    )
    n_inside = sum(1 for _, _, inside in placed if inside)
    if n_inside < n_particles:
        log.warning(
            "placed %d of %d particles without overlap; the sample is too crowded for more",
            n_inside,
            n_particles,
        )
    rotations = sample_rotations(len(placed), generator=generator, dtype=torch.float64)
    _render_particles(volume, templates, placed, rotations)
    volume[z0:z1] += ICE_DENSITY
    _render_beads(volume, beads, bead_radius)
    volume[:z0] = 0.0
    volume[z1:] = 0.0

    particles = []
    # Record the field-of-view particles in a reading order: by z, then y, then x.
    order = sorted(
        (i for i, (_, _, inside) in enumerate(placed) if inside),
        key=lambda i: placed[i][1].tolist(),
    )
    for index, i in enumerate(order):
        name, centre, _ = placed[i]
        rotation = rotations[i]
        euler = matrix_to_euler_zyz(rotation)
        z, y, x = centre.tolist()
        particles.append(
            Particle(
                index=index,
                template=name,
                centre_zyx_px=(z, y, x - pad),
                euler_zyz_deg=tuple(float(a) for a in euler),
                rotation_zyx=rotation,
                box_px=templates[name].box_px,
                radius_px=templates[name].radius_px,
            )
        )
    return SimulatedSample(
        volume=volume,
        lateral_padding_px=pad,
        particles=particles,
        n_particles_outside=len(placed) - n_inside,
        ice_z_range_px=(z0, z1),
    )
