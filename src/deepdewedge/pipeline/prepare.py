"""Step 1 (from tomograms on): sub-tomogram banks in the project directory."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepdewedge.config import (
    FitModelConfig,
    PrepareDataConfig,
)
from deepdewedge.fit.bank import SubtomoSelection, bank_size, extract_crops, select_subtomos
from deepdewedge.fit.bank_files import BankFile, BankWriter, new_bank
from deepdewedge.fit.step import Banks
from deepdewedge.fourier import tilt_range_from_mw_angle
from deepdewedge.io.mrc import InputError, map_volume, read_volume
from deepdewedge.pipeline.common import (
    check_writable,
    mean_std,
    write_record,
)

log = logging.getLogger(__name__)

# Crops cut from a tomogram at a time while its banks are written.
_CROP_BYTES = 1 << 28


def subtomo_dir(config: PrepareDataConfig | FitModelConfig) -> Path:
    """Folder of the sub-tomogram banks: ``subtomo_dir``, else ``{project_dir}/subtomos``."""
    return Path(config.subtomo_dir or Path(config.project_dir) / "subtomos")


def _pair_shape(tomo0_file: Path, tomo1_file: Path) -> tuple[int, int, int]:
    """Shape `(d, h, w)` of a pair of half tomograms, read from their headers only."""
    tomo0, voxel0 = map_volume(tomo0_file)
    tomo1, voxel1 = map_volume(tomo1_file)
    if tomo0.shape != tomo1.shape:
        raise InputError(
            f"{tomo1_file}: shape {tomo1.shape} differs from {tomo0_file} {tomo0.shape}; "
            "the two halves must come from the same reconstruction geometry"
        )
    if not np.isclose(voxel0, voxel1, rtol=1e-3):
        log.warning(
            "voxel sizes differ: %s %.3f Å, %s %.3f Å", tomo0_file, voxel0, tomo1_file, voxel1
        )
    d, h, w = tomo0.shape
    return d, h, w


def _read_pair(tomo0_file: Path, tomo1_file: Path) -> tuple[np.ndarray, np.ndarray]:
    """The half tomograms `(d, h, w)` of a pair, checked for independent noise."""
    tomo0, _ = read_volume(tomo0_file)
    tomo1, _ = read_volume(tomo1_file)
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
    return tomo0, tomo1


def _recorded_tilt_range(tomo0_file: Path) -> tuple[float, float] | None:
    """The tilt range `ddw reconstruct` recorded beside a ``*_tomo0`` file, if any."""
    record = tomo0_file.with_name(tomo0_file.stem.removesuffix("_tomo0") + "_reconstruct.json")
    if not tomo0_file.stem.endswith("_tomo0") or not record.exists():
        return None
    lo, hi = json.loads(record.read_text()).get("tilt_range_deg", (None, None))
    return None if lo is None else (float(lo), float(hi))


def bank_wedge(
    tomo0_files: list[Path],
    mw_angle: float | None,
    tilt_ranges_deg: Sequence[tuple[float, float] | None] | None = None,
) -> tuple[float, list[float], list[list[float] | None]]:
    """The missing wedges of the banks: the common one, and each tomogram's tilt range.

    A given `mw_angle` is one symmetric wedge for every tomogram (with a warning where a
    known tilt range disagrees). Otherwise each tomogram has its own tilt range: its entry of
    `tilt_ranges_deg` (e.g. from a dataset's metadata), else the one ``ddw reconstruct``
    recorded beside its tomo0 file, else none (unknown).

    Returns
    -------
    tuple
        The common wedge's opening angle in degrees and tilt range ``[lo, hi]`` (the part of
        the ranges all tomograms have, i.e. the widest missing wedge; 60° where any range is
        unknown), and one ``[lo, hi]`` or None (unknown) per tomogram. Fitting masks each
        sub-tomogram with its tomogram's range, and with the common wedge where it is unknown.
    """
    given = list(tilt_ranges_deg) if tilt_ranges_deg is not None else [None] * len(tomo0_files)
    ranges = [
        tuple(map(float, tilts)) if tilts is not None else _recorded_tilt_range(Path(f))
        for f, tilts in zip(tomo0_files, given, strict=True)
    ]
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
        symmetric = list(tilt_range_from_mw_angle(mw_angle))
        return float(mw_angle), symmetric, [list(symmetric) for _ in tomo0_files]
    own: list[list[float] | None] = [None if t is None else [t[0], t[1]] for t in ranges]
    known = [t for t in own if t is not None]
    if not known or len(known) < len(own):
        return 60.0, list(tilt_range_from_mw_angle(60.0)), own
    los, his = [t[0] for t in known], [t[1] for t in known]
    lo, hi = max(los), min(his)
    if lo - min(los) > 0.5 or max(his) - hi > 0.5:
        log.info(
            "the tomograms' tilt ranges differ (%.1f° to %.1f° in common); each tomogram's "
            "sub-tomograms keep their own missing wedge",
            lo,
            hi,
        )
    return 180.0 - (hi - lo), [lo, hi], own


def prepare_data(config: PrepareDataConfig) -> dict[str, Any]:
    """Step 1 (from tomograms on): sub-tomogram banks for fitting and validation.

    Without ``mw_angle``, each tomogram's tilt range (``tilt_ranges_deg``, else the one
    ``ddw reconstruct`` recorded) defines the missing wedge of its sub-tomograms (see
    :func:`bank_wedge`). ``metadata.json`` records each tomogram's range
    (``tilt_ranges_deg``, null where unknown), the common wedge (``mw_angle`` and
    ``tilt_range_deg``, the widest one) and which tomogram and split each bank row comes from
    (``subtomos``: the k-th fitting row is the k-th record of split ``fitting``).

    Returns
    -------
    dict
        Counts of fitting and validation sub-tomograms and the bank folder.

    Notes
    -----
    Memory does not grow with the number of tomograms. The windows of every tomogram are
    chosen first, from the headers (and masks) alone; then the four bank files are created at
    their final size under temporary names, each tomogram pair is read in turn, its crops
    written into them and the pair released; the files take their names when all are
    complete. Peak memory is one pair of half tomograms and a few hundred MB of crops.
    """
    started = time.perf_counter()
    out_dir = subtomo_dir(config)
    if (out_dir / "metadata.json").exists() and not config.overwrite:
        raise InputError(
            f"{out_dir}: sub-tomograms already prepared; pass --overwrite to replace them"
        )
    s = config.subtomo_size
    mw_angle, tilt_range, tilt_ranges = bank_wedge(
        list(config.tomo0_files), config.mw_angle, config.tilt_ranges_deg
    )
    pairs = list(zip(config.tomo0_files, config.tomo1_files, strict=True))
    selections = _select_windows(config, pairs)
    n_fit = sum(int((~sel.is_val).sum()) for sel in selections)
    n_val = sum(int(sel.is_val.sum()) for sel in selections)
    if n_fit < 10:
        log.warning(
            "only %d fitting sub-tomograms: the network may overfit; use smaller "
            "subtomo_extraction_strides or more tomograms",
            n_fit,
        )
    big = bank_size(s)
    check_writable(out_dir.parent, needed_bytes=2 * (n_fit + n_val) * 4 * big**3)
    if n_fit == 0:
        raise InputError(
            f"{config.tomo0_files[0]}: no fitting sub-tomograms left; lower val_fraction, "
            "subtomo_size or subtomo_extraction_strides"
        )
    # Folders this call creates, removed again (when empty) if it fails.
    folders = (out_dir / "fitting", out_dir / "val", out_dir, *out_dir.parents)
    created = [folder for folder in folders if not folder.exists()]
    try:
        _write_banks(config, out_dir, pairs, selections, n_fit=n_fit, n_val=n_val)
    except BaseException:
        for folder in created:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    records = [
        {"tomo_index": i, "start_zyx": st, "split": "val" if v else "fitting"}
        for i, sel in enumerate(selections)
        for st, v in zip(sel.starts.tolist(), sel.is_val.tolist(), strict=True)
    ]
    write_record(
        out_dir / "metadata.json",
        config,
        inputs=[*config.tomo0_files, *config.tomo1_files, *(config.mask_files or [])],
        started=started,
        bank_id=uuid.uuid4().hex,
        subtomo_size=s,
        bank_size=big,
        mw_angle=mw_angle,
        tilt_range_deg=tilt_range,
        tilt_ranges_deg=tilt_ranges,
        tomo0_files=[str(f) for f in config.tomo0_files],
        tomo1_files=[str(f) for f in config.tomo1_files],
        subtomos=records,
    )
    return {"n_fitting": n_fit, "n_val": n_val, "dir": out_dir}


def _write_banks(
    config: PrepareDataConfig,
    out_dir: Path,
    pairs: list[tuple[Path, Path]],
    selections: list[SubtomoSelection],
    *,
    n_fit: int,
    n_val: int,
) -> None:
    """Write the four bank files, one tomogram pair at a time; rename them when complete."""
    s = config.subtomo_size
    big = bank_size(s)
    rows = {"fitting": n_fit, "val": n_val}
    with ExitStack() as files:
        writers = {
            (split, half): files.enter_context(
                new_bank(out_dir / split / f"subtomo{half}.npy", (rows[split], big, big, big))
            )
            for split in ("fitting", "val")
            for half in ("0", "1")
        }
        written = {"fitting": 0, "val": 0}
        for (f0, f1), sel in zip(pairs, selections, strict=True):
            tomo0, tomo1 = _read_pair(f0, f1)
            for half, tomo in (("0", tomo0), ("1", tomo1)):
                if config.standardize_full_tomos:
                    mean, std = mean_std(tomo)
                    tomo -= mean
                    tomo /= std if std > 0 else 1.0
                windows = {"fitting": sel.starts[~sel.is_val], "val": sel.starts[sel.is_val]}
                for split, starts in windows.items():
                    _write_crops(writers[split, half], written[split], tomo, starts, s)
            del tomo0, tomo1, tomo
            written["fitting"] += int((~sel.is_val).sum())
            written["val"] += int(sel.is_val.sum())
        # Old banks (--overwrite) lose their record before the new files replace them.
        (out_dir / "metadata.json").unlink(missing_ok=True)


def _select_windows(
    config: PrepareDataConfig, pairs: list[tuple[Path, Path]]
) -> list[SubtomoSelection]:
    """The fitting and validation windows of every tomogram pair, from headers and masks.

    One seeded generator draws the validation clusters of the tomograms in turn.
    """
    generator = torch.Generator().manual_seed(config.seed)
    s = config.subtomo_size
    selections = []
    for i, (f0, f1) in enumerate(pairs):
        shape = _pair_shape(f0, f1)
        if min(shape) < s:
            raise InputError(
                f"{f0}: tomogram {shape} is smaller than subtomo_size {s}; "
                f"choose subtomo_size <= {min(shape)}"
            )
        mask = None
        if config.mask_files is not None:
            mask, _ = read_volume(config.mask_files[i])
            if mask.shape != shape:
                raise InputError(
                    f"{config.mask_files[i]}: mask shape {mask.shape} differs from tomogram "
                    f"{shape}; make the mask from this tomogram"
                )
        sel = select_subtomos(
            shape,
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
        log.info(
            "%s: %d fitting, %d validation sub-tomograms",
            f0,
            int((~sel.is_val).sum()),
            int(sel.is_val.sum()),
        )
        selections.append(sel)
    return selections


def _write_crops(
    writer: BankWriter, row: int, tomo: np.ndarray, starts: torch.Tensor, subtomo_size: int
) -> None:
    """Write the crops around the windows `starts` `(n, 3)` of `tomo` from bank row `row` on."""
    per_piece = max(1, _CROP_BYTES // (4 * bank_size(subtomo_size) ** 3))
    for lo in range(0, len(starts), per_piece):
        crops = extract_crops(tomo, starts[lo : lo + per_piece], subtomo_size=subtomo_size)
        writer.write(row + lo, crops)


def load_banks(root: Path, *, subtomo_size: int | None) -> tuple[Banks, dict[str, Any]]:
    """Open the banks written by :func:`prepare_data` in `root`, and read their metadata.

    The banks stay in their files (:class:`~deepdewedge.fit.bank_files.BankFile`): the fit
    reads the rows of each batch from them, so memory does not grow with the size of the
    banks. A given `subtomo_size` must match the one the banks were prepared with.
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

    def load(split: str, half: str) -> BankFile | None:
        bank = BankFile(root / split / f"subtomo{half}.npy")
        return bank if len(bank) else None

    fit0, fit1 = load("fitting", "0"), load("fitting", "1")
    assert fit0 is not None and fit1 is not None
    banks = Banks(fit0=fit0, fit1=fit1, val0=load("val", "0"), val1=load("val", "1"))
    return banks, meta
