"""Apply a fitted network to a whole tomogram in overlapping, blended tiles.

The tomogram is cut into cubic tiles on a regular grid, the network is run on a few tiles at a
time, and the predictions are blended back with separable raised-cosine weights. Tiles are
streamed: at any moment only the output volume and one batch of tiles are held in memory, so
a tomogram stored as a `np.memmap` (and an output `np.memmap`) can be larger than RAM.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Callable, Iterator

import numpy as np
import torch

from deepdewedge.tiling import (
    blending_weights,
    extract_windows,
    grid_starts,
    weight_normaliser_1d,
    window_starts,
)

__all__ = ["refine_volume"]

logger = logging.getLogger(__name__)


def refine_volume(
    model: torch.nn.Module,
    tomo: torch.Tensor | np.ndarray,
    *,
    subtomo_size: int,
    subtomo_overlap: int,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    out: np.ndarray | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Run a fitted network over a whole tomogram and blend the tiles seamlessly.

    Parameters
    ----------
    model : torch.nn.Module
        Network mapping `(b, 1, s, s, s)` to `(b, 1, s, s, s)` with ``s = subtomo_size``; it
        normalises its own input. Its parameters must already be on `device`. It is switched
        to eval mode while refining and its previous training mode is restored afterwards.
    tomo : torch.Tensor or np.ndarray
        `(d, h, w)` tomogram of any real dtype; a `np.memmap` is read tile by tile. Axes
        shorter than `subtomo_size` are allowed.
    subtomo_size : int
        Edge length `s` of the cubic tiles, in voxels.
    subtomo_overlap : int
        Overlap between neighbouring tiles along each axis, in voxels, in ``[0, s)``; tiles
        are placed at stride ``s - subtomo_overlap`` and blended over the overlap.
    batch_size : int, default 8
        Tiles per forward pass.
    device : torch.device or str, default "cpu"
        Device the network runs on; tiles are moved there and back batch by batch.
    out : np.ndarray, optional
        `(d, h, w)` float32 array (e.g. a writable `np.memmap`) receiving the result; it is
        overwritten and must not share memory with `tomo`. A new array is allocated if None.
    autocast_dtype : torch.dtype, optional
        If given (e.g. ``torch.bfloat16``), run the network under
        ``torch.autocast(device.type, dtype=autocast_dtype)``; predictions are cast back to
        float32 before blending.
    progress : Callable[[int, int], None], optional
        Called as ``progress(done_tiles, total_tiles)`` after each batch.

    Returns
    -------
    np.ndarray
        `(d, h, w)` float32 refined tomogram (`out` itself when given).

    Raises
    ------
    ValueError
        If `tomo` is not 3D, `subtomo_size` or `batch_size` is smaller than 1,
        `subtomo_overlap` is outside ``[0, subtomo_size)``, `out` has the wrong shape or dtype
        or overlaps `tomo`, or the model's parameters are on another device type than `device`.

    Notes
    -----
    **Padding.** Each axis of length ``n`` is padded by mirror reflection (the edge voxel is
    not repeated), first by ``subtomo_overlap // 2`` on both sides and then by as little as
    needed, split evenly between the two sides, for a whole number of strides to fit:
    ``n_padded = s + k * (s - subtomo_overlap)``. This (i) lets axes shorter than a tile be
    refined at all, (ii) keeps every tile on one regular grid, and (iii) puts the border
    voxels of the tomogram at least ``subtomo_overlap // 2`` voxels inside their tiles, as
    voxels at interior seams are, instead of on a tile's edge, where the network sees the
    least context. Reflection, unlike zeros, keeps the local mean, noise level and structures
    of the padding like those of the data the network was trained on. The padding is
    virtual: tiles read reflected indices (:func:`deepdewedge.tiling.extract_windows` with
    ``reflect=True``) and only the parts of tiles inside the tomogram are accumulated, so the
    padded volume is never built.

    **Blending.** Each prediction is multiplied by separable raised-cosine weights
    (:func:`deepdewedge.tiling.blending_weights`) and added into `out`, which is finally
    divided by the total weight per voxel. Since the tiles form a Cartesian grid and the
    weights are separable, that total is the product of three 1D sums
    (:func:`deepdewedge.tiling.weight_normaliser_1d`), applied slab by slab along z. The
    normalised weights form a partition of unity, so a network that is the identity (or
    adds a constant, or scales) is reproduced exactly, and differences between neighbouring
    tiles' predictions fade in over the overlap instead of showing as seams. Peak memory is about
    the output plus one batch of tiles (plus, on the host, a `(s, h, w)` normaliser slab).
    """
    _check_arguments(tomo, subtomo_size, subtomo_overlap, batch_size, out)
    device = torch.device(device)
    _check_model_device(model, device)
    shape = tuple(int(n) for n in tomo.shape)
    size, overlap = subtomo_size, subtomo_overlap
    stride = size - overlap

    pads = [_axis_padding(n, size, overlap) for n in shape]
    padded_shape = [lo + n + hi for n, (lo, hi) in zip(shape, pads, strict=True)]
    pad_before = torch.tensor([lo for lo, _ in pads], dtype=torch.int64)
    starts = grid_starts(padded_shape, (size,) * 3, (stride,) * 3) - pad_before
    normalisers = [
        weight_normaliser_1d(length, size, window_starts(length, size, stride), overlap).numpy()[
            lo : lo + n
        ]
        for length, n, (lo, _) in zip(padded_shape, shape, pads, strict=True)
    ]
    weights = blending_weights((size,) * 3, (overlap,) * 3).to(device)
    total = len(starts)
    logger.debug(
        "refining a %s tomogram in %d tiles of %d voxels (overlap %d, reflection padding %s)",
        shape,
        total,
        size,
        overlap,
        pads,
    )

    out = _zeroed_output(out, shape)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for done, batch_starts in _batches(starts, batch_size):
                tiles = extract_windows(tomo, batch_starts, (size,) * 3, reflect=True)
                prediction = _predict(model, tiles, device, autocast_dtype) * weights
                _accumulate(out, prediction.cpu().numpy(), batch_starts.numpy())
                if progress is not None:
                    progress(done, total)
    finally:
        model.train(was_training)
    _normalise(out, normalisers, slab=size)
    return out


