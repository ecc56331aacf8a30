"""Read and write MRC volumes: memory-mapped reads, atomic writes, voxel size kept."""

from __future__ import annotations

import mmap
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mrcfile
import numpy as np

from deepdewedge.io.atomic import atomic_write
from deepdewedge.io.errors import InputError

__all__ = [
    "InputError",
    "map_volume",
    "new_volume",
    "read_volume",
    "release_planes",
    "write_volume",
]

# Voxels per z slab when a memory-mapped volume is swept slab by slab (16 MB of float32).
_SLAB_VOXELS = 1 << 22


def read_volume(path: str | os.PathLike, *, mmap: bool = False) -> tuple[np.ndarray, float]:
    """Read a 3D MRC volume as float32 `(z, y, x)` and its voxel size in Å.

    Parameters
    ----------
    path
        MRC file.
    mmap
        Memory-map the data instead of loading it (only when it is stored as float32;
        other modes are converted in memory).

    Returns
    -------
    tuple
        The volume `(d, h, w)` and the voxel size in Å (x spacing; 1.0 if the header has none).
    """
    path, dtype, shape, offset, voxel_size = _locate_volume(path)
    if mmap and dtype == np.float32:
        volume = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.mmap(path, mode="r", permissive=False) as mrc:
                volume = np.asarray(mrc.data, dtype=np.float32).copy()
    if not mmap and not np.isfinite(volume).all():
        raise InputError(
            f"{path}: contains NaN or Inf voxels; replace them (e.g. by the mean) and write "
            "the volume again"
        )
    return volume, voxel_size


def map_volume(path: str | os.PathLike) -> tuple[np.memmap, float]:
    """Memory-map a 3D MRC volume in the type it is stored in, and read its voxel size in Å.

    Unlike ``read_volume(path, mmap=True)``, no mode is converted in memory, so volumes of any
    size and any real-valued mode are read lazily; convert the parts you read (e.g. with
    ``np.asarray(volume[z0:z1], dtype=np.float32)``). The data are not checked for NaN or Inf.

    Parameters
    ----------
    path
        MRC file.

    Returns
    -------
    tuple
        The read-only `(d, h, w)` `np.memmap` (its dtype carries the file's byte order) and the
        voxel size in Å (x spacing; 1.0 if the header has none).
    """
    path, dtype, shape, offset, voxel_size = _locate_volume(path)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape), voxel_size


