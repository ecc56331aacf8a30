"""Sliding-window grids over volumes: tile starts, tile extraction and seamless blending.

The same grids serve two purposes: cutting training sub-tomograms out of a tomogram, and
applying a fitted network to a whole tomogram in overlapping tiles (see
:mod:`deepdewedge.refine`). Tiles always sit on a Cartesian grid, the product of one list of
starts per axis, and blending weights are separable, so every per-voxel quantity of the
reassembly factorises into three 1D profiles (see :func:`weight_normaliser_1d`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "blending_weights",
    "blending_window_1d",
    "extract_windows",
    "grid_starts",
    "weight_normaliser_1d",
    "window_starts",
]

_AXES = ("z", "y", "x")


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start indices of windows sliding along one axis and covering all of it.

    Parameters
    ----------
    size : int
        Length of the axis, in voxels.
    window : int
        Length of each window, in voxels; at most `size`.
    stride : int
        Step between consecutive starts, in voxels; at least 1.

    Returns
    -------
    list[int]
        Increasing starts ``0, stride, 2 * stride, ...`` followed, if the regular grid does not
        reach the end, by ``size - window`` so that the last window is flush with the end.
        Every index in ``[0, size)`` lies in at least one window and no start repeats.

    Raises
    ------
    ValueError
        If `window` exceeds `size`, or `window`, `size` or `stride` is smaller than 1.
    """
    if size < 1 or window < 1:
        raise ValueError(f"size ({size}) and window ({window}) must both be at least 1")
    if stride < 1:
        raise ValueError(f"stride must be at least 1, got {stride}")
    if window > size:
        raise ValueError(
            f"window ({window}) is larger than the axis ({size}); use a window of at most "
            f"{size} voxels or pad the volume first"
        )
    last = size - window
    starts = list(range(0, last + 1, stride))
    if starts[-1] != last:
        starts.append(last)
    return starts


def grid_starts(
    shape_zyx: Sequence[int], window_zyx: Sequence[int], strides_zyx: Sequence[int]
) -> torch.Tensor:
    """Start corners of a Cartesian grid of windows covering a volume.

    Parameters
    ----------
    shape_zyx : Sequence[int]
        Volume shape `(d, h, w)`.
    window_zyx : Sequence[int]
        Window shape `(wd, wh, ww)`, at most the volume shape along each axis.
    strides_zyx : Sequence[int]
        Step between windows along each axis, each at least 1.

    Returns
    -------
    torch.Tensor
        `(n, 3)` int64 start corners `(z, y, x)`, the Cartesian product of
        :func:`window_starts` along each axis, z varying slowest and x fastest.

    Raises
    ------
    ValueError
        If an argument does not have three entries or an axis is invalid for
        :func:`window_starts` (the message names the axis).
    """
    shape_zyx = _three("shape_zyx", shape_zyx)
    window_zyx = _three("window_zyx", window_zyx)
    strides_zyx = _three("strides_zyx", strides_zyx)
    per_axis = []
    for axis, size, window, stride in zip(_AXES, shape_zyx, window_zyx, strides_zyx, strict=True):
        try:
            starts = window_starts(size, window, stride)
        except ValueError as err:
            raise ValueError(f"along {axis}: {err}") from None
        per_axis.append(torch.tensor(starts, dtype=torch.int64))
    mesh = torch.meshgrid(*per_axis, indexing="ij")
    return torch.stack([m.reshape(-1) for m in mesh], dim=1)