def _check_arguments(
    tomo: torch.Tensor | np.ndarray,
    subtomo_size: int,
    subtomo_overlap: int,
    batch_size: int,
    out: np.ndarray | None,
) -> None:
    """Raise ValueError for bad arguments of :func:`refine_volume`, before any work."""
    if tomo.ndim != 3:
        raise ValueError(f"tomo must be 3D (d, h, w), got shape {tuple(tomo.shape)}")
    if subtomo_size < 1:
        raise ValueError(f"subtomo_size must be at least 1, got {subtomo_size}")
    if not 0 <= subtomo_overlap < subtomo_size:
        raise ValueError(
            f"subtomo_overlap ({subtomo_overlap}) must lie in [0, subtomo_size={subtomo_size}); "
            "use a smaller overlap or larger tiles"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if out is None:
        return
    if tuple(out.shape) != tuple(tomo.shape) or out.dtype != np.float32:
        raise ValueError(
            f"out must be a float32 array of the tomogram's shape {tuple(tomo.shape)}, "
            f"got {out.dtype} {tuple(out.shape)}"
        )
    if isinstance(tomo, np.ndarray) and np.may_share_memory(out, tomo):
        raise ValueError("out shares memory with tomo; refinement cannot run in place")


def _check_model_device(model: torch.nn.Module, device: torch.device) -> None:
    """Raise ValueError if the model's first parameter or buffer is on another device type."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    if tensor is not None and tensor.device.type != device.type:
        raise ValueError(
            f"the model is on {tensor.device} but device={device}; call model.to(device) first"
        )


def _axis_padding(size: int, window: int, overlap: int) -> tuple[int, int]:
    """Reflection padding (before, after) so that tiles at stride window - overlap fit exactly.

    The axis is first padded by ``overlap // 2`` on both sides, then by the few voxels needed
    for a whole number of strides, split evenly.
    """
    stride = window - overlap
    base = overlap // 2
    length = size + 2 * base
    steps = max(0, math.ceil((length - window) / stride))
    extra = window + steps * stride - length
    return base + extra // 2, base + extra - extra // 2


def _zeroed_output(out: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """Return `out` filled with zeros, or a new `shape` float32 array of zeros."""
    if out is None:
        return np.zeros(shape, dtype=np.float32)
    out.fill(0.0)
    return out


def _batches(starts: torch.Tensor, batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield `(number of tiles done after this batch, (b, 3) starts of the batch)`."""
    for first in range(0, len(starts), batch_size):
        batch = starts[first : first + batch_size]
        yield first + len(batch), batch


def _predict(
    model: torch.nn.Module,
    tiles: torch.Tensor,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
) -> torch.Tensor:
    """Run the model on `(b, s, s, s)` tiles; return `(b, s, s, s)` float32 on `device`."""
    autocast = (
        torch.autocast(device_type=device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    batch = tiles.to(device)[:, None]
    with autocast:
        prediction = model(batch)
    if prediction.shape != batch.shape:
        raise ValueError(
            f"the model mapped tiles of shape {tuple(batch.shape)} to {tuple(prediction.shape)}; "
            "it must preserve the shape (b, 1, s, s, s)"
        )
    return prediction[:, 0].to(torch.float32)


def _accumulate(out: np.ndarray, tiles: np.ndarray, starts: np.ndarray) -> None:
    """Add the parts of `(b, s, s, s)` weighted tiles at `(b, 3)` starts that fall inside `out`.

    Starts are in the tomogram's coordinates and may be negative or reach past its end (the
    tiles then cover reflection padding, which is dropped).
    """
    window = tiles.shape[1:]
    for tile, corner in zip(tiles, starts.tolist(), strict=True):
        target, source = [], []
        for start, length, size in zip(corner, window, out.shape, strict=True):
            low, high = max(start, 0), min(start + length, size)
            target.append(slice(low, high))
            source.append(slice(low - start, high - start))
        out[tuple(target)] += tile[tuple(source)]


def _normalise(out: np.ndarray, normalisers: list[np.ndarray], *, slab: int) -> None:
    """Divide `out` in place by the separable total weight, `slab` z-planes at a time."""
    norm_z, norm_y, norm_x = normalisers
    norm_yx = np.outer(norm_y, norm_x)
    for z0 in range(0, out.shape[0], slab):
        z1 = min(z0 + slab, out.shape[0])
        out[z0:z1] /= norm_z[z0:z1, None, None] * norm_yx
