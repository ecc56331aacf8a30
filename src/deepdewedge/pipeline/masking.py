"""Automatic sample masks for `prepare-data`, with an overlay figure to check them."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from deepdewedge.config import MakeMaskConfig
from deepdewedge.evaluate.figures import mask_overlay_figure
from deepdewedge.io.mrc import InputError, read_volume, write_volume
from deepdewedge.mask import sample_mask
from deepdewedge.pipeline.common import check_writable, save_figure, write_record


def make_mask(config: MakeMaskConfig) -> list[Path]:
    """Mask each tomogram; return the paths of the masks.

    Writes ``{stem}_mask.mrc`` (0/1, the tomogram's voxel size), ``{stem}_mask.png`` (overlay
    on central slices) and ``{stem}_mask.json`` (record) under ``{project_dir}/masks``.
    """
    out_dir = Path(config.output_dir or Path(config.project_dir) / "masks")
    targets = [out_dir / f"{Path(f).stem}_mask.mrc" for f in config.tomo_files]
    for target in targets:
        if target.exists() and not config.overwrite:
            raise InputError(f"{target}: exists already; pass --overwrite to replace it")
    check_writable(out_dir)
    written = []
    for tomo_file, target in zip(config.tomo_files, targets, strict=True):
        started = time.perf_counter()
        tomo, voxel_size = read_volume(tomo_file)
        mask = sample_mask(
            torch.from_numpy(tomo),
            density_percentage=config.density_percentage,
            std_percentage=config.std_percentage,
            sigma_px=config.sigma_px,
            bin_factor=config.bin_factor,
            z_crop=config.z_crop,
            auto_z=config.auto_z,
            polarity=config.polarity,
        ).numpy()
        if not mask.any():
            raise InputError(
                f"{tomo_file}: the mask selects nothing; raise density_percentage or "
                "std_percentage, or turn auto_z off"
            )
        write_volume(target, mask, voxel_size=voxel_size)
        save_figure(mask_overlay_figure(tomo, mask), target.with_suffix(".png"))
        write_record(
            target.with_suffix(".json"),
            config,
            inputs=[Path(tomo_file)],
            started=started,
            kept_fraction=float(mask.mean()),
        )
        written.append(target)
    return written
