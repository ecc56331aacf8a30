"""Fourier-space helpers: frequency grids and missing-wedge masks (plain and rotated)."""

from __future__ import annotations

import math

import torch


def tilt_range_from_mw_angle(mw_angle_deg: float) -> tuple[float, float]:
    """Symmetric tilt range whose missing wedge has full opening angle `mw_angle_deg`.

    Examples
    --------
    >>> tilt_range_from_mw_angle(60.0)
    (-60.0, 60.0)
    """
    if not 0.0 <= mw_angle_deg < 180.0:
        raise ValueError(f"mw_angle must lie in [0, 180) degrees, got {mw_angle_deg}")
    half = 90.0 - mw_angle_deg / 2.0
    return (-half, half)


def frequency_grid(
    shape_zyx: tuple[int, int, int],
    *,
    rfft: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Frequencies of a 3D DFT in cycles per voxel, unshifted.

    Parameters
    ----------
    shape_zyx
        Real-space shape `(d, h, w)`.
    rfft
        If True, the last axis holds only the `w // 2 + 1` non-negative frequencies.
    device
        Device of the output.

    Returns
    -------
    torch.Tensor
        `(d, h, w', 3)` with the last axis holding `(kz, ky, kx)`; `w' = w // 2 + 1` if `rfft`.
    """
    d, h, w = shape_zyx
    kz = torch.fft.fftfreq(d, device=device)
    ky = torch.fft.fftfreq(h, device=device)
    kx = torch.fft.rfftfreq(w, device=device) if rfft else torch.fft.fftfreq(w, device=device)
    return torch.stack(torch.meshgrid(kz, ky, kx, indexing="ij"), dim=-1)


def wedge_test(
    kzyx: torch.Tensor, *, tilt_range_deg: tuple[float, float] | torch.Tensor
) -> torch.Tensor:
    """Which frequencies a single-axis tilt series over `tilt_range_deg` measured.

    Parameters
    ----------
    kzyx
        `(..., 3)` frequency coordinates `(kz, ky, kx)`.
    tilt_range_deg
        `(tilt_min, tilt_max)` in degrees, `-90 <= tilt_min <= tilt_max <= 90`; or a `(b, 2)`
        tensor of one range per volume of a batch, for coordinates `(d, h, w, 3)` shared by
        the batch or `(b, d, h, w, 3)` of each volume.

    Returns
    -------
    torch.Tensor
        `(...)` float mask (`(b, d, h, w)` for a batch of ranges): 1 where measured, 0 inside
        the missing wedge.

    Notes
    -----
    A tilt at angle α measures the central plane whose trace in the (kz, kx) plane makes
    angle α with the kx axis. A frequency with ``ψ = atan(kz / kx)`` (folded into
    (-90°, 90°]) is therefore measured iff ``tilt_min <= ψ <= tilt_max``; ``ky`` plays no
    part. The test is written without division so that the zero frequency is kept and the
    boundary is exact: for ``kx >= 0`` (after folding ``k -> -k``), ``ψ <= β`` iff
    ``kz cos β <= kx sin β``.
    """
    if isinstance(tilt_range_deg, torch.Tensor):
        ranges = tilt_range_deg.to(torch.float64)
        if ranges.dim() != 2 or ranges.shape[1] != 2:
            raise ValueError(f"a batch of tilt ranges must be (b, 2), got {tuple(ranges.shape)}")
        if not bool(((-90 <= ranges[:, 0]) & (ranges[:, 0] <= ranges[:, 1])).all()) or bool(
            (ranges[:, 1] > 90).any()
        ):
            raise ValueError("tilt ranges must satisfy -90 <= min <= max <= 90")
        radians = torch.deg2rad(ranges).to(kzyx.device).view(-1, 2, 1, 1, 1)
        lo, hi = radians[:, 0].to(kzyx.dtype), radians[:, 1].to(kzyx.dtype)
        cos_lo, sin_lo, cos_hi, sin_hi = lo.cos(), lo.sin(), hi.cos(), hi.sin()
    else:
        lo, hi = (math.radians(a) for a in tilt_range_deg)
        if not -math.pi / 2 <= lo <= hi <= math.pi / 2:
            raise ValueError(
                f"tilt range must satisfy -90 <= min <= max <= 90, got {tilt_range_deg}"
            )
        cos_lo, sin_lo, cos_hi, sin_hi = math.cos(lo), math.sin(lo), math.cos(hi), math.sin(hi)
    kz, kx = kzyx[..., 0], kzyx[..., 2]
    # Fold onto the half-plane kx >= 0; the mask of a real volume is point symmetric.
    flip = (kx < 0) | ((kx == 0) & (kz < 0))
    kz = torch.where(flip, -kz, kz)
    kx = torch.where(flip, -kx, kx)
    below_hi = kz * cos_hi <= kx * sin_hi + 1e-12
    above_lo = kz * cos_lo >= kx * sin_lo - 1e-12
    # On the kz axis (kx == 0, kz > 0) ψ = 90°, kept only if the range reaches ±90°.
    return (below_hi & above_lo).to(kzyx.dtype)


def missing_wedge_mask(
    shape_zyx: tuple[int, int, int],
    *,
    mw_angle_deg: float | None = None,
    tilt_range_deg: tuple[float, float] | torch.Tensor | None = None,
    rfft: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Binary missing-wedge mask M of a volume of shape `shape_zyx`, unshifted.

    Give either `mw_angle_deg` (symmetric range) or `tilt_range_deg` (possibly asymmetric),
    or a `(b, 2)` tensor of tilt ranges for a batch of masks, one per volume.

    Returns
    -------
    torch.Tensor
        `(d, h, w')` float32, 1 where measured, or `(b, d, h, w')` for a batch of ranges;
        `w' = w // 2 + 1` if `rfft`.
    """
    tilt_range = _resolve_range(mw_angle_deg, tilt_range_deg)
    return wedge_test(
        frequency_grid(shape_zyx, rfft=rfft, device=device), tilt_range_deg=tilt_range
    )


def rotated_missing_wedge_mask(
    shape_zyx: tuple[int, int, int],
    rotmats: torch.Tensor,
    *,
    mw_angle_deg: float | None = None,
    tilt_range_deg: tuple[float, float] | torch.Tensor | None = None,
    rfft: bool = True,
) -> torch.Tensor:
    """Missing-wedge masks M_φ of volumes rotated by `rotmats`, computed exactly.

    Parameters
    ----------
    shape_zyx
        Real-space shape `(d, h, w)`.
    rotmats
        `(b, 3, 3)` rotations acting on zyx vectors (``v_R(p) = v(Rᵀ p)``).
    mw_angle_deg, tilt_range_deg
        The wedge before rotation, as in :func:`missing_wedge_mask`; a `(b, 2)` tensor of
        tilt ranges gives each volume its own.
    rfft
        If True, only the `w // 2 + 1` non-negative kx frequencies.

    Returns
    -------
    torch.Tensor
        `(b, d, h, w')` float32 masks on the device of `rotmats`.

    Notes
    -----
    Rotating a volume by R rotates its Fourier transform by R: ``F(v_R)(k) = F(v)(Rᵀ k)``.
    So the rotated mask is the wedge test evaluated at ``Rᵀ k`` — exact, with no
    interpolation of a voxel mask and no off-centre rotation for even sizes.
    """
    tilt_range = _resolve_range(mw_angle_deg, tilt_range_deg)
    k = frequency_grid(shape_zyx, rfft=rfft, device=rotmats.device).to(rotmats.dtype)
    # (Rᵀ k)_i = sum_j R_ji k_j
    k_rot = torch.einsum("bji,dhwj->bdhwi", rotmats, k)
    return wedge_test(k_rot, tilt_range_deg=tilt_range)


def apply_fourier_mask(volumes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Multiply real volumes by a mask in Fourier space.

    Parameters
    ----------
    volumes
        `(..., d, h, w)` real.
    mask
        rfft-layout mask broadcastable to `(..., d, h, w // 2 + 1)`.

    Returns
    -------
    torch.Tensor
        `(..., d, h, w)` real, same dtype as `volumes`.
    """
    shape = volumes.shape[-3:]
    spectrum = torch.fft.rfftn(volumes.float(), dim=(-3, -2, -1))
    out = torch.fft.irfftn(spectrum * mask, s=shape, dim=(-3, -2, -1))
    return out.to(volumes.dtype)


def _resolve_range(
    mw_angle_deg: float | None, tilt_range_deg: tuple[float, float] | torch.Tensor | None
) -> tuple[float, float] | torch.Tensor:
    if (mw_angle_deg is None) == (tilt_range_deg is None):
        raise ValueError("give exactly one of mw_angle_deg and tilt_range_deg")
    if isinstance(tilt_range_deg, torch.Tensor):
        return tilt_range_deg
    if tilt_range_deg is not None:
        return (float(tilt_range_deg[0]), float(tilt_range_deg[1]))
    return tilt_range_from_mw_angle(float(mw_angle_deg))
