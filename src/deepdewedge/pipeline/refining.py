"""Step 3: refine whole tomograms with a fitted network."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepdewedge.config import (
    RefineTomogramConfig,
    check_divisible,
    check_overlap,
)
from deepdewedge.cpu import set_cpu_threads
from deepdewedge.evaluate.figures import orthoslice_figure
from deepdewedge.io.atomic import remove_stale_temporaries
from deepdewedge.io.mrc import InputError, map_volume, new_volume, release_planes
from deepdewedge.pipeline.common import (
    binned_preview,
    check_writable,
    mean_std,
    resolve_device,
    resolve_precision,
    save_figure,
    write_record,
)
from deepdewedge.pipeline.fitting import best_checkpoint, load_model, log_dir
from deepdewedge.refine import refine_volume

log = logging.getLogger(__name__)

# Voxels per z slab when whole volumes are swept on the host (16 MB of float32).
_SLAB_VOXELS = 1 << 22
# The QC figure shows volumes binned to at most this many voxels and this many per side.
_PREVIEW_VOXELS = 1 << 21
_PREVIEW_SIDE = 512


def refine_tomogram(
    config: RefineTomogramConfig,
    *,
    progress: Callable[[int, int], None] | None = None,
    names: list[str] | None = None,
) -> list[Path]:
    """Step 3: refine tomograms with a fitted model and write them as MRC.

    By default each pair (tomo0, tomo1) is refined half by half and averaged, as the
    published tool does, and the half-difference map (refined tomo0 minus refined tomo1) is
    written beside the average; with ``tomo_files`` the full tomograms are refined instead
    (the paper's step 3). Returns the written paths.

    Inputs are memory-mapped and outputs are refined straight into memory-mapped temporary
    files that are renamed into place when complete. Every pass over them releases the pages
    it has finished with (:func:`deepdewedge.io.mrc.release_planes`), so host memory, mapped
    file pages included, stays at a few tiles and slabs whatever the tomogram's size (plus
    what the operating system caches of the files, outside the process).
    Several GPUs in ``gpu`` share the tiles of each tomogram. Outputs are named
    ``{name}_refined.mrc`` by `names`, one per tomogram, else after the input files.
    """
    ckpt = config.model_checkpoint_file or best_checkpoint(log_dir(config) / "checkpoints")
    model, state = load_model(ckpt)
    subtomo_size = config.subtomo_size or int(state["subtomo_size"])
    fitted = state.get("mw_angle")
    if config.mw_angle is not None and fitted is not None and abs(config.mw_angle - fitted) > 0.5:
        raise InputError(
            f"{ckpt}: the model was fitted for a missing wedge of {fitted:g}°, but "
            f"refine_tomogram.mw_angle is {config.mw_angle:g}°; leave mw_angle out of "
            "refine-tomogram or use the model fitted for this wedge"
        )
    try:
        check_divisible(subtomo_size, model.size_multiple)
        overlap = (
            config.subtomo_overlap
            if config.subtomo_overlap is not None
            else math.ceil(subtomo_size / 3)
        )
        check_overlap(overlap, subtomo_size)
    except ValueError as err:
        raise InputError(f"{ckpt}: {err}") from None
    devices = _devices(config.gpu)
    model.to(devices[0])
    out_dir = Path(config.output_dir or Path(config.project_dir) / "refined_tomograms")
    if devices[0].type == "cpu":
        set_cpu_threads()
    precision = resolve_precision(config.precision, devices[0])
    tile_wedge = _model_wedge(state, config.mw_angle) if config.mask_tile_wedges else None
    autocast = torch.bfloat16 if precision == "bf16-mixed" else None
    if config.tomo_files:
        jobs = [([Path(f)], Path(f).stem) for f in config.tomo_files]
    else:
        assert config.tomo0_files is not None and config.tomo1_files is not None
        jobs = [
            ([Path(f0), Path(f1)], f"{Path(f0).stem}+{Path(f1).stem}")
            for f0, f1 in zip(config.tomo0_files, config.tomo1_files, strict=True)
        ]
    if names is not None:
        if len(names) != len(jobs):
            raise ValueError(f"{len(names)} names for {len(jobs)} tomograms")
        jobs = [(files, name) for (files, _), name in zip(jobs, names, strict=True)]
    # Everything that can fail is checked before the first tile is refined.
    volumes = {}
    for files, stem in jobs:
        shapes = set()
        for f in files:
            tomo, voxel_size = map_volume(f)
            mean, std = mean_std(tomo, slab_voxels=_SLAB_VOXELS)
            if not np.isfinite(std):
                raise InputError(f"{f}: contains NaN or Inf voxels; fix them before refining")
            shapes.add(tomo.shape)
            volumes[f] = (tomo, voxel_size, mean, std)
        if len(shapes) > 1:
            raise InputError(
                f"{files[1]}: shape {volumes[files[1]][0].shape} differs from {files[0]} "
                f"{volumes[files[0]][0].shape}; the two halves must come from the same "
                "reconstruction geometry"
            )
        target = out_dir / f"{stem}_refined.mrc"
        if target.exists() and not config.overwrite:
            raise InputError(f"{target}: exists already; pass --overwrite to replace it")
    largest = max(int(np.prod(v[0].shape)) for v in volumes.values())
    check_writable(out_dir, needed_bytes=3 * 4 * largest)

    written = []
    for files, stem in jobs:
        started = time.perf_counter()
        tomo0, voxel_size = volumes[files[0]][:2]
        targets = [out_dir / f"{stem}_refined.mrc"]
        if len(files) == 2:
            targets.append(out_dir / f"{stem}_halfdiff.mrc")
        for target in targets:
            remove_stale_temporaries(target)
        # Halves: refined tomo0 goes into the output, refined tomo1 into the half-difference
        # map, and the two become average and difference slab by slab. Both files appear
        # only when everything succeeded.
        with contextlib.ExitStack() as stack:
            results = [
                stack.enter_context(new_volume(t, tomo0.shape, voxel_size=voxel_size))
                for t in targets
            ]
            for f, result in zip(files, results, strict=True):
                tomo, _, mean, std = volumes[f]
                if config.recompute_normalization:
                    model.set_normalization(mean, std if std > 0 else 1.0)
                try:
                    refine_volume(
                        model,
                        tomo,
                        subtomo_size=subtomo_size,
                        subtomo_overlap=overlap,
                        batch_size=config.batch_size,
                        device=devices,
                        out=result,
                        autocast_dtype=autocast,
                        progress=progress,
                        tile_wedge=tile_wedge,
                    )
                except torch.OutOfMemoryError as err:
                    raise InputError(f"{f}: {err}") from None
            if len(results) == 2:
                _average_and_difference(*results)
        path = targets[0]
        outputs = {}
        if len(targets) == 2:
            outputs["half_difference"] = targets[1]
        refined, _ = map_volume(path)
        figure = orthoslice_figure({"input": _preview(tomo0), "refined": _preview(refined)})
        del refined
        outputs["qc_figure"] = out_dir / f"{stem}_qc.png"
        save_figure(figure, outputs["qc_figure"])
        write_record(
            path.with_suffix(".json"),
            config,
            inputs=[*files, ckpt],
            started=started,
            checkpoint=str(ckpt),
            subtomo_size=subtomo_size,
            subtomo_overlap=overlap,
            devices=[str(d) for d in devices],
            precision=precision,
            outputs={k: str(v) for k, v in {"refined": path, **outputs}.items()},
        )
        written.append(path)
    return written


def _model_wedge(state: dict[str, Any], mw_angle: float | None) -> dict[str, Any]:
    """The missing wedge a model was fitted for, as keywords of the mask functions."""
    if state.get("tilt_range_deg") is not None:
        lo, hi = state["tilt_range_deg"]
        return {"tilt_range_deg": (float(lo), float(hi))}
    fitted = state.get("mw_angle")
    return {"mw_angle_deg": float(fitted if fitted is not None else mw_angle or 60.0)}


def _devices(gpu: int | list[int] | None) -> list[torch.device]:
    """The devices refinement runs on: each listed GPU, or the CPU when none is named."""
    if isinstance(gpu, list) and len(gpu) > 1:
        return [resolve_device(index) for index in gpu]
    return [resolve_device(gpu)]


def _slab_planes(shape: tuple[int, ...]) -> int:
    """Number of z planes in a host-side slab of a `(d, h, w)` volume."""
    return max(1, _SLAB_VOXELS // max(1, int(shape[1]) * int(shape[2])))


def _average_and_difference(first: np.ndarray, second: np.ndarray) -> None:
    """Replace `first` by ``(first + second) / 2`` and `second` by ``first - second``.

    Both `(d, h, w)` arrays (memory maps) are updated in place, one z slab at a time, and each
    slab is released once written.
    """
    step = _slab_planes(first.shape)
    for z0 in range(0, first.shape[0], step):
        a = np.array(first[z0 : z0 + step])
        b = np.array(second[z0 : z0 + step])
        first[z0 : z0 + step] = (a + b) / 2
        second[z0 : z0 + step] = a - b
        release_planes(first, z0, z0 + step)
        release_planes(second, z0, z0 + step)


def _preview(volume: np.ndarray) -> np.ndarray:
    """`(d, h, w)` volume binned for the QC figure (:func:`binned_preview`), as float32."""
    return binned_preview(
        volume, max_voxels=_PREVIEW_VOXELS, max_side=_PREVIEW_SIDE, slab_voxels=_SLAB_VOXELS
    )
