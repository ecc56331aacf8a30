"""Apply a fitted network to a whole tomogram in overlapping, blended tiles.

The tomogram is cut into cubic tiles on a regular grid, the network is run on a few tiles at a
time, and the predictions are blended back with separable raised-cosine weights. Tiles are
streamed: at any moment only one batch of tiles per device and a few z slabs of the output are
being worked on, so a tomogram stored as a `np.memmap` (and an output `np.memmap`) can be
larger than RAM. Several devices share the batches, and a device that runs out of memory
continues with smaller batches.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import math
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from deepdewedge.fourier import apply_fourier_mask, missing_wedge_mask
from deepdewedge.io.mrc import release_planes
from deepdewedge.model.denormals import flush_denormals
from deepdewedge.tiling import (
    blending_weights,
    extract_windows,
    grid_starts,
    weight_normaliser_1d,
    window_starts,
)

__all__ = ["refine_volume"]

logger = logging.getLogger(__name__)

# Voxels per z slab of the host-side sweeps over the output (16 MB of float32).
_SLAB_VOXELS = 1 << 22
# Finished batches a device worker may hold before the main thread takes them.
_QUEUE_DEPTH = 2


@flush_denormals()
def refine_volume(
    model: torch.nn.Module,
    tomo: torch.Tensor | np.ndarray,
    *,
    subtomo_size: int,
    subtomo_overlap: int,
    batch_size: int = 8,
    device: torch.device | str | Sequence[torch.device | str] = "cpu",
    out: np.ndarray | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: Callable[[int, int], None] | None = None,
    tile_wedge: dict[str, Any] | None = None,
) -> np.ndarray:
    """Run a fitted network over a whole tomogram and blend the tiles seamlessly.

    Parameters
    ----------
    model : torch.nn.Module
        Network mapping `(b, 1, s, s, s)` to `(b, 1, s, s, s)` with ``s = subtomo_size``; it
        normalises its own input, and its prediction for a tile must not depend on the other
        tiles of the batch. Its parameters must already be on the (first) device. It is
        switched to eval mode while refining and its previous training mode is restored
        afterwards.
    tomo : torch.Tensor or np.ndarray
        `(d, h, w)` tomogram of any real dtype; a `np.memmap` is read tile by tile. Axes
        shorter than `subtomo_size` are allowed.
    subtomo_size : int
        Edge length `s` of the cubic tiles, in voxels.
    subtomo_overlap : int
        Overlap between neighbouring tiles along each axis, in voxels, in ``[0, s)``; tiles
        are placed at stride ``s - subtomo_overlap`` and blended over the overlap.
    batch_size : int, default 8
        Tiles per forward pass (per device). A device that runs out of memory halves it, for
        the rest of this call, and retries the same tiles.
    device : torch.device or str or sequence of them, default "cpu"
        Device the network runs on; tiles are moved there and back batch by batch. Given
        several devices, the model is copied onto each of the others and batches are dealt to
        them in turn, each device working in its own thread.
    out : np.ndarray, optional
        `(d, h, w)` float32 array (e.g. a writable `np.memmap`) receiving the result; it is
        overwritten and must not share memory with `tomo`. A new array is allocated if None.
    autocast_dtype : torch.dtype, optional
        If given (e.g. ``torch.bfloat16``), run the network under
        ``torch.autocast(device.type, dtype=autocast_dtype)``; predictions are cast back to
        float32 before blending.
    progress : Callable[[int, int], None], optional
        Called as ``progress(done_tiles, total_tiles)`` after each batch.
    tile_wedge : dict, optional
        The missing wedge as keywords of :func:`deepdewedge.fourier.missing_wedge_mask`
        (``mw_angle_deg`` or ``tilt_range_deg``): each tile's wedge is emptied before the
        network sees it, as in every fitting input; None passes tiles as they are.

    Returns
    -------
    np.ndarray
        `(d, h, w)` float32 refined tomogram (`out` itself when given).

    Raises
    ------
    ValueError
        If `tomo` is not 3D, `subtomo_size` or `batch_size` is smaller than 1,
        `subtomo_overlap` is outside ``[0, subtomo_size)``, `out` has the wrong shape or dtype
        or overlaps `tomo`, no device is given, or the model's parameters are on another device
        type than the first device.
    torch.OutOfMemoryError
        If a single tile does not fit in a device's memory.

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
    (:func:`deepdewedge.tiling.weight_normaliser_1d`). The normalised weights form a
    partition of unity, so a network that is the identity (or adds a constant, or scales) is
    reproduced exactly, and differences between neighbouring tiles' predictions fade in over
    the overlap instead of showing as seams.

    **Memory.** Tiles are visited with z varying slowest, so `out` is written in one sweep
    along z: its planes are zeroed just before the first tile reaches them and divided by the
    total weight as soon as the last tile has passed. A memory-mapped `out` is thus touched
    only a few tile-thick slabs at a time, and host memory holds about one batch of tiles per
    device. The planes of a memory-mapped `out` and `tomo` behind the sweep are released from
    the process's resident memory as soon as the sweep has passed them
    (:func:`deepdewedge.io.mrc.release_planes`), so its peak resident set, mapped file pages
    included, is a window of slabs whatever the tomogram's depth. No Fourier transform of the
    tomogram, or of anything larger than a tile, is made.

    **Devices.** On CUDA, tiles go through pinned host memory with asynchronous copies, and
    the next batch is queued on the device before the previous one is added into `out`, so
    host and device work overlap. With several devices, batch ``k`` runs on device
    ``k mod n`` and the main thread adds the batches into `out` in order, so the result does
    not depend on the number of devices. A forward pass that runs out of device memory
    (``torch.OutOfMemoryError`` or a ``RuntimeError`` saying "out of memory") is retried on
    the same tiles, half as many at a time (rounded up), after emptying the device's cache;
    a warning names the new batch size, which holds for the rest of the call.
    """
    _check_arguments(tomo, subtomo_size, subtomo_overlap, batch_size, out)
    devices = _as_devices(device)
    _check_model_device(model, devices[0])
    shape = tuple(int(n) for n in tomo.shape)
    size, overlap = subtomo_size, subtomo_overlap
    stride = size - overlap

    pads = [_axis_padding(n, size, overlap) for n in shape]
    padded_shape = [lo + n + hi for n, (lo, hi) in zip(shape, pads, strict=True)]
    pad_before = torch.tensor([lo for lo, _ in pads], dtype=torch.int64)
    # z varies slowest (grid_starts), so the z starts never decrease along the batches.
    starts = (grid_starts(padded_shape, (size,) * 3, (stride,) * 3) - pad_before).numpy()
    norm_z, norm_y, norm_x = (
        weight_normaliser_1d(length, size, window_starts(length, size, stride), overlap).numpy()[
            lo : lo + n
        ]
        for length, n, (lo, _) in zip(padded_shape, shape, pads, strict=True)
    )
    norm_yx = np.outer(norm_y, norm_x)
    weights = blending_weights((size,) * 3, (overlap,) * 3)
    batches = [starts[first : first + batch_size] for first in range(0, len(starts), batch_size)]
    total = len(starts)
    logger.debug(
        "refining a %s tomogram in %d tiles of %d voxels (overlap %d, reflection padding %s) on %s",
        shape,
        total,
        size,
        overlap,
        pads,
        ", ".join(str(d) for d in devices),
    )

    out = np.zeros(shape, dtype=np.float32) if out is None else out
    was_training = model.training
    model.eval()
    try:
        workers = [
            _Worker(
                replica,
                dev,
                tomo,
                weights,
                batch_size=batch_size,
                autocast_dtype=autocast_dtype,
                tile_wedge=tile_wedge,
            )
            for replica, dev in zip(_replicas(model, devices), devices, strict=True)
        ]
        zeroed = normalised = done = 0
        with contextlib.closing(_in_order(workers, batches)) as predictions:
            for batch_starts, prediction in zip(batches, predictions, strict=True):
                reach = min(shape[0], int(batch_starts[:, 0].max()) + size)
                if reach > zeroed:
                    _zero(out, zeroed, reach)
                    zeroed = reach
                _accumulate(out, prediction, batch_starts)
                done += len(batch_starts)
                # Planes below the next tile's start receive nothing more.
                final = shape[0] if done == total else min(max(int(starts[done, 0]), 0), shape[0])
                if final > normalised:
                    _normalise(out, norm_z, norm_yx, normalised, final)
                    release_planes(out, normalised, final)
                    release_planes(tomo, normalised, final)
                    normalised = final
                if progress is not None:
                    progress(done, total)
    finally:
        model.train(was_training)
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


def _as_devices(device: torch.device | str | Sequence[torch.device | str]) -> list[torch.device]:
    """The devices to run on, as a non-empty list."""
    if isinstance(device, torch.device | str):
        return [torch.device(device)]
    devices = [torch.device(d) for d in device]
    if not devices:
        raise ValueError("device must name at least one device, got an empty sequence")
    return devices


def _replicas(model: torch.nn.Module, devices: list[torch.device]) -> list[torch.nn.Module]:
    """`model` itself for the first device and an eval-mode copy of it on each other device."""
    return [model] + [copy.deepcopy(model).to(dev).eval() for dev in devices[1:]]


def _is_out_of_memory(err: BaseException) -> bool:
    """Whether `err` reports that a device ran out of memory."""
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err)
    )


class _Worker:
    """Runs the batches of tiles dealt to one device and hands back weighted predictions."""

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        tomo: torch.Tensor | np.ndarray,
        weights: torch.Tensor,
        *,
        batch_size: int,
        autocast_dtype: torch.dtype | None,
        tile_wedge: dict[str, Any] | None = None,
    ) -> None:
        self.model, self.device, self.tomo = model, device, tomo
        self.window = tuple(weights.shape)
        self.wedge_mask = None
        if tile_wedge is not None:
            self.wedge_mask = missing_wedge_mask(self.window, device=device, **tile_wedge)
        self.weights = weights.to(device)
        self.chunk = batch_size  # tiles per forward pass, halved when out of memory
        self.autocast_dtype = autocast_dtype
        self.cuda = device.type == "cuda"

    def run(self, batches: Sequence[np.ndarray]) -> Iterator[np.ndarray]:
        """Yield the `(b, s, s, s)` float32 weighted predictions of `(b, 3)` tile starts.

        On CUDA the next batch is queued on the device before the previous prediction is
        handed back, so that the device computes while the caller adds it into the output.
        """
        lookahead = 1 if self.cuda else 0
        pending: deque[tuple[torch.Tensor, torch.cuda.Event | None]] = deque()
        for batch_starts in batches:
            tiles = extract_windows(self.tomo, batch_starts, self.window, reflect=True)
            pending.append(self._submit(tiles))
            if len(pending) > lookahead:
                yield self._collect(*pending.popleft())
        while pending:
            yield self._collect(*pending.popleft())

    def _submit(self, tiles: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Start predicting `(b, s, s, s)` tiles; return the host result and its ready event."""
        if not self.cuda:
            return self._predict_into(tiles, torch.empty(tiles.shape)), None
        with torch.cuda.device(self.device):
            if tiles.device.type == "cpu":
                tiles = tiles.pin_memory()
            result = torch.empty(tiles.shape, dtype=torch.float32, pin_memory=True)
            self._predict_into(tiles, result)
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        return result, ready

    def _predict_into(self, tiles: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Fill the `(b, s, s, s)` host tensor `result` with the weighted predictions of `tiles`.

        The tiles go through the network `self.chunk` at a time; on CUDA the copies to and
        from the device are asynchronous.
        """
        first = 0
        while first < len(tiles):
            count = min(self.chunk, len(tiles) - first)
            prediction = self._predict(tiles[first : first + count])
            if prediction is None:
                self._back_off(count)
                continue
            result[first : first + count].copy_(prediction, non_blocking=self.cuda)
            first += count
        return result

    def _predict(self, tiles: torch.Tensor) -> torch.Tensor | None:
        """Weighted `(b, s, s, s)` float32 prediction on the device, or None if out of memory."""
        autocast = (
            torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        try:
            with torch.inference_mode():
                batch = tiles.to(self.device, non_blocking=True)[:, None]
                if self.wedge_mask is not None:
                    batch = apply_fourier_mask(batch, self.wedge_mask)
                with autocast:
                    prediction = self.model(batch)
                if prediction.shape != batch.shape:
                    raise ValueError(
                        f"the model mapped tiles of shape {tuple(batch.shape)} to "
                        f"{tuple(prediction.shape)}; it must preserve the shape (b, 1, s, s, s)"
                    )
                return prediction[:, 0].to(torch.float32) * self.weights
        except RuntimeError as err:
            if not _is_out_of_memory(err):
                raise
        # Out of memory: the failed pass's tensors are released once the handler has exited.
        return None

    def _back_off(self, count: int) -> None:
        """React to running out of memory with `count` tiles: halve the batch, or give up."""
        if count == 1:
            raise torch.OutOfMemoryError(
                f"{self.device}: a single tile of {self.window[0]}³ voxels does not fit in its "
                "memory; refine with a smaller subtomo_size, in bf16-mixed precision, or on a "
                "device with more free memory"
            )
        if self.cuda:
            torch.cuda.empty_cache()  # of the current device, set by _submit
        self.chunk = (count + 1) // 2
        logger.warning(
            "%s ran out of memory with %d tiles per batch; continuing with batch size %d",
            self.device,
            count,
            self.chunk,
        )

    def _collect(self, result: torch.Tensor, ready: torch.cuda.Event | None) -> np.ndarray:
        """Wait until `result` holds the prediction and return it as an array."""
        if ready is not None:
            ready.synchronize()
        return result.numpy()


class _Failure:
    """An exception raised in a worker thread, handed to the main thread."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _in_order(workers: list[_Worker], batches: list[np.ndarray]) -> Iterator[np.ndarray]:
    """Predictions of `batches` in order, batch ``k`` computed by worker ``k mod n``."""
    if len(workers) == 1:
        yield from workers[0].run(batches)
        return
    n = len(workers)
    stop = threading.Event()
    results: list[queue.Queue] = [queue.Queue(maxsize=_QUEUE_DEPTH) for _ in workers]
    threads = [
        threading.Thread(
            target=_serve,
            args=(worker, batches[i::n], results[i], stop),
            name=f"refine-{worker.device}-{i}",
            daemon=True,
        )
        for i, worker in enumerate(workers)
    ]
    for thread in threads:
        thread.start()
    try:
        for index in range(len(batches)):
            item = results[index % n].get()
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def _serve(
    worker: _Worker, batches: list[np.ndarray], results: queue.Queue, stop: threading.Event
) -> None:
    """Thread body: put the worker's predictions (or its exception) on `results` in order."""
    try:
        for prediction in worker.run(batches):
            if not _put(results, prediction, stop):
                return
    except BaseException as err:  # handed to the main thread, which raises it
        _put(results, _Failure(err), stop)


def _put(results: queue.Queue, item: object, stop: threading.Event) -> bool:
    """Put `item` on `results` unless `stop` is set first; return whether it was put."""
    while not stop.is_set():
        try:
            results.put(item, timeout=0.1)
        except queue.Full:
            continue
        return True
    return False


def _slab_planes(shape: tuple[int, ...]) -> int:
    """Number of z planes in a host-side slab of a `(d, h, w)` volume."""
    return max(1, _SLAB_VOXELS // max(1, shape[1] * shape[2]))


def _zero(out: np.ndarray, z0: int, z1: int) -> None:
    """Set planes ``z0:z1`` of `out` to zero, slab by slab."""
    step = _slab_planes(out.shape)
    for z in range(z0, z1, step):
        out[z : min(z + step, z1)] = 0.0


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


def _normalise(out: np.ndarray, norm_z: np.ndarray, norm_yx: np.ndarray, z0: int, z1: int) -> None:
    """Divide planes ``z0:z1`` of `out` in place by the separable total weight, slab by slab."""
    step = _slab_planes(out.shape)
    for z in range(z0, z1, step):
        end = min(z + step, z1)
        out[z:end] /= norm_z[z:end, None, None] * norm_yx