def _locate_volume(
    path: str | os.PathLike,
) -> tuple[Path, np.dtype, tuple[int, int, int], int, float]:
    """Check that `path` is a readable 3D real-valued MRC volume and find its data block.

    Returns the path, the stored dtype, the shape `(d, h, w)`, the byte offset of the data and
    the voxel size in Å; raises a one-line `InputError` naming the file otherwise.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file; check the path in your config or command line")
    if path.is_dir():
        raise InputError(f"{path}: is a directory; give the path of an .mrc file")
    size = path.stat().st_size
    if size == 0:
        raise InputError(
            f"{path}: not a readable MRC file: it is empty (0 bytes); copy or export it again"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            handle = mrcfile.mmap(path, mode="r", permissive=False)
    except (ValueError, OSError, EOFError) as err:
        raise InputError(_unreadable(path, size, err)) from None
    with handle as mrc:
        data = mrc.data
        if data is None or data.ndim != 3:
            shape = None if data is None else data.shape
            raise InputError(
                f"{path}: expected a 3D volume or stack, found data of shape {shape}; give a "
                "tomogram (nz, ny, nx) or a tilt series (n_tilts, ny, nx), not a single image"
            )
        if data.dtype.kind not in "biuf":
            raise InputError(
                f"{path}: MRC mode {int(mrc.header.mode)} holds {data.dtype} values, not a "
                "real-valued volume (a Fourier transform?); give the real-space tomogram, e.g. "
                "as mode 2 (float32)"
            )
        voxel_size = float(mrc.voxel_size.x) or 1.0
        offset = 1024 + int(mrc.header.nsymbt)
        d, h, w = (int(n) for n in data.shape)
        return path, data.dtype, (d, h, w), offset, voxel_size


def _unreadable(path: Path, size: int, err: BaseException) -> str:
    """Why mrcfile could not open `path`, on one line: truncated, or not MRC at all."""
    fix = "copy or export it again"
    if size < 1024:
        return (
            f"{path}: not a readable MRC file: truncated, {size} bytes is shorter than the "
            f"1024-byte MRC header; {fix}"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, mode="r", permissive=True, header_only=True) as mrc:
                header = mrc.header
                shape = (int(header.nz), int(header.ny), int(header.nx))
                dtype = mrcfile.utils.data_dtype_from_header(header)
                expected = 1024 + int(header.nsymbt) + int(np.prod(shape)) * dtype.itemsize
    except Exception:  # a header mrcfile cannot parse at all: not MRC
        expected = None
    if expected is not None and size < expected:
        return (
            f"{path}: not a readable MRC file: truncated, {size} of {expected} bytes (header: "
            f"{shape[0]}x{shape[1]}x{shape[2]} voxels of {dtype}); {fix}"
        )
    reason = " ".join(str(err).split())
    return f"{path}: not a readable MRC file ({reason}); re-export it as MRC (mode 2, float32)"


def write_volume(path: str | os.PathLike, volume: np.ndarray, *, voxel_size: float = 1.0) -> Path:
    """Write a `(z, y, x)` volume as float32 MRC, atomically (temporary file then rename).

    Parameters
    ----------
    path
        Destination; parent directories are created.
    volume
        `(d, h, w)` array.
    voxel_size
        Voxel size in Å written to the header.

    Returns
    -------
    Path
        The written path.
    """
    path = Path(path)
    with atomic_write(path) as tmp, mrcfile.new(tmp, overwrite=True) as mrc:
        mrc.set_data(np.ascontiguousarray(volume, dtype=np.float32))
        mrc.voxel_size = voxel_size
    return path


@contextmanager
def new_volume(
    path: str | os.PathLike, shape: tuple[int, int, int], *, voxel_size: float = 1.0
) -> Iterator[np.memmap]:
    """Create a float32 MRC volume to be filled in place, and publish it atomically.

    The file is created as a hidden temporary beside `path` (as by
    :func:`deepdewedge.io.atomic.atomic_write`) and its data block is memory-mapped and
    yielded. When the block succeeds, the header statistics are computed slab by slab, the
    data are flushed and the file is renamed to `path`; when it fails, the temporary file is
    removed and an existing `path` is left untouched. Nothing is read or written in one
    piece, so volumes larger than the memory are fine.

    Parameters
    ----------
    path
        Destination; parent directories are created.
    shape
        `(d, h, w)` of the volume.
    voxel_size
        Voxel size in Å written to the header.

    Yields
    ------
    np.memmap
        The writable `(d, h, w)` float32 data block; its initial content is unspecified (zeros
        on Linux, where the file starts sparse). Do not use it after the block.

    Raises
    ------
    InputError
        If the file cannot be created (permissions, full disk).

    Notes
    -----
    Disk blocks are allocated as the map's pages are written back, so check the free space
    first: a disk that fills up while the map is being written stops the process with a bus
    error (and leaves the temporary file behind, see
    :func:`deepdewedge.io.atomic.remove_stale_temporaries`).
    """
    path = Path(path)
    with atomic_write(path) as tmp:
        mrc = mrcfile.new_mmap(tmp, shape=tuple(int(n) for n in shape), mrc_mode=2, overwrite=True)
        with mrc:
            mrc.voxel_size = voxel_size
            yield mrc.data
            _set_header_stats(mrc.header, mrc.data)


def _set_header_stats(header: np.recarray, data: np.ndarray) -> None:
    """Write min, max, mean and RMS deviation of `data` to `header`, one z slab at a time."""
    plane = max(1, int(np.prod(data.shape[1:])))
    step = max(1, _SLAB_VOXELS // plane)
    count, mean, m2 = 0, 0.0, 0.0
    low, high = np.inf, -np.inf
    for z0 in range(0, data.shape[0], step):
        slab = np.asarray(data[z0 : z0 + step], dtype=np.float64)
        release_planes(data, z0, z0 + step)
        n, slab_mean = slab.size, float(slab.mean())
        slab_m2 = float(np.square(slab - slab_mean).sum())
        delta = slab_mean - mean
        total = count + n
        mean += delta * n / total
        m2 += slab_m2 + delta**2 * count * n / total
        count = total
        low, high = min(low, float(slab.min())), max(high, float(slab.max()))
    if count == 0:
        return
    header.dmin, header.dmax = np.float32(low), np.float32(high)
    header.dmean = np.float32(mean)
    header.rms = np.float32(np.sqrt(m2 / count))


def release_planes(volume: object, z0: int, z1: int) -> None:
    """Write back planes ``z0:z1`` of a memory-mapped volume and drop them from resident memory.

    A memory-mapped file's pages that the process has touched stay in its resident set (as
    ``RssFile``, counted in its peak ``VmHWM``) for as long as the file is mapped, so a sweep
    over a large volume would end with all of it resident. Releasing the planes behind the
    sweep keeps the resident set to a window of slabs. Nothing is lost: the planes are written
    back to the file first, and reading or writing them again later faults them back in from
    the file, so the call only costs time if the planes are used again.

    Parameters
    ----------
    volume
        `(d, h, w)` array. Nothing happens unless it is a C-contiguous view of a memory map
        (`np.memmap`, ``mrcfile`` data) and the platform has ``madvise(MADV_DONTNEED)``
        (Linux, the BSDs, macOS); other arrays and tensors are left alone.
    z0, z1
        The planes to release; clipped to ``[0, d)``.

    Notes
    -----
    The byte range is widened to whole pages, so the planes on either side may share a page
    with it and be released too; they are faulted back in when used. Changes are written back
    with ``msync`` before ``madvise(MADV_DONTNEED)`` drops the pages from the mapping; they
    remain in the operating system's page cache, which is not part of the process's memory.
    """
    if not isinstance(volume, np.ndarray) or not hasattr(mmap, "MADV_DONTNEED"):
        return
    mapping = _mapping(volume)
    if mapping is None:
        return
    z0, z1 = max(z0, 0), min(z1, volume.shape[0])
    if z1 <= z0 or volume.size == 0:
        return
    origin = np.frombuffer(mapping, dtype=np.uint8).ctypes.data
    plane = volume.strides[0]
    begin = volume.ctypes.data - origin + z0 * plane
    end = min(begin + (z1 - z0) * plane, len(mapping))
    begin -= begin % mmap.PAGESIZE
    mapping.flush(begin, end - begin)  # does nothing for read-only maps
    mapping.madvise(mmap.MADV_DONTNEED, begin, end - begin)


def _mapping(volume: np.ndarray) -> mmap.mmap | None:
    """The open memory map under the data of a C-contiguous array, or None."""
    if not volume.flags.c_contiguous:
        return None
    base = volume.base
    while isinstance(base, np.ndarray):
        base = base.base
    return base if isinstance(base, mmap.mmap) else None
