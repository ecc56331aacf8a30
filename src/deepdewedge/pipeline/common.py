"""Shared helpers of the steps: provenance records, devices, atomic writes."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepdewedge import __version__
from deepdewedge.cpu import has_native_bf16
from deepdewedge.io.atomic import atomic_write
from deepdewedge.io.errors import InputError
from deepdewedge.io.mrc import release_planes

log = logging.getLogger(__name__)


def provenance(config: Any) -> dict[str, Any]:
    """Config, package version and command line, recorded with every artefact."""
    return {
        "deepdewedge_version": __version__,
        "command_line": " ".join(sys.argv),
        "config": json.loads(config.model_dump_json()),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def resolve_precision(precision: str, device: torch.device) -> str:
    """The U-Net's arithmetic: "auto" is bf16 autocast where bf16 is native, else float32.

    Native: a GPU that supports bf16, or a CPU with AVX512-BF16 or AMX instructions.
    """
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    if device.type == "cpu" and has_native_bf16():
        return "bf16-mixed"
    return "32"


def resolve_device(gpu: int | list[int] | None) -> torch.device:
    """The device a step runs on: the first listed GPU, or the CPU when none is named."""
    if gpu is None or gpu == []:
        return torch.device("cpu")
    if isinstance(gpu, list) and len(gpu) > 1:
        log.warning(
            "several GPUs given (%s); this process runs on GPU %d (to fit on all of them, "
            "launch with torchrun --nproc_per_node %d)",
            gpu,
            gpu[0],
            len(gpu),
        )
    index = gpu[0] if isinstance(gpu, list) else gpu
    if index < 0:
        return torch.device("cpu")
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        raise InputError(
            f"gpu {index} was requested but {torch.cuda.device_count()} CUDA device(s) are "
            "visible; drop the gpu option to run on the CPU"
        )
    return torch.device("cuda", index)


def save_npy(path: Path, array: np.ndarray) -> None:
    """Write an ``.npy`` file atomically."""
    with atomic_write(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write a JSON record atomically."""
    with atomic_write(path) as tmp, open(tmp, "w") as handle:
        json.dump(payload, handle, indent=2, default=str)


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
    """Write dict rows as a CSV table atomically; columns default to all keys, in order."""
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def mean_std(volume: np.ndarray, *, slab_voxels: int = 1 << 22) -> tuple[float, float]:
    """Mean and standard deviation in float64, streamed over z slabs of about `slab_voxels`.

    Each slab of a memory-mapped volume is released once read, so that the pass does not
    leave the whole file resident.
    """
    step = max(1, slab_voxels // max(1, int(volume.shape[1]) * int(volume.shape[2])))
    total, total_sq, n = 0.0, 0.0, 0
    for z in range(0, volume.shape[0], step):
        slab = np.asarray(volume[z : z + step], dtype=np.float64)
        release_planes(volume, z, z + step)
        total += slab.sum()
        total_sq += np.square(slab).sum()
        n += slab.size
    mean = total / n
    return mean, float(np.sqrt(max(total_sq / n - mean**2, 0.0)))


def binned_preview(
    volume: np.ndarray,
    *,
    max_voxels: int = 1 << 21,
    max_side: int = 512,
    slab_voxels: int = 1 << 22,
) -> np.ndarray:
    """`(d, h, w)` volume binned for a figure, read slab by slab, as float32.

    Parameters
    ----------
    volume : numpy.ndarray
        Volume of shape `(d, h, w)`, of any size; typically a memory map.
    max_voxels : int
        The binned volume has at most about this many voxels.
    max_side : int
        The binned volume has at most this many voxels along y and along x.
    slab_voxels : int
        About this many voxels are read at a time.

    Returns
    -------
    numpy.ndarray
        The binned volume, float32, of shape ``ceil(n / factor)`` along each axis, where the
        bin factor is the smallest integer that meets both limits (1 for small volumes, which
        are returned unbinned). Each output voxel is the mean of its block; blocks at the far
        borders may be partial. The planes of a memory map are released once read, so memory
        does not grow with the size of the volume.
    """
    d, h, w = (int(n) for n in volume.shape)
    factor = max(
        1,
        math.ceil(max(h, w) / max_side),
        math.ceil((d * h * w / max_voxels) ** (1 / 3)),
    )
    if factor == 1:
        return np.array(volume, dtype=np.float32)
    binned = np.zeros([math.ceil(n / factor) for n in (d, h, w)], dtype=np.float64)
    rows = factor * max(1, slab_voxels // (factor * factor * w))  # y rows per read
    x_blocks = np.arange(0, w, factor)
    for z0 in range(0, d, factor):
        for y0 in range(0, h, rows):
            block = np.asarray(volume[z0 : z0 + factor, y0 : y0 + rows], dtype=np.float64)
            summed = np.add.reduceat(block.sum(axis=0), np.arange(0, block.shape[1], factor))
            binned[z0 // factor, y0 // factor : y0 // factor + len(summed)] = np.add.reduceat(
                summed, x_blocks, axis=1
            )
        release_planes(volume, z0, z0 + factor)
    counts = [np.diff(np.append(np.arange(0, n, factor), n)) for n in (d, h, w)]
    binned /= counts[0][:, None, None] * counts[1][None, :, None] * counts[2][None, None, :]
    return binned.astype(np.float32)


def sha256(path: Path, *, chunk: int = 1 << 24) -> str:
    """Checksum of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_record(
    path: Path, config: Any, *, inputs: list[Path], started: float, **extra: Any
) -> None:
    """JSON record beside an output: provenance, input checksums, wall time, extras."""
    write_json(
        path,
        {
            **provenance(config),
            "inputs": {str(f): {"sha256": sha256(Path(f))} for f in inputs},
            "seconds": round(time.perf_counter() - started, 3),
            **extra,
        },
    )


def check_writable(directory: Path, *, needed_bytes: int = 0) -> None:
    """Fail before the work, not after it, if `directory` cannot take the outputs.

    Nothing is created: the nearest existing folder on the way is probed instead, so a step
    that fails later leaves no empty output folder behind.
    """
    directory = Path(directory)
    base = directory
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise InputError(
            f"{directory}: cannot create this output folder, {base} is a file; choose another "
            "output folder or move that file"
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise InputError(
            f"{directory}: cannot write there ({err.strerror}); choose another output folder "
            "or fix its permissions"
        ) from None
    free = shutil.disk_usage(base).free
    if free < needed_bytes:
        raise InputError(
            f"{directory}: {free / 1e9:.1f} GB free but about {needed_bytes / 1e9:.1f} GB are "
            "needed; free some space or choose another output folder"
        )


def save_figure(figure: Any, path: Path, *, dpi: int = 100) -> Path:
    """Save a matplotlib figure atomically."""
    with atomic_write(path) as tmp:
        figure.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    return path
