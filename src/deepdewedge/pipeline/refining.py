"""Step 3: refine whole tomograms with a fitted network."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from deepdewedge.config import (
    RefineTomogramConfig,
    check_divisible,
    check_overlap,
)
from deepdewedge.evaluate.figures import orthoslice_figure
from deepdewedge.io.mrc import InputError, read_volume, write_volume
from deepdewedge.pipeline.common import (
    check_writable,
    mean_std,
    resolve_device,
    save_figure,
    write_record,
)
from deepdewedge.pipeline.fitting import best_checkpoint, load_model, log_dir
from deepdewedge.refine import refine_volume

log = logging.getLogger(__name__)


def refine_tomogram(
    config: RefineTomogramConfig, *, progress: Callable[[int, int], None] | None = None
) -> list[Path]:
    """Step 3: refine tomograms with a fitted model and write them as MRC.

    By default each pair (tomo0, tomo1) is refined half by half and averaged, as the
    published tool does; with ``tomo_files`` the full tomograms are refined instead (the
    paper's step 3). Returns the written paths.
    """
    ckpt = config.model_checkpoint_file or best_checkpoint(log_dir(config) / "checkpoints")
    model, state = load_model(ckpt)
    subtomo_size = config.subtomo_size or int(state["subtomo_size"])
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
    device = resolve_device(config.gpu)
    model.to(device)
    out_dir = Path(config.output_dir or Path(config.project_dir) / "refined_tomograms")
    autocast = torch.bfloat16 if config.precision == "bf16-mixed" else None
    if config.tomo_files:
        jobs = [([Path(f)], Path(f).stem) for f in config.tomo_files]
    else:
        assert config.tomo0_files is not None and config.tomo1_files is not None
        jobs = [
            ([Path(f0), Path(f1)], f"{Path(f0).stem}+{Path(f1).stem}")
            for f0, f1 in zip(config.tomo0_files, config.tomo1_files, strict=True)
        ]
    # Everything that can fail is checked before the first tile is refined.
    volumes = {}
    for files, stem in jobs:
        shapes = set()
        for f in files:
            tomo, voxel_size = read_volume(f, mmap=True)
            mean, std = mean_std(tomo)
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
        refined = []
        for f in files:
            tomo, voxel_size, mean, std = volumes[f]
            if config.recompute_normalization:
                model.set_normalization(mean, std if std > 0 else 1.0)
            refined.append(
                refine_volume(
                    model,
                    tomo,
                    subtomo_size=subtomo_size,
                    subtomo_overlap=overlap,
                    batch_size=config.batch_size,
                    device=device,
                    autocast_dtype=autocast,
                    progress=progress,
                )
            )
        outputs = {}
        if len(refined) == 2:
            # In place: refined[0] becomes the average, refined[1] the half difference.
            refined[0] += refined[1]
            refined[1] *= -2.0
            refined[1] += refined[0]
            refined[0] /= 2.0
            outputs["half_difference"] = write_volume(
                out_dir / f"{stem}_halfdiff.mrc", refined[1], voxel_size=voxel_size
            )
        path = write_volume(out_dir / f"{stem}_refined.mrc", refined[0], voxel_size=voxel_size)
        figure = orthoslice_figure({"input": volumes[files[0]][0], "refined": refined[0]})
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
            outputs={k: str(v) for k, v in {"refined": path, **outputs}.items()},
        )
        written.append(path)
    return written
