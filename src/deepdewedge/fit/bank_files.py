"""Sub-tomogram banks on disk: ``.npy`` files written and read a few rows at a time.

A bank of a dataset can be larger than the memory. Its file is therefore written a piece at
a time (:func:`new_bank`) and read a batch of rows at a time (:class:`BankFile`), so that
neither preparing nor fitting holds more than a few batches of it, however many tomograms it
comes from.
"""

from __future__ import annotations

import math
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

__all__ = ["Bank", "BankWriter", "BankFile", "load_input_bank", "new_bank", "write_filled_bank"]

# Bytes read at a time when a bank file is moved whole to a device.
_CHUNK_BYTES = 1 << 26


class BankFile:
    """Rows ``start:stop`` of an ``.npy`` bank `(n, S, S, S)` of float32, read from the file.

    It stands in for a `(stop - start, S, S, S)` tensor in host memory where the fitting
    reads banks: ``len``, ``shape``, ``device``, ``nbytes``, indexing with a slice or an index
    tensor, and ``to(device)``. Indexing reads just those rows from the file into a new
    tensor, with plain reads (runs of consecutive rows in one read), so a pass over a bank of
    any size keeps only the rows of one batch in the process's memory; the rest of the file
    is at most in the operating system's page cache, which it drops under memory pressure.
    The file is opened read-only and never written.

    Parameters
    ----------
    path
        ``.npy`` file of a C-ordered float32 array `(n, S, S, S)`.
    start, stop
        The rows of the file this bank consists of; default: all of them.

    Notes
    -----
    Reading rows through a memory map instead would leave every page touched (and the
    neighbouring pages the kernel maps on each fault) resident in the process until the map
    is released; plain reads have no such residue and cost one system call per run of rows.
    """

    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, path: str | os.PathLike, start: int = 0, stop: int | None = None) -> None:
        self.path = Path(path)
        fix = "prepare the sub-tomograms again (ddw prepare-data --overwrite)"
        try:
            with open(self.path, "rb") as handle:
                version = np.lib.format.read_magic(handle)
                read_header = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                shape, fortran_order, dtype = read_header(handle)
                self._offset = handle.tell()
        except (OSError, ValueError) as err:
            raise InputError(
                f"{self.path}: unreadable sub-tomogram bank ({type(err).__name__}); {fix}"
            ) from None
        if dtype != np.float32 or len(shape) != 4 or fortran_order:
            raise InputError(
                f"{self.path}: holds {dtype} {shape}, not float32 crops (n, S, S, S); {fix}"
            )
        self._rows, self._row_shape = int(shape[0]), tuple(int(n) for n in shape[1:])
        size = self._offset + self._rows * self._row_bytes
        if self.path.stat().st_size < size:
            raise InputError(
                f"{self.path}: truncated, {self.path.stat().st_size} of {size} bytes; {fix}"
            )
        self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 (lives with the bank)
        self.start = start
        self.stop = self._rows if stop is None else stop

    def rows(self, start: int, stop: int) -> BankFile:
        """Rows ``start:stop`` of this bank, as a bank over the same open file."""
        view = object.__new__(BankFile)
        view.__dict__.update(self.__dict__)
        view.start, view.stop = self.start + start, self.start + stop
        return view

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def shape(self) -> torch.Size:
        """`(n, S, S, S)` of the rows."""
        return torch.Size((len(self), *self._row_shape))

    @property
    def _row_bytes(self) -> int:
        return 4 * math.prod(self._row_shape)

    @property
    def nbytes(self) -> int:
        """Size of the rows in bytes."""
        return len(self) * self._row_bytes

    def __getitem__(self, index: slice | torch.Tensor | np.ndarray) -> torch.Tensor:
        """`(k, S, S, S)` rows `index` (a slice with step 1, or row numbers), read anew."""
        if isinstance(index, slice):
            lo, hi, step = index.indices(len(self))
            if step != 1:
                raise ValueError("banks read from files are sliced with step 1")
            wanted = np.arange(lo, max(lo, hi))
        else:
            wanted = np.asarray(
                index.cpu() if isinstance(index, torch.Tensor) else index, dtype=np.int64
            ).reshape(-1)
            if wanted.size and (wanted.min() < 0 or wanted.max() >= len(self)):
                raise IndexError(f"rows {wanted.min()}..{wanted.max()} of a bank of {len(self)}")
        out = np.empty((len(wanted), *self._row_shape), dtype=np.float32)
        buffer = memoryview(out.reshape(-1).view(np.uint8))
        # Runs of consecutive rows, in the order asked for, each in one read.
        breaks = np.flatnonzero(np.diff(wanted) != 1) + 1
        for first, last in zip(
            np.concatenate([[0], breaks]), np.concatenate([breaks, [len(wanted)]]), strict=True
        ):
            if last > first:
                self._read(
                    self.start + int(wanted[first]),
                    buffer[first * self._row_bytes : last * self._row_bytes],
                )
        return torch.from_numpy(out)

    def _read(self, row: int, target: memoryview) -> None:
        """Fill `target` with the bytes of the file from row `row` on."""
        self._file.seek(self._offset + row * self._row_bytes)
        done = 0
        while done < len(target):
            n = self._file.readinto(target[done:])
            if not n:
                raise InputError(
                    f"{self.path}: file ends early (truncated); prepare the sub-tomograms again "
                    "(ddw prepare-data --overwrite)"
                )
            done += n

    def to(self, device: torch.device | str, non_blocking: bool = False) -> torch.Tensor:
        """The rows as one tensor on `device`, read a few tens of MB at a time."""
        out = torch.empty(tuple(self.shape), dtype=self.dtype, device=device)
        per_chunk = max(1, _CHUNK_BYTES // self._row_bytes)
        for lo in range(0, len(self), per_chunk):
            hi = min(len(self), lo + per_chunk)
            out[lo:hi].copy_(self[lo:hi], non_blocking=non_blocking)
        return out


# A bank as the fitting reads it: a tensor (in host or device memory) or a file.
Bank = torch.Tensor | BankFile


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
    fill: Callable[[torch.Tensor, int, slice], torch.Tensor],
    dist: DistContext,
    *,
    chunk_rows: int,
) -> list[BankFile]:
    """Write ``fill(rows)`` of the banks `parts`, one after the other, into one new file.

    Parameters
    ----------
    path
        The ``.npy`` file to create (atomically, by rank 0).
    parts
        Banks `(n_i, S, S, S)`; the file holds their filled rows in this order.
    fill
        ``fill(rows, part, where)`` maps the `(k, S, S, S)` rows ``where`` of ``parts[part]``
        to `(k, S, S, S)` filled rows.
    dist
        Process group: each process fills its contiguous share of every part, `chunk_rows`
        rows at a time; rank 0 gathers the pieces and writes them, so memory holds one
        piece per process, never a bank.
    chunk_rows
        Rows per call of `fill` in each process.

    Returns
    -------
    list of BankFile
        The filled rows of each part, read from the new file; in every process. The other
        processes read the file rank 0 wrote, so the checkpoint folder must be on a
        filesystem they all see (as the project folder is).
    """
    row_shape = tuple(parts[0].shape[1:])
    total = sum(len(part) for part in parts)
    writing = new_bank(path, (total, *row_shape)) if dist.is_main else nullcontext()
    with writing as writer:
        offset = 0
        for index, part in enumerate(parts):
            bounds = [dist.shard_bounds(len(part), r) for r in range(dist.world_size)]
            lo, hi = bounds[dist.rank]
            longest = max(stop - start for start, stop in bounds)
            for step in range(0, longest, chunk_rows):
                mine = slice(min(hi, lo + step), min(hi, lo + step + chunk_rows))
                filled = fill(part[mine], index, mine) if mine.stop > mine.start else None
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
    bank = BankFile(path)
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
    bank = BankFile(path)
    if len(bank) != n_fit + n_val:
        raise InputError(
            f"{path}: holds {len(bank)} sub-tomograms, not the {n_fit + n_val} prepared ones; "
            "fit anew with --overwrite instead of --resume"
        )
    return bank.rows(0, n_fit), bank.rows(n_fit, n_fit + n_val) if n_val else None
