"""Sub-tomogram banks on disk: ``.npy`` files written in pieces, read through memory maps.

A bank of a dataset can be larger than the memory. Its file is therefore written a piece at
a time (:func:`new_bank`) and read through a read-only memory map (:class:`MappedBank`) whose
pages are released as soon as a batch has been copied out, so that neither preparing nor
fitting holds more than a few batches of it, however many tomograms it comes from.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import IO

import numpy as np
import torch

from deepdewedge.fit.distributed import DistContext
from deepdewedge.io.atomic import atomic_write, remove_stale_temporaries
from deepdewedge.io.checkpoint import load_checkpoint
from deepdewedge.io.errors import InputError
from deepdewedge.io.mrc import release_planes

__all__ = ["Bank", "BankWriter", "MappedBank", "load_input_bank", "new_bank", "write_filled_bank"]

# Rows copied at a time when a mapped bank is moved whole to a device.
_CHUNK_BYTES = 1 << 26


class MappedBank:
    """Rows ``start:stop`` of an ``.npy`` bank `(n, S, S, S)` of float32, mapped read-only.

    It stands in for a `(stop - start, S, S, S)` tensor in host memory where the fitting
    reads banks: ``len``, ``shape``, ``device``, ``nbytes``, indexing with a slice or an index
    tensor, and ``to(device)``. Indexing copies the rows out of the file into a new tensor
    and then releases the pages it read from the process's resident memory, so a pass over a
    bank of any size keeps only the rows of one batch resident. The file is never written.

    Parameters
    ----------
    path
        ``.npy`` file of a C-ordered float32 array `(n, S, S, S)`.
    start, stop
        The rows of the file this bank consists of; default: all of them.
    """

    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, path: str | os.PathLike, start: int = 0, stop: int | None = None) -> None:
        self.path = Path(path)
        try:
            array = np.load(self.path, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise InputError(
                f"{self.path}: unreadable sub-tomogram bank ({type(err).__name__}); prepare the "
                "sub-tomograms again (ddw prepare-data --overwrite)"
            ) from None
        if array.dtype != np.float32 or array.ndim != 4 or not array.flags.c_contiguous:
            raise InputError(
                f"{self.path}: holds {array.dtype} {array.shape}, not float32 crops (n, S, S, S); "
                "prepare the sub-tomograms again (ddw prepare-data --overwrite)"
            )
        self._array = array
        self.start = start
        self.stop = len(array) if stop is None else stop

    def rows(self, start: int, stop: int) -> MappedBank:
        """Rows ``start:stop`` of this bank, as a bank over the same map."""
        view = object.__new__(MappedBank)
        view.path, view._array = self.path, self._array
        view.start, view.stop = self.start + start, self.start + stop
        return view

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def shape(self) -> torch.Size:
        """`(n, S, S, S)` of the rows."""
        return torch.Size((len(self), *self._array.shape[1:]))

    @property
    def nbytes(self) -> int:
        """Size of the rows in bytes."""
        return len(self) * self._array.itemsize * int(np.prod(self._array.shape[1:]))

    def __getitem__(self, index: slice | torch.Tensor | np.ndarray) -> torch.Tensor:
        """`(k, S, S, S)` copy of the rows `index` (a slice with step 1, or row numbers)."""
        if isinstance(index, slice):
            lo, hi, step = index.indices(len(self))
            if step != 1:
                raise ValueError("mapped banks are sliced with step 1")
            lo, hi = self.start + lo, self.start + max(lo, hi)
            rows = np.array(self._array[lo:hi])
            release_planes(self._array, lo, hi)
            return torch.from_numpy(rows)
        wanted = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, np.int64)
        if wanted.size and (wanted.min() < 0 or wanted.max() >= len(self)):
            raise IndexError(f"rows {wanted.min()}..{wanted.max()} of a bank of {len(self)}")
        wanted = wanted + self.start
        rows = np.take(self._array, wanted, axis=0).view(np.ndarray)
        for lo, hi in _runs(wanted):
            release_planes(self._array, lo, hi)
        return torch.from_numpy(rows)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> torch.Tensor:
        """The rows as one tensor on `device`, copied a few tens of MB at a time."""
        out = torch.empty(tuple(self.shape), dtype=self.dtype, device=device)
        per_chunk = max(1, _CHUNK_BYTES // max(1, self.nbytes // max(1, len(self))))
        for lo in range(0, len(self), per_chunk):
            hi = min(len(self), lo + per_chunk)
            out[lo:hi].copy_(self[lo:hi], non_blocking=non_blocking)
        return out


# A bank as the fitting reads it: a tensor (in host or device memory) or a mapped file.
Bank = torch.Tensor | MappedBank


def _runs(rows: np.ndarray) -> Iterator[tuple[int, int]]:
    """`[lo, hi)` ranges of consecutive numbers that cover the row numbers `rows`."""
    rows = np.unique(rows)
    if not rows.size:
        return
    breaks = np.flatnonzero(np.diff(rows) > 1) + 1
    for run in np.split(rows, breaks):
        yield int(run[0]), int(run[-1]) + 1


class BankWriter:
    """Writes rows into a bank file created by :func:`new_bank`, with plain file writes.

    Plain writes (not a writable memory map) leave nothing in the process's resident memory
    and turn a full disk into an ``OSError``, which :func:`new_bank` reports on one line.
    """

    def __init__(self, handle: IO[bytes], offset: int, shape: tuple[int, ...]) -> None:
        self._handle = handle
        self._offset = offset
        self.shape = shape
        self._row_bytes = 4 * int(np.prod(shape[1:]))

    def write(self, start: int, rows: torch.Tensor | np.ndarray) -> None:
        """Store `rows` `(k, S, S, S)` as rows ``start:start + k`` of the bank."""
        if isinstance(rows, torch.Tensor):
            rows = rows.detach().cpu().numpy()
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if tuple(rows.shape[1:]) != self.shape[1:] or start + len(rows) > self.shape[0]:
            raise ValueError(f"rows {rows.shape} at {start} do not fit a bank {self.shape}")
        self._handle.seek(self._offset + start * self._row_bytes)
        self._handle.write(rows.data)


@contextmanager
def new_bank(path: str | os.PathLike, shape: tuple[int, ...]) -> Iterator[BankWriter]:
    """Create a float32 ``.npy`` bank of `shape` to be filled in pieces; publish it atomically.

    The file is preallocated (sparse where the filesystem allows) under a temporary name
    beside `path` and renamed to `path` when the block succeeds; when it fails, the temporary
    file is removed and an existing `path` is left as it was. Rows not written read as zeros.

    Parameters
    ----------
    path
        The ``.npy`` file to create.
    shape
        `(n, S, S, S)` of the bank; ``n`` may be 0.

    Yields
    ------
    BankWriter
        Writes rows at given positions.

    Raises
    ------
    InputError
        One line naming the file when it cannot be written (full disk, permissions).
    """
    path = Path(path)
    remove_stale_temporaries(path)
    shape = tuple(int(n) for n in shape)
    with atomic_write(path) as tmp:
        header = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        offset = int(header.offset)
        del header
        with open(tmp, "r+b") as handle:
            yield BankWriter(handle, offset, shape)


def write_filled_bank(
    path: Path,
    parts: Sequence[Bank],
    fill: Callable[[torch.Tensor], torch.Tensor],
    dist: DistContext,
    *,
    chunk_rows: int,
) -> list[MappedBank]:
    """Write ``fill(rows)`` of the banks `parts`, one after the other, into one new file.

    Parameters
    ----------
    path
        The ``.npy`` file to create (atomically, by rank 0).
    parts
        Banks `(n_i, S, S, S)`; the file holds their filled rows in this order.
    fill
        Maps `(k, S, S, S)` rows to `(k, S, S, S)` filled rows.
    dist
        Process group: each process fills its contiguous share of every part, `chunk_rows`
        rows at a time; rank 0 gathers the pieces and writes them, so memory holds one
        piece per process, never a bank.
    chunk_rows
        Rows per call of `fill` in each process.

    Returns
    -------
    list of MappedBank
        The filled rows of each part, mapped from the new file; in every process. The other
        processes read the file rank 0 wrote, so the checkpoint folder must be on a
        filesystem they all see (as the project folder is).
    """
    row_shape = tuple(parts[0].shape[1:])
    total = sum(len(part) for part in parts)
    writing = new_bank(path, (total, *row_shape)) if dist.is_main else nullcontext()
    with writing as writer:
        offset = 0
        for part in parts:
            bounds = [dist.shard_bounds(len(part), r) for r in range(dist.world_size)]
            lo, hi = bounds[dist.rank]
            longest = max(stop - start for start, stop in bounds)
            for step in range(0, longest, chunk_rows):
                mine = slice(min(hi, lo + step), min(hi, lo + step + chunk_rows))
                filled = fill(part[mine]) if mine.stop > mine.start else None
                counts = [max(0, min(stop - start - step, chunk_rows)) for start, stop in bounds]
                pieces = dist.gather_rows_to_main(filled, counts, row_shape)
                if writer is not None:
                    for (start, _), piece in zip(bounds, pieces, strict=True):
                        if len(piece):
                            writer.write(offset + start + step, piece)
            offset += len(part)
    dist.barrier()  # rank 0 has renamed the file into place
    if not path.exists():
        raise InputError(
            f"{path}: not visible from process {dist.rank}; put logdir on a filesystem that "
            "every node of the fit shares"
        )
    bank = MappedBank(path)
    views, offset = [], 0
    for part in parts:
        views.append(bank.rows(offset, offset + len(part)))
        offset += len(part)
    return views


def load_input_bank(
    path: Path, *, n_fit: int, n_val: int, checkpoint: Path
) -> tuple[Bank, Bank | None]:
    """The model-input banks (fitting, validation) a checkpoint's missing-wedge update left.

    Parameters
    ----------
    path
        ``input_bank_eNNNNN.npy`` (fitting rows, then validation rows), or the
        ``input_bank_eNNNNN.pt`` of earlier versions (loaded into memory).
    n_fit, n_val
        Numbers of fitting and validation sub-tomograms of the prepared banks.
    checkpoint
        The checkpoint being resumed, named in errors.
    """
    if not path.exists():
        raise InputError(
            f"{checkpoint}: its input-bank state {path.name} was replaced by a later "
            "missing-wedge update; resume from latest.ckpt"
        )
    if path.suffix == ".pt":
        state = load_checkpoint(path)
        return state["fit0"], state["val0"]
    bank = MappedBank(path)
    if len(bank) != n_fit + n_val:
        raise InputError(
            f"{path}: holds {len(bank)} sub-tomograms, not the {n_fit + n_val} prepared ones; "
            "fit anew with --overwrite instead of --resume"
        )
    return bank.rows(0, n_fit), bank.rows(n_fit, n_fit + n_val) if n_val else None
