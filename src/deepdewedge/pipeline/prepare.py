"""Step 1 (from tomograms on): sub-tomogram banks in the project directory."""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepdewedge.config import (
    FitModelConfig,
    PrepareDataConfig,
)
from deepdewedge.fit.bank import bank_size, extract_crops, select_subtomos
from deepdewedge.fit.step import Banks
from deepdewedge.fourier import tilt_range_from_mw_angle
from deepdewedge.io.mrc import InputError, read_volume
from deepdewedge.pipeline.common import (
    check_writable,
    mean_std,
    save_npy,
    write_record,
)

log = logging.getLogger(__name__)


def subtomo_dir(config: PrepareDataConfig | FitModelConfig) -> Path:
    """Folder of the sub-tomogram banks: ``subtomo_dir``, else ``{project_dir}/subtomos``."""
    return Path(config.subtomo_dir or Path(config.project_dir) / "subtomos")


def _read_pair(tomo0_file: Path, tomo1_file: Path) -> tuple[np.ndarray, np.ndarray, float]:
    tomo0, voxel0 = read_volume(tomo0_file)
    tomo1, voxel1 = read_volume(tomo1_file)
    if tomo0.shape != tomo1.shape:
        raise InputError(
            f"{tomo1_file}: shape {tomo1.shape} differs from {tomo0_file} {tomo0.shape}; "
            "the two halves must come from the same reconstruction geometry"
        )
    if not np.isclose(voxel0, voxel1, rtol=1e-3):
        log.warning(
            "voxel sizes differ: %s %.3f Å, %s %.3f Å", tomo0_file, voxel0, tomo1_file, voxel1
        )
    if np.array_equal(tomo0, tomo1):
        raise InputError(
            f"{tomo1_file}: identical to {tomo0_file}, so the halves share their noise; give "
            "tomograms reconstructed from two different halves of the tilt series"
        )
    sample = (slice(None, None, 2),) * 3
    if np.corrcoef(tomo0[sample].ravel(), tomo1[sample].ravel())[0, 1] > 0.99:
        log.warning(
            "%s and %s are almost identical (CC > 0.99): the halves need independent noise",
            tomo0_file,
            tomo1_file,
        )
    _, std = mean_std(tomo0)
    if std < 1e-3:
        log.warning(
            "%s: intensities vary very little (std %.2g); losses will look close to zero. "
            "Consider --standardize-full-tomos",
            tomo0_file,
            std,
        )
    return tomo0, tomo1, voxel0


def _recorded_tilt_range(tomo0_file: Path) -> tuple[float, float] | None:
    """The tilt range `ddw reconstruct` recorded beside a ``*_tomo0`` file, if any."""
    record = tomo0_file.with_name(tomo0_file.stem.removesuffix("_tomo0") + "_reconstruct.json")
    if not tomo0_file.stem.endswith("_tomo0") or not record.exists():
        return None
    lo, hi = json.loads(record.read_text()).get("tilt_range_deg", (None, None))
    return None if lo is None else (float(lo), float(hi))


def bank_wedge(tomo0_files: list[Path], mw_angle: float | None) -> tuple[float, list[float]]:
    """The missing wedge of the banks: opening angle and tilt range ``[lo, hi]`` in degrees.

    A given `mw_angle` is a symmetric wedge (with a warning where a recorded tilt range
    disagrees); else the tilt ranges recorded by `ddw reconstruct`, where every tomogram has
    one (their common part: the widest missing wedge), else 60°.
    """
    ranges = [_recorded_tilt_range(Path(f)) for f in tomo0_files]
    if mw_angle is not None:
        for file, tilts in zip(tomo0_files, ranges, strict=True):
            if tilts is not None and abs((180.0 - (tilts[1] - tilts[0])) - mw_angle) > 2.0:
                log.warning(
                    "%s: tilts span %.1f° to %.1f°, a missing wedge of %.1f°, but mw_angle "
                    "is %.1f°",
                    file,
                    *tilts,
                    180.0 - (tilts[1] - tilts[0]),
                    mw_angle,
                )
        return float(mw_angle), list(tilt_range_from_mw_angle(mw_angle))
    if not ranges or any(tilts is None for tilts in ranges):
        return 60.0, list(tilt_range_from_mw_angle(60.0))
    los, his = [t[0] for t in ranges], [t[1] for t in ranges]
    lo, hi = max(los), min(his)
    if lo - min(los) > 2.0 or max(his) - hi > 2.0:
        log.warning(
            "the tomograms' tilt ranges differ; their sub-tomograms are masked for the tilts "
            "all of them have, %.1f° to %.1f°",
            lo,
            hi,
        )
    return 180.0 - (hi - lo), [lo, hi]


