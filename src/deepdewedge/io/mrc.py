"""Read and write MRC volumes: memory-mapped reads, atomic writes, voxel size kept."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import mrcfile
import numpy as np


class InputError(ValueError):
    """Bad user input: the message is one line naming the file and the fix."""


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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            handle = mrcfile.mmap(path, mode="r", permissive=False)
    except (ValueError, OSError, EOFError) as err:
        raise InputError(
            f"{path}: not a readable MRC file ({err}); re-export it as MRC (mode 2, float32)"
        ) from None
    with handle as mrc:
        data = mrc.data
        if data is None or data.ndim != 3:
            shape = None if data is None else data.shape
            raise InputError(
                f"{path}: expected a 3D volume, found data of shape {shape}; "
                "give a tomogram (nz, ny, nx), not an image or a stack"
            )
        voxel_size = float(mrc.voxel_size.x) or 1.0
        if mmap and data.dtype == np.float32:
            offset = 1024 + int(mrc.header.nsymbt)
            volume = np.memmap(path, dtype=data.dtype, mode="r", offset=offset, shape=data.shape)
        else:
            volume = np.asarray(data, dtype=np.float32).copy()
    if not mmap and not np.isfinite(volume).all():
        raise InputError(f"{path}: contains NaN or Inf voxels; fix or mask them before use")
    return volume, voxel_size


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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(volume, dtype=np.float32))
            mrc.voxel_size = voxel_size
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