def extract_windows(
    volume: torch.Tensor | np.ndarray,
    starts: torch.Tensor | np.ndarray | Sequence[Sequence[int]],
    window_zyx: Sequence[int],
    *,
    reflect: bool = False,
) -> torch.Tensor:
    """Copy windows out of a volume, reading only the voxels they need.

    Parameters
    ----------
    volume : torch.Tensor or np.ndarray
        `(d, h, w)` volume of any real dtype. A `np.memmap` is read window by window and never
        loaded whole.
    starts : torch.Tensor or np.ndarray or Sequence[Sequence[int]]
        `(n, 3)` integer start corners `(z, y, x)`, e.g. from :func:`grid_starts`.
    window_zyx : Sequence[int]
        Window shape `(wd, wh, ww)`.
    reflect : bool, default False
        If False, every window must lie inside the volume. If True, windows may extend past
        its borders (negative starts included) and read the volume as if it were padded by
        mirror reflection without repeating the edge voxel (numpy's ``"reflect"`` mode,
        repeated as often as needed, so windows larger than the volume work too).

    Returns
    -------
    torch.Tensor
        `(n, wd, wh, ww)` float32 copy, on the device of `volume` for a tensor and on the CPU
        for an array.

    Raises
    ------
    ValueError
        If `volume` is not 3D, `starts` is not `(n, 3)`, a window size is smaller than 1, or
        (with ``reflect=False``) a window reaches outside the volume.
    """
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3D (d, h, w), got shape {tuple(volume.shape)}")
    window_zyx = _three("window_zyx", window_zyx)
    if min(window_zyx) < 1:
        raise ValueError(f"window sizes must be at least 1, got {window_zyx}")
    starts_np = np.asarray(
        starts.cpu() if isinstance(starts, torch.Tensor) else starts, dtype=np.int64
    )
    if starts_np.size == 0:
        starts_np = starts_np.reshape(0, 3)
    if starts_np.ndim != 2 or starts_np.shape[1] != 3:
        raise ValueError(f"starts must have shape (n, 3), got {starts_np.shape}")
    shape = tuple(int(s) for s in volume.shape)
    if not reflect:
        lows = starts_np.min(axis=0, initial=0)
        highs = (starts_np + np.asarray(window_zyx)).max(axis=0, initial=0)
        for axis, low, high, size in zip(_AXES, lows, highs, shape, strict=True):
            if low < 0 or high > size:
                raise ValueError(
                    f"windows reach [{low}, {high}) along {axis} but the volume has {size} "
                    "voxels there; fix the starts or pass reflect=True to mirror the borders"
                )

    if isinstance(volume, torch.Tensor):
        tiles = torch.empty(
            (len(starts_np), *window_zyx), dtype=torch.float32, device=volume.device
        )
        for i, corner in enumerate(starts_np):
            block_slices, gather = _window_index(corner, window_zyx, shape)
            block = volume[block_slices]
            if gather is not None:
                iz, iy, ix = (torch.from_numpy(idx).to(volume.device) for idx in gather)
                block = block[iz[:, None, None], iy[None, :, None], ix[None, None, :]]
            tiles[i] = block
        return tiles
    tiles_np = np.empty((len(starts_np), *window_zyx), dtype=np.float32)
    for i, corner in enumerate(starts_np):
        block_slices, gather = _window_index(corner, window_zyx, shape)
        block = volume[block_slices]
        if gather is not None:
            block = np.asarray(block)[np.ix_(*gather)]
        tiles_np[i] = block
    return torch.from_numpy(tiles_np)


def blending_window_1d(window: int, overlap: int) -> torch.Tensor:
    """Raised-cosine taper used to blend overlapping tiles without seams.

    Parameters
    ----------
    window : int
        Tile length, in voxels; at least 1.
    overlap : int
        Length of the taper at each end, in voxels; between 0 and `window`. Usually the
        overlap between neighbouring tiles.

    Returns
    -------
    torch.Tensor
        `(window,)` float32 weights, strictly positive, symmetric, equal to 1 in the middle
        (when ``2 * overlap <= window``) and rising as a raised cosine over the `overlap`
        voxels at each end. ``overlap = 0`` gives all ones (hard cuts).

    Raises
    ------
    ValueError
        If `window` < 1 or `overlap` is outside ``[0, window]``.

    Notes
    -----
    At distance ``j`` (in voxels, ``0 <= j < overlap``) from the nearer end the weight is
    ``r(j) = (1 - cos(pi * (j + 1) / (overlap + 1))) / 2``. Two tiles placed at stride
    ``window - overlap`` (with ``2 * overlap <= window``) have ramps that meet with
    ``r(j) + r(overlap - 1 - j) = 1``, so in the interior of a regular grid the weights already
    form a partition of unity; the normaliser of :func:`weight_normaliser_1d` makes the blend
    exact everywhere else too (volume borders, the flush last window, longer tapers). Because
    the weight of every tile goes smoothly to nearly zero at its edges, a tile's edge voxels,
    where a network sees the least context, barely contribute, and a change from one tile's
    prediction to the next is spread over the overlap instead of appearing as a jump.
    """
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    if not 0 <= overlap <= window:
        raise ValueError(f"overlap must lie in [0, window={window}], got {overlap}")
    index = torch.arange(window, dtype=torch.float64)
    distance = torch.minimum(index, window - 1 - index)
    ramp = 0.5 * (1.0 - torch.cos(math.pi * (distance + 1) / (overlap + 1)))
    return torch.where(distance < overlap, ramp, torch.ones_like(ramp)).to(torch.float32)