def prepare_data(config: PrepareDataConfig) -> dict[str, Any]:
    """Step 1 (from tomograms on): sub-tomogram banks for fitting and validation.

    Returns
    -------
    dict
        Counts of fitting and validation sub-tomograms and the bank folder.
    """
    started = time.perf_counter()
    out_dir = subtomo_dir(config)
    if (out_dir / "metadata.json").exists() and not config.overwrite:
        raise InputError(
            f"{out_dir}: sub-tomograms already prepared; pass --overwrite to replace them"
        )
    generator = torch.Generator().manual_seed(config.seed)
    s = config.subtomo_size
    mw_angle, tilt_range = bank_wedge(list(config.tomo0_files), config.mw_angle)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("fit0", "fit1", "val0", "val1")}
    records = []
    for i, (f0, f1) in enumerate(zip(config.tomo0_files, config.tomo1_files, strict=True)):
        tomo0, tomo1, voxel_size = _read_pair(f0, f1)
        if min(tomo0.shape) < s:
            raise InputError(
                f"{f0}: tomogram {tomo0.shape} is smaller than subtomo_size {s}; "
                f"choose subtomo_size <= {min(tomo0.shape)}"
            )
        mask = None
        if config.mask_files is not None:
            mask, _ = read_volume(config.mask_files[i])
            if mask.shape != tomo0.shape:
                raise InputError(
                    f"{config.mask_files[i]}: mask shape {mask.shape} differs from tomogram "
                    f"{tomo0.shape}; make the mask from this tomogram"
                )
        if config.standardize_full_tomos:
            for tomo in (tomo0, tomo1):
                mean, std = mean_std(tomo)
                tomo -= mean
                tomo /= std if std > 0 else 1.0
        sel = select_subtomos(
            tomo0.shape,
            subtomo_size=s,
            strides_zyx=config.strides,
            mask=mask,
            min_nonzero_mask_fraction=config.min_nonzero_mask_fraction_in_subtomo,
            val_fraction=config.val_fraction,
            generator=generator,
        )
        if len(sel.starts) == 0:
            raise InputError(
                f"{config.mask_files[i] if mask is not None else f0}: no sub-tomogram has "
                f"{config.min_nonzero_mask_fraction_in_subtomo:.0%} of mask; lower "
                "min_nonzero_mask_fraction_in_subtomo or check the mask"
            )
        for name, tomo in (("0", tomo0), ("1", tomo1)):
            crops = extract_crops(tomo, sel.starts, subtomo_size=s)
            parts["fit" + name].append(crops[~sel.is_val])
            parts["val" + name].append(crops[sel.is_val])
        records += [
            {"tomo_index": i, "start_zyx": st, "split": "val" if v else "fitting"}
            for st, v in zip(sel.starts.tolist(), sel.is_val.tolist(), strict=True)
        ]
        log.info(
            "%s: %d fitting, %d validation sub-tomograms",
            f0,
            int((~sel.is_val).sum()),
            int(sel.is_val.sum()),
        )
    banks = {k: torch.cat(v).numpy() for k, v in parts.items()}
    if len(banks["fit0"]) < 10:
        log.warning(
            "only %d fitting sub-tomograms: the network may overfit; use smaller "
            "subtomo_extraction_strides or more tomograms",
            len(banks["fit0"]),
        )
    check_writable(out_dir.parent, needed_bytes=sum(b.nbytes for b in banks.values()))
    if len(banks["fit0"]) == 0:
        raise InputError(
            f"{config.tomo0_files[0]}: no fitting sub-tomograms left; lower val_fraction, "
            "subtomo_size or subtomo_extraction_strides"
        )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    for split, key in (("fitting", "fit"), ("val", "val")):
        for half in ("0", "1"):
            save_npy(out_dir / split / f"subtomo{half}.npy", banks[key + half])
    write_record(
        out_dir / "metadata.json",
        config,
        inputs=[*config.tomo0_files, *config.tomo1_files, *(config.mask_files or [])],
        started=started,
        bank_id=uuid.uuid4().hex,
        subtomo_size=s,
        bank_size=bank_size(s),
        mw_angle=mw_angle,
        tilt_range_deg=tilt_range,
        tomo0_files=[str(f) for f in config.tomo0_files],
        tomo1_files=[str(f) for f in config.tomo1_files],
        subtomos=records,
    )
    return {"n_fitting": len(banks["fit0"]), "n_val": len(banks["val0"]), "dir": out_dir}


def load_banks(root: Path, *, subtomo_size: int | None) -> tuple[Banks, dict[str, Any]]:
    """Load the banks written by :func:`prepare_data` from `root` and their metadata.

    A given `subtomo_size` must match the one the banks were prepared with.
    """
    meta_file = root / "metadata.json"
    if not meta_file.exists():
        raise InputError(f"{meta_file}: not found; run `ddw prepare-data` for this project_dir")
    meta = json.loads(meta_file.read_text())
    if subtomo_size is not None and meta["subtomo_size"] != subtomo_size:
        raise InputError(
            f"{meta_file}: sub-tomograms were prepared with subtomo_size {meta['subtomo_size']}"
            f", not {subtomo_size}; use the same subtomo_size or prepare again"
        )

    def load(split: str, half: str) -> torch.Tensor | None:
        array = np.load(root / split / f"subtomo{half}.npy")
        return torch.from_numpy(array) if len(array) else None

    fit0, fit1 = load("fitting", "0"), load("fitting", "1")
    assert fit0 is not None and fit1 is not None
    banks = Banks(fit0=fit0, fit1=fit1, val0=load("val", "0"), val1=load("val", "1"))
    return banks, meta
