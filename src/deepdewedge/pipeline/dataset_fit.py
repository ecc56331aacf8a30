"""The fit of a dataset run: which tomograms, their banks, and the fit that resumes."""

from __future__ import annotations

import fnmatch
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deepdewedge.config import read_config_file, step_config
from deepdewedge.io.dataset import TomogramEntry
from deepdewedge.io.errors import InputError
from deepdewedge.pipeline.dataset_state import StateWriter

log = logging.getLogger(__name__)

# Config sections that may set standardize_full_tomos.
SCALE_SECTIONS = ("shared", "prepare_data")


def choose_fit_on(
    entries: list[TomogramEntry], fit_on: list[str] | int | None, source: str
) -> list[TomogramEntry]:
    """The usable tomograms to fit on: all, those matching names or patterns, or n spread."""
    usable = [e for e in entries if e.error is None]
    if isinstance(fit_on, int):
        if fit_on >= len(usable):
            chosen = usable
        else:  # evenly spread over the name order, first and last included
            step = (len(usable) - 1) / max(1, fit_on - 1)
            chosen = [usable[round(i * step)] for i in range(fit_on)]
    elif fit_on:
        unmatched = [p for p in fit_on if not any(fnmatch.fnmatch(e.name, p) for e in entries)]
        if unmatched:
            raise InputError(
                f"{source}: no tomogram named '{unmatched[0]}' for fit_on; names are "
                f"{', '.join(e.name for e in entries[:5])}{', ...' if len(entries) > 5 else ''}"
            )
        chosen = [e for e in usable if any(fnmatch.fnmatch(e.name, p) for p in fit_on)]
    else:
        chosen = usable
    if not chosen:
        raise InputError(
            f"{source}: none of the tomograms to fit on can be used ("
            + "; ".join(e.error or e.name for e in entries[:3])
            + "); fix them or choose others with --fit-on"
        )
    return chosen


def fit_dataset(
    chosen: list[TomogramEntry],
    project_dir: Path,
    config_file: Path | None,
    writer: StateWriter,
    *,
    fit_callbacks: Any = None,
    on_tomogram: Callable[[str, dict[str, Any]], None] | None = None,
    overwrite: bool = False,
) -> Path:
    """Prepare banks from `chosen` (or reuse them) and fit (or resume); the best checkpoint.

    A fit-on tomogram whose files turn out unreadable is recorded as failed and left out.
    """
    from deepdewedge.pipeline.fitting import best_checkpoint, fit_model, log_dir
    from deepdewedge.pipeline.prepare import prepare_data, subtomo_dir

    started = time.perf_counter()
    chosen = list(chosen)
    shared = {"project_dir": project_dir}
    # Tomograms of one dataset may differ in scale (AreTomo3's are tiny): standardise each,
    # unless the config says otherwise.
    sections = read_config_file(config_file) if config_file is not None else {}
    standardize = {}
    if not any("standardize_full_tomos" in (sections.get(k) or {}) for k in SCALE_SECTIONS):
        standardize = {"standardize_full_tomos": True}
    while True:
        files = {
            "tomo0_files": [e.tomo0 for e in chosen],
            "tomo1_files": [e.tomo1 for e in chosen],
        }
        if any(e.tilt_range_deg is not None for e in chosen):
            files["tilt_ranges_deg"] = [e.tilt_range_deg for e in chosen]
        prepare_config = step_config(
            "prepare_data", config_file=config_file, overrides={**shared, **standardize, **files}
        )
        reuse = not overwrite and _same_banks(subtomo_dir(prepare_config), chosen)
        if reuse:
            break
        writer.set_fit(status="preparing", fit_on=[e.name for e in chosen])
        prepare_config.overwrite = True
        try:
            prepare_data(prepare_config)
            break
        except InputError as err:
            bad = _entry_named_in(str(err), chosen)
            if bad is None or len(chosen) == 1:
                raise
            log.warning("%s: left out of the fit: %s", bad.name, err)
            writer.set_entry(bad, on_tomogram, status="failed", error=str(err))
            chosen.remove(bad)
    fit_config = step_config("fit_model", config_file=config_file, overrides=shared)
    latest = log_dir(fit_config) / "checkpoints" / "latest.ckpt"
    resume = reuse and latest.exists()
    fit_config.resume = resume
    fit_config.overwrite = not resume
    writer.set_fit(status="fitting", fit_on=[e.name for e in chosen])
    result = fit_model(fit_config, callbacks=fit_callbacks)
    checkpoint = best_checkpoint(result["checkpoint"].parent)
    history = result["history"]
    writer.set_fit(
        status="done",
        checkpoint=str(checkpoint),
        fit_on=[e.name for e in chosen],
        epochs=len(history),
        seconds=round(time.perf_counter() - started, 1),
        resumed=resume,
    )
    return checkpoint


def _same_banks(bank_dir: Path, chosen: list[TomogramEntry]) -> bool:
    """Whether the banks in `bank_dir` were prepared from exactly the tomograms `chosen`."""
    meta_file = bank_dir / "metadata.json"
    if not meta_file.exists():
        return False
    meta = json.loads(meta_file.read_text())
    return meta.get("tomo0_files") == [str(e.tomo0) for e in chosen] and meta.get(
        "tomo1_files"
    ) == [str(e.tomo1) for e in chosen]


def _entry_named_in(message: str, entries: list[TomogramEntry]) -> TomogramEntry | None:
    """The tomogram whose file an error message starts with (errors name the file first)."""
    for entry in entries:
        for path in (entry.tomo0, entry.tomo1):
            if path is not None and message.startswith(str(path)):
                return entry
    return None
