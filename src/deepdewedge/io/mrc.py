"""Read and write MRC volumes: memory-mapped reads, atomic writes, voxel size kept."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import mrcfile
import numpy as np

from deepdewedge.io.atomic import atomic_write
from deepdewedge.io.errors import InputError

__all__ = ["InputError", "read_volume", "write_volume"]


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
        if mmap and data.dtype == np.float32:
            offset = 1024 + int(mrc.header.nsymbt)
            volume = np.memmap(path, dtype=data.dtype, mode="r", offset=offset, shape=data.shape)
        else:
            volume = np.asarray(data, dtype=np.float32).copy()
    if not mmap and not np.isfinite(volume).all():
        raise InputError(
            f"{path}: contains NaN or Inf voxels; replace them (e.g. by the mean) and write "
            "the volume again"
        )
    return volume, voxel_size


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