def blending_weights(window_zyx: Sequence[int], overlap_zyx: Sequence[int]) -> torch.Tensor:
    """Separable 3D blending weights, the outer product of three 1D tapers.

    Parameters
    ----------
    window_zyx : Sequence[int]
        Tile shape `(wd, wh, ww)`.
    overlap_zyx : Sequence[int]
        Taper length along each axis, see :func:`blending_window_1d`.

    Returns
    -------
    torch.Tensor
        `(wd, wh, ww)` float32 weights, strictly positive.
    """
    window_zyx = _three("window_zyx", window_zyx)
    overlap_zyx = _three("overlap_zyx", overlap_zyx)
    wz, wy, wx = (
        blending_window_1d(window, overlap)
        for window, overlap in zip(window_zyx, overlap_zyx, strict=True)
    )
    return wz[:, None, None] * wy[None, :, None] * wx[None, None, :]


def weight_normaliser_1d(
    size: int, window: int, starts: Sequence[int] | torch.Tensor, overlap: int
) -> torch.Tensor:
    """Sum of the 1D blending windows of all tiles along one axis.

    Parameters
    ----------
    size : int
        Length of the axis, in voxels.
    window : int
        Tile length along this axis.
    starts : Sequence[int] or torch.Tensor
        Tile starts along this axis, each in ``[0, size - window]`` (e.g. from
        :func:`window_starts`).
    overlap : int
        Taper length passed to :func:`blending_window_1d`.

    Returns
    -------
    torch.Tensor
        `(size,)` float32 sum of the windows; zero where no tile reaches.

    Raises
    ------
    ValueError
        If a start puts its window outside ``[0, size)``.

    Notes
    -----
    Tiles sit on a Cartesian grid (every combination of a z start, a y start and an x start)
    and the 3D weights are separable, ``W(z, y, x) = wz(z) wy(y) wx(x)``. The total weight
    received by a voxel is therefore

    ``sum_{i,j,k} wz(z - z_i) wy(y - y_j) wx(x - x_k) = Nz(z) Ny(y) Nx(x)``,

    the product of three 1D sums returned by this function. Reassembly accumulates
    ``W * tile`` into the output and divides by ``Nz Ny Nx`` slab by slab, so no full-size
    weight volume is ever needed, and an identity network reproduces its input exactly.
    """
    starts_list = torch.as_tensor(starts, dtype=torch.int64).reshape(-1).tolist()
    bad = [s for s in starts_list if s < 0 or s + window > size]
    if bad:
        raise ValueError(
            f"starts {bad} put windows of {window} voxels outside an axis of {size}; "
            f"starts must lie in [0, {size - window}]"
        )
    taper = blending_window_1d(window, overlap).to(torch.float64)
    total = torch.zeros(size, dtype=torch.float64)
    for start in starts_list:
        total[start : start + window] += taper
    return total.to(torch.float32)


def _three(name: str, values: Sequence[int]) -> tuple[int, int, int]:
    """Check that `values` has three entries (z, y, x) and return them as ints."""
    values = tuple(int(v) for v in values)
    if len(values) != 3:
        raise ValueError(f"{name} must have three entries (z, y, x), got {values}")
    return values  # type: ignore[return-value]


def _reflect_indices(indices: np.ndarray, size: int) -> np.ndarray:
    """Map `(n,)` integer indices into ``[0, size)`` by mirror reflection (edge not repeated)."""
    if size == 1:
        return np.zeros_like(indices)
    period = 2 * (size - 1)
    folded = np.mod(indices, period)
    return np.where(folded >= size, period - folded, folded)


def _window_index(
    corner: np.ndarray, window_zyx: tuple[int, int, int], shape: tuple[int, ...]
) -> tuple[tuple[slice, ...], list[np.ndarray] | None]:
    """Locate one window, reflected into the volume where it reaches outside.

    Returns the slices of the smallest block of the volume holding all the window's voxels and,
    when the window is not simply that block (it crosses a border), the `(wd,)`, `(wh,)`,
    `(ww,)` indices into the block that gather it; otherwise None.
    """
    block_slices = []
    local = []
    contiguous = True
    for start, window, size in zip(corner.tolist(), window_zyx, shape, strict=True):
        indices = _reflect_indices(np.arange(start, start + window), size)
        low = int(indices.min())
        block_slices.append(slice(low, int(indices.max()) + 1))
        local.append(indices - low)
        contiguous &= bool(indices[0] == low and indices[-1] == low + window - 1)
    return tuple(block_slices), None if contiguous else local
