"""Uniform random rotations and batched rotate-and-crop of sub-tomograms.

Rotations follow ``docs/conventions.md``: a `(3, 3)` matrix ``R`` acts on ``zyx`` column
vectors and rotating a volume ``v`` gives ``v_R(p) = v(Rᵀ p)``, with ``p`` measured from the
centre ``(n - 1) / 2`` of each axis. Everything is batched over the samples of a training batch
and runs on whichever device the inputs live on, with no Python loop over samples and no
host-device synchronisation.

Boundary policy: the volume is extended by *whole-sample mirror symmetry* (``a b c … x y z``
continues as ``… c b | a b c … x y z | y x …``, the edge voxel is not repeated; scipy's
``mode="mirror"``, PyTorch's ``"reflect"`` padding). The B-spline prefilter and both
interpolations use this same extension, so the ``"cubic"`` result equals
``scipy.ndimage.map_coordinates(order=3, mode="mirror")`` everywhere and the ``"linear"`` one
equals ``order=1, mode="mirror"``. Output points whose source lies outside the input therefore
show mirrored content rather than zeros; callers crop with a margin (input at least √3 times
the output size) so that this never happens.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

__all__ = ["bspline_prefilter", "rotate_and_crop", "sample_rotations"]

_INTERPOLATIONS = ("cubic", "linear")


def sample_rotations(
    n: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Draw rotations uniformly at random from SO(3) (Haar measure).

    Parameters
    ----------
    n
        Number of rotations, ``n >= 0``.
    generator
        CPU random number generator. The random numbers are always drawn on the CPU and then
        moved to `device` (asynchronously on CUDA), so a seeded generator gives the same
        rotations on every device.
    device
        Device of the returned tensor (default: CPU).
    dtype
        Floating dtype of the returned tensor.

    Returns
    -------
    torch.Tensor
        `(n, 3, 3)` proper rotation matrices acting on ``zyx`` column vectors.

    Notes
    -----
    A standard normal 4-vector, normalised, is uniform on the unit 3-sphere; read as a unit
    quaternion it is a Haar-uniform rotation, because the quaternion double cover maps the
    uniform measure on S³ to the Haar measure on SO(3) [1]_. The Haar measure is invariant under
    relabelling the axes, so the same construction is uniform in ``zyx`` order.

    References
    ----------
    .. [1] K. Shoemake, "Uniform random rotations", Graphics Gems III, pp. 124-132, 1992.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    quats = torch.randn(n, 4, generator=generator, dtype=torch.float64, device="cpu")
    quats = quats / torch.linalg.vector_norm(quats, dim=-1, keepdim=True)
    rotmats = _quaternion_to_matrix_zyx(quats).to(dtype)
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda":
        rotmats = rotmats.pin_memory()  # lets the copy below run without a host sync
    return rotmats.to(device, non_blocking=True)


def _quaternion_to_matrix_zyx(quats: torch.Tensor) -> torch.Tensor:
    """Convert unit quaternions `(..., 4)` ``(w, x, y, z)`` to `(..., 3, 3)` ``zyx`` matrices."""
    w, x, y, z = quats.unbind(-1)
    xyz_rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ]
    # Reverse rows and columns: the same linear map written in zyx coordinates.
    zyx_rows = [torch.stack(row[::-1], dim=-1) for row in xyz_rows[::-1]]
    return torch.stack(zyx_rows, dim=-2)


def bspline_prefilter(volumes: torch.Tensor) -> torch.Tensor:
    """Compute cubic B-spline interpolation coefficients of volumes.

    Parameters
    ----------
    volumes
        `(..., d, h, w)` real volumes; any leading batch dimensions.

    Returns
    -------
    torch.Tensor
        `(..., d, h, w)` coefficients ``c`` such that the cubic B-spline
        ``s(x) = Σ_k c[k] β³(x - k)`` equals `volumes` at every voxel centre, with ``c`` extended
        by whole-sample mirror symmetry beyond the borders.

    Notes
    -----
    At the lattice points the B-spline acts as the filter ``(1, 4, 1) / 6``, whose transfer
    function is ``(4 + 2 cos(2πk / m)) / 6 >= 1/3``. Each axis of length ``n`` is mirror-extended
    to period ``m = 2n - 2`` (the extension is symmetric, so no wrap-around jump appears at the
    borders) and the filter is inverted by division in Fourier space; the result, cut back to
    ``n`` samples, is the exact solution of the interpolation problem with mirror boundaries
    (the one used by ``scipy.ndimage.spline_filter(order=3, mode="mirror")``). The work is
    separable: three 1-D real FFTs batched over all other dimensions.
    """
    if volumes.ndim < 3:
        raise ValueError(f"volumes must have shape (..., d, h, w), got {tuple(volumes.shape)}")
    if not volumes.is_floating_point():
        raise ValueError(f"volumes must be a floating tensor, got {volumes.dtype}")
    coeffs = volumes
    for _ in range(3):
        # Filter the (contiguous) last axis, then cycle it to the front: w, then h, then d.
        coeffs = _prefilter_last_axis(coeffs).movedim(-1, -3)
    return coeffs.contiguous()


def _prefilter_last_axis(x: torch.Tensor) -> torch.Tensor:
    """Invert the ``(1, 4, 1) / 6`` filter along the last axis of `x` with mirror boundaries."""
    n = x.shape[-1]
    if n == 1:
        return x  # a constant line: coefficients equal the samples
    work_dtype = torch.promote_types(x.dtype, torch.float32)
    if x.device.type == "cpu":
        # On CPU a matmul with the cached n × n inverse is several times faster than the FFTs
        # (odd FFT lengths such as 2 · 116 - 2); on GPUs the FFT is cheap and never runs in TF32.
        return (x.to(work_dtype) @ _prefilter_matrix(n, work_dtype).T).to(x.dtype)
    return _prefilter_fft(x.to(work_dtype)).to(x.dtype)


def _prefilter_fft(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1]
    period = 2 * n - 2
    extended = torch.cat([x, x[..., 1 : n - 1].flip(-1)], dim=-1)
    spectrum = torch.fft.rfft(extended, dim=-1)
    k = torch.arange(period // 2 + 1, device=x.device, dtype=x.dtype)
    spectrum *= 6 / (4 + 2 * torch.cos((2 * math.pi / period) * k))
    return torch.fft.irfft(spectrum, n=period, dim=-1)[..., :n]


@functools.lru_cache(maxsize=16)
def _prefilter_matrix(n: int, dtype: torch.dtype) -> torch.Tensor:
    """`(n, n)` matrix of the 1-D prefilter (rows: outputs), computed in float64."""
    return _prefilter_fft(torch.eye(n, dtype=torch.float64)).T.contiguous().to(dtype)


def rotate_and_crop(
    volumes: torch.Tensor,
    rotmats: torch.Tensor,
    out_size: int | tuple[int, int, int],
    *,
    interpolation: str = "cubic",
) -> torch.Tensor:
    """Rotate each volume of a batch about its centre and return the centred crop.

    Parameters
    ----------
    volumes
        `(b, c, d, h, w)` or `(b, d, h, w)` volumes. The `c` channels of a sample (e.g. the
        sub-tomograms of both half-tomograms) share that sample's rotation.
    rotmats
        `(b, 3, 3)` rotation matrices acting on ``zyx`` column vectors, one per sample; best on
        the device of `volumes` (e.g. from `sample_rotations`), else they are copied there.
    out_size
        Output size ``(d', h', w')``, or one int for a cube.
    interpolation
        ``"cubic"`` (cubic B-spline interpolation with an exact prefilter; accurate up to high
        frequencies) or ``"linear"`` (trilinear; an order of magnitude cheaper, but it
        attenuates fine detail).

    Returns
    -------
    torch.Tensor
        `(b, c, d', h', w')` or `(b, d', h', w')`, matching the layout of `volumes`, with the
        dtype of `volumes`.

    Notes
    -----
    Output voxel ``j`` sits at ``p = j - (n_out - 1) / 2`` from the centre and takes the value of
    the input at continuous voxel coordinate ``Rᵀ p + (n_in - 1) / 2`` (per axis), i.e.
    ``out(p) = in(Rᵀ p)``. When ``n_in - n_out`` is even the output grid lies on the input
    lattice and the identity rotation is an exact centre crop (when it is odd the grid sits
    half a voxel off the lattice along that axis). A rotation by 90° that takes axis ``a``
    to axis ``b`` (``R e_a = e_b``, ``R e_b = -e_a``) equals ``torch.rot90(v, 1, dims=(a, b))``
    on a cube.

    Points beyond the input use whole-sample mirror symmetry (see the module docstring); with a
    margin of √3 between input and output sizes no output point needs them.

    The cubic B-spline is evaluated with 8 trilinear fetches of the prefiltered coefficients
    instead of 64 point fetches [1]_: along each axis the four weights ``w0..w3`` at the
    fractional offset ``t`` combine into two linear fetches at ``i - 1 + w1 / (w0 + w1)`` and
    ``i + 1 + w3 / (w2 + w3)`` weighted by ``w0 + w1`` and ``w2 + w3``. All 8 fetches of all
    samples and channels happen in one ``grid_sample`` call.

    References
    ----------
    .. [1] C. Sigg and M. Hadwiger, "Fast third-order texture filtering", GPU Gems 2,
       chapter 20, 2005.
    """
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {interpolation!r}")
    if volumes.ndim not in (4, 5):
        raise ValueError(
            f"volumes must have shape (b, c, d, h, w) or (b, d, h, w), got {tuple(volumes.shape)}"
        )
    if not volumes.is_floating_point():
        raise ValueError(f"volumes must be a floating tensor, got {volumes.dtype}")
    batch = volumes.shape[0]
    if rotmats.shape != (batch, 3, 3):
        raise ValueError(
            f"rotmats must have shape ({batch}, 3, 3) to match volumes, got {tuple(rotmats.shape)}"
        )
    out_shape = (out_size,) * 3 if isinstance(out_size, int) else tuple(out_size)
    if len(out_shape) != 3 or any(s < 1 for s in out_shape):
        raise ValueError(f"out_size must be a positive int or 3 positive ints, got {out_size}")
    in_shape = tuple(volumes.shape[-3:])
    if any(s < 2 for s in in_shape):
        raise ValueError(f"each spatial size of volumes must be at least 2, got {in_shape}")

    squeeze_channels = volumes.ndim == 4
    x = volumes.unsqueeze(1) if squeeze_channels else volumes
    work_dtype = torch.promote_types(x.dtype, torch.float32)
    x = x.to(work_dtype)
    # Per-axis constants stay Python floats: no small host-to-device copies, no syncs.
    coords = _source_coordinates(rotmats.to(device=x.device, dtype=work_dtype), in_shape, out_shape)
    if interpolation == "linear":
        normalised = [_normalise(c, n) for c, n in zip(coords, in_shape, strict=True)]
        out = _fetch_linear(x, torch.stack(normalised[::-1], dim=-1))  # xyz order
    else:
        out = _cubic_bspline_sample(bspline_prefilter(x), coords, in_shape)
    if squeeze_channels:
        out = out.squeeze(1)
    return out.to(volumes.dtype)


def _source_coordinates(
    rotmats: torch.Tensor, in_shape: tuple[int, ...], out_shape: tuple[int, ...]
) -> list[torch.Tensor]:
    """Input voxel coordinates ``[z, y, x]``, each `(b, d', h', w')`, of every output voxel."""
    d_out, h_out, w_out = out_shape
    kwargs = {"device": rotmats.device, "dtype": rotmats.dtype}
    p_z = (torch.arange(d_out, **kwargs) - (d_out - 1) / 2).view(1, d_out, 1, 1)
    p_y = (torch.arange(h_out, **kwargs) - (h_out - 1) / 2).view(1, 1, h_out, 1)
    p_x = (torch.arange(w_out, **kwargs) - (w_out - 1) / 2).view(1, 1, 1, w_out)
    r = rotmats[:, :, :, None, None, None]  # (b, 3, 3, 1, 1, 1)
    # (Rᵀ p)_i = Σ_j R_ji p_j, written out elementwise: a matmul could run in TF32 on CUDA.
    return [
        r[:, 0, i] * p_z + r[:, 1, i] * p_y + r[:, 2, i] * p_x + (n_in - 1) / 2
        for i, n_in in enumerate(in_shape)
    ]


def _normalise(coord: torch.Tensor, n: int) -> torch.Tensor:
    """Map voxel coordinates along an axis of size `n` to ``grid_sample``'s ``[-1, 1]``."""
    return coord * (2 / (n - 1)) - 1


def _fetch_linear(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Sample `x` `(b, c, d, h, w)` trilinearly at `grid` `(b, d', h', w', 3)` (normalised xyz).

    Returns `(b, c, d', h', w')`. Align-corners normalisation (voxel ``0`` at ``-1``, voxel
    ``n - 1`` at ``+1``) makes ``"reflection"`` padding a whole-sample mirror about the centres
    of the edge voxels.
    """
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)


def _cubic_bspline_sample(
    coeffs: torch.Tensor, coords: list[torch.Tensor], in_shape: tuple[int, ...]
) -> torch.Tensor:
    """Evaluate the cubic B-spline of `coeffs` `(b, c, d, h, w)` at voxel coordinates `coords`.

    `coords` holds the ``z, y, x`` coordinates, each `(b, d', h', w')`; returns the
    `(b, c, d', h', w')` spline values.
    """
    b, d_out, h_out, w_out = coords[0].shape
    positions, upper_weights = [], []
    for coord, n in zip(coords, in_shape, strict=True):
        base = torch.floor(coord)
        t = coord - base
        t2 = t * t
        t3 = t2 * t
        w0 = (1 - 3 * t + 3 * t2 - t3) / 6
        w1 = (4 - 6 * t2 + 3 * t3) / 6
        w3 = t3 / 6
        g1 = 1 - (w0 + w1)  # weight of the upper fetch, w2 + w3
        lower = _normalise(base - 1 + w1 / (w0 + w1), n)
        upper = _normalise(base + 1 + w3 / g1, n)
        positions.append(torch.stack([lower, upper], dim=-1))  # (b, d', h', w', 2)
        upper_weights.append(g1)
    # Corner (i, j, k) takes z from branch i, y from branch j and x from branch k; the 8 corners
    # of an output voxel are adjacent in the grid, so their fetches share cache lines.
    corner_shape = (b, d_out, h_out, w_out, 2, 2, 2)
    pos_z = positions[0][..., :, None, None].expand(corner_shape)
    pos_y = positions[1][..., None, :, None].expand(corner_shape)
    pos_x = positions[2][..., None, None, :].expand(corner_shape)
    grid = torch.stack([pos_x, pos_y, pos_z], dim=-1).view(b, d_out, h_out, 8 * w_out, 3)
    fetched = _fetch_linear(coeffs, grid).view(b, coeffs.shape[1], d_out, h_out, w_out, 2, 2, 2)
    # value = (1 - g1) * lower + g1 * upper along x, then y, then z.
    g1_z, g1_y, g1_x = (g1.unsqueeze(1) for g1 in upper_weights)  # (b, 1, d', h', w')
    out = torch.lerp(fetched[..., 0], fetched[..., 1], g1_x[..., None, None])
    out = torch.lerp(out[..., 0], out[..., 1], g1_y[..., None])
    return torch.lerp(out[..., 0], out[..., 1], g1_z)
