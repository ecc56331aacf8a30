"""Whole datasets: fit one model on some tomograms, refine them all, resumably.

Layout added to the project directory::

    {project_dir}/dataset/state*.json            what is done and what failed (see dataset_state)
    {project_dir}/dataset/images/{name}_*.png    per-tomogram figures of the report
    {project_dir}/refined_tomograms/{name}_refined.mrc (+ _halfdiff.mrc, .json, _qc.png)
    {project_dir}/tomograms.csv                  one row per tomogram
    {project_dir}/report.html                    one self-contained page
    {project_dir}/tomograms.star                 for a RELION-5 input: points at the refined maps

Killed at any point, the same call continues: prepared banks are reused, the fit resumes from
its last checkpoint and refined tomograms are not redone. A tomogram that cannot be read or
refined is recorded as failed with a one-line reason and the others go on. Shards (SLURM array
tasks) refine disjoint tomograms with a model fitted before, each writing only its own state
file and its own tomograms' outputs; a run over the whole dataset afterwards merges them (and
refines anything left).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from deepdewedge.config import DatasetConfig, read_config_file, step_config
from deepdewedge.io.dataset import TomogramEntry, entries_from_lists, read_dataset
from deepdewedge.io.errors import InputError
from deepdewedge.pipeline.dataset_state import (
    Shard,
    StateWriter,
    parse_shard,
    read_state,
    state_dir,
)

log = logging.getLogger(__name__)

Steps = Literal["all", "fit", "refine"]
# Seconds between rewrites of the table and the report while tomograms are refined.
REPORT_EVERY_S = 60.0
# Config sections that may set standardize_full_tomos.
SCALE_SECTIONS = ("shared", "prepare_data")


@dataclass
class DatasetCallbacks:
    """Progress hooks; the pipeline itself never prints.

    ``fit`` is handed to the fitting loop (:class:`deepdewedge.fit.loop.Callbacks`);
    ``tiles(done, total)`` follows the tiles of the tomogram being refined;
    ``tomogram(name, record)`` follows every change of a tomogram's state.
    """

    fit: Any = None
    tiles: Callable[[int, int], None] | None = None
    tomogram: Callable[[str, dict[str, Any]], None] | None = None


@dataclass
class DatasetSummary:
    """What a dataset run did, over the tomograms of its shard."""

    checkpoint: Path | None
    refined: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # refined before, not redone
    failed: dict[str, str] = field(default_factory=dict)  # name -> one-line reason
    pending: list[str] = field(default_factory=list)
    outputs: dict[str, Path] = field(default_factory=dict)


def run_dataset(
    config: DatasetConfig,
    *,
    config_file: Path | None = None,
    model_checkpoint_file: Path | None = None,
    steps: Steps = "all",
    overwrite: bool = False,
    callbacks: DatasetCallbacks | None = None,
) -> DatasetSummary:
    """Fit one model on the dataset's tomograms (or some of them) and refine every tomogram.

    Parameters
    ----------
    config
        The dataset (``path``), the tomograms to fit on (``fit_on``), the shard and the
        project directory.
    config_file
        YAML config whose ``prepare_data``, ``fit_model`` and ``refine_tomogram`` sections
        (and ``shared``) set the steps' options; the file lists are taken from the dataset.
    model_checkpoint_file
        Refine with this model instead of fitting one.
    steps
        ``"all"``; ``"fit"`` to stop after the fit (before a sharded refinement); ``"refine"``
        to refine with an existing model only (``model_checkpoint_file`` or the project's).
    overwrite
        Prepare and fit anew, and refine every tomogram again.
    callbacks
        Progress hooks of the fit, the tiles and each tomogram.
    """
    callbacks = callbacks or DatasetCallbacks()
    project_dir = Path(config.project_dir)
    shard = parse_shard(config.shard)
    entries = {e.name: e for e in _entries(config, config_file)}
    source = config.path or str(config_file)
    writer = StateWriter(project_dir, shard, source)
    summary = DatasetSummary(checkpoint=None)

    checkpoint = model_checkpoint_file
    if checkpoint is None and not (overwrite and steps != "refine"):
        checkpoint = _fitted_model(project_dir, any_fit=steps == "refine")
    if checkpoint is None:
        if steps == "refine":
            raise InputError(
                f"{project_dir}: no fitted model; give --model-checkpoint-file or fit first "
                "with ddw run and the same --dataset and --project-dir"
            )
        if not shard.is_whole:
            raise InputError(
                f"{project_dir}: no fitted model for shard {shard.index}/{shard.count}; fit "
                "first with the same ddw run command and --stop-after fit (no shard), then "
                "start the shards"
            )
        chosen = _fit_on(list(entries.values()), config.fit_on, source)
        checkpoint = _fit(chosen, project_dir, config_file, writer, callbacks, overwrite)
    summary.checkpoint = Path(checkpoint)
    if steps == "fit":
        return summary

    last_written = time.monotonic()
    for name in shard.take(list(entries)):
        refined = _refine_one(
            entries[name],
            Path(checkpoint),
            project_dir,
            config_file,
            writer,
            callbacks,
            summary,
            overwrite=overwrite,
        )
        # The table and the report follow the run, rewritten at most every so often.
        if shard.is_whole and refined and time.monotonic() - last_written > REPORT_EVERY_S:
            write_dataset_outputs(project_dir, source, entries)
            last_written = time.monotonic()
    if shard.is_whole:
        summary.outputs = write_dataset_outputs(project_dir, source, entries)
    return summary


def _entries(config: DatasetConfig, config_file: Path | None) -> list[TomogramEntry]:
    """The dataset's tomograms, their halves checked: from its path, else the config's lists."""
    if config.path is not None:
        return [_checked(e) for e in read_dataset(config.path)]
    lists = step_config(
        "refine_tomogram",
        config_file=config_file,
        overrides={"model_checkpoint_file": Path("model.ckpt")},
    )
    if not lists.tomo0_files or not lists.tomo1_files:  # type: ignore[attr-defined]
        raise InputError(
            f"{config_file or 'command line'}: no dataset; give --dataset or tomo0_files and "
            "tomo1_files in the config"
        )
    entries = entries_from_lists(lists.tomo0_files, lists.tomo1_files)  # type: ignore[attr-defined]
    return [_checked(e) for e in entries]


def _checked(entry: TomogramEntry) -> TomogramEntry:
    """`entry`, with an error if its halves are unreadable or differ in shape or voxel size.

    Only the headers are read; NaNs and the like are found when the tomogram is used.
    """
    from deepdewedge.io.mrc import map_volume

    if entry.error is not None:
        return entry
    try:
        tomo0, voxel0 = map_volume(entry.tomo0)
        tomo1, voxel1 = map_volume(entry.tomo1)
    except InputError as err:
        return replace(entry, error=str(err))
    if tomo0.shape != tomo1.shape:
        error = (
            f"{entry.tomo1}: shape {tomo1.shape} differs from {entry.tomo0} {tomo0.shape}; the "
            "two halves must come from the same reconstruction geometry"
        )
        return replace(entry, error=error)
    if abs(voxel0 - voxel1) > 1e-3 * max(voxel0, voxel1):
        error = (
            f"{entry.tomo1}: voxel size {voxel1:.3f} Å differs from {entry.tomo0} "
            f"{voxel0:.3f} Å; reconstruct both halves at the same pixel size and binning"
        )
        return replace(entry, error=error)
    return entry


def _fitted_model(project_dir: Path, *, any_fit: bool) -> Path | None:
    """The checkpoint of the finished fit recorded in the state, if it still exists.

    With `any_fit`, else the best checkpoint of a fit made in `project_dir` by other means
    (``ddw fit-model``).
    """
    fit = read_state(project_dir)["fit"]
    if fit and fit.get("status") == "done" and Path(fit["checkpoint"]).exists():
        return Path(fit["checkpoint"])
    if any_fit:
        from deepdewedge.pipeline.fitting import best_checkpoint

        checkpoint = best_checkpoint(project_dir / "logs" / "checkpoints")
        return checkpoint if checkpoint.exists() else None
    return None


def _fit_on(
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


def _fit(
    chosen: list[TomogramEntry],
    project_dir: Path,
    config_file: Path | None,
    writer: StateWriter,
    callbacks: DatasetCallbacks,
    overwrite: bool,
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
            _record(writer, callbacks, bad, status="failed", error=str(err))
            chosen.remove(bad)
    fit_config = step_config("fit_model", config_file=config_file, overrides=shared)
    latest = log_dir(fit_config) / "checkpoints" / "latest.ckpt"
    resume = reuse and latest.exists()
    fit_config.resume = resume
    fit_config.overwrite = not resume
    writer.set_fit(status="fitting", fit_on=[e.name for e in chosen])
    result = fit_model(fit_config, callbacks=callbacks.fit)
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


def _record(
    writer: StateWriter, callbacks: DatasetCallbacks, entry: TomogramEntry, **record: Any
) -> None:
    files = {
        "tomo0": None if entry.tomo0 is None else str(entry.tomo0),
        "tomo1": None if entry.tomo1 is None else str(entry.tomo1),
        "full": None if entry.full is None else str(entry.full),
        "tilt_range_deg": None if entry.tilt_range_deg is None else list(entry.tilt_range_deg),
    }
    saved = writer.set(entry.name, **files, **record)
    if callbacks.tomogram is not None:
        callbacks.tomogram(entry.name, saved)


def _refine_one(
    entry: TomogramEntry,
    checkpoint: Path,
    project_dir: Path,
    config_file: Path | None,
    writer: StateWriter,
    callbacks: DatasetCallbacks,
    summary: DatasetSummary,
    *,
    overwrite: bool,
) -> bool:
    """Refine one tomogram unless done before; record the outcome, never raise for it.

    Returns whether it was refined (or failed) now, not skipped.
    """
    from deepdewedge.pipeline.refining import refine_tomogram

    known = read_state(project_dir)["tomograms"].get(entry.name)
    if entry.error is not None:
        summary.failed[entry.name] = entry.error
        if not known or known.get("error") != entry.error:
            _record(writer, callbacks, entry, status="failed", error=entry.error)
        return True
    if not overwrite and _is_done(known, checkpoint, entry):
        summary.skipped.append(entry.name)
        return False
    _record(writer, callbacks, entry, status="running", model=str(checkpoint))
    started = time.perf_counter()
    try:
        config = step_config(
            "refine_tomogram",
            config_file=config_file,
            overrides={
                "project_dir": project_dir,
                "tomo0_files": [entry.tomo0],
                "tomo1_files": [entry.tomo1],
                "model_checkpoint_file": checkpoint,
                "overwrite": True,
            },
        )
        config.tomo_files = None
        (refined,) = refine_tomogram(config, progress=callbacks.tiles, names=[entry.name])
        record = json.loads(refined.with_suffix(".json").read_text())
        outputs = record["outputs"]
        outputs["images"] = _tomogram_images(entry, refined, outputs, project_dir)
    except InputError as err:
        _fail(writer, callbacks, summary, entry, str(err))
        return True
    except Exception as err:  # noqa: BLE001 - one tomogram must not stop the others
        log.debug("%s", traceback.format_exc())
        reason = " ".join(str(err).split()) or type(err).__name__
        _fail(writer, callbacks, summary, entry, f"{entry.tomo0}: {type(err).__name__}: {reason}")
        return True
    _record(
        writer,
        callbacks,
        entry,
        status="refined",
        model=str(checkpoint),
        outputs=outputs,
        seconds={"refine": round(time.perf_counter() - started, 1)},
    )
    summary.refined.append(entry.name)
    return True


def _fail(
    writer: StateWriter,
    callbacks: DatasetCallbacks,
    summary: DatasetSummary,
    entry: TomogramEntry,
    reason: str,
) -> None:
    summary.failed[entry.name] = reason
    log.warning("%s failed: %s", entry.name, reason)
    _record(writer, callbacks, entry, status="failed", error=reason)


def _is_done(known: dict[str, Any] | None, checkpoint: Path, entry: TomogramEntry) -> bool:
    """Whether `entry` was refined with `checkpoint` from the same files and still exists."""
    if not known or known.get("status") != "refined" or known.get("model") != str(checkpoint):
        return False
    if known.get("tomo0") != str(entry.tomo0) or known.get("tomo1") != str(entry.tomo1):
        return False
    return Path(known.get("outputs", {}).get("refined", "")).exists()


def _tomogram_images(
    entry: TomogramEntry, refined: Path, outputs: dict[str, str], project_dir: Path
) -> dict[str, str]:
    """Write the report's figures of one refined tomogram; their paths by kind."""
    from deepdewedge.io.atomic import atomic_write
    from deepdewedge.io.mrc import map_volume
    from deepdewedge.pipeline.report_images import tomogram_images

    source = entry.full if entry.full is not None and entry.full.exists() else entry.tomo0
    volume, _ = map_volume(source)
    refined_volume, _ = map_volume(refined)
    difference = None
    if outputs.get("half_difference"):
        difference, _ = map_volume(outputs["half_difference"])
    images = tomogram_images(volume, refined_volume, difference)
    paths = {}
    for kind, png in images.items():
        path = state_dir(project_dir) / "images" / f"{entry.name}_{kind}.png"
        with atomic_write(path) as tmp:
            tmp.write_bytes(png)
        paths[kind] = str(path)
    return paths


def write_dataset_outputs(
    project_dir: Path, source: str | Path, entries: dict[str, TomogramEntry]
) -> dict[str, Path]:
    """Merge the state of all shards into ``tomograms.csv``, ``report.html`` (and the STAR).

    `source` names the dataset (its path, or the config that lists its files); tomograms of
    `entries` without a record yet are listed as pending.
    """
    from deepdewedge.pipeline.common import write_csv
    from deepdewedge.pipeline.report import write_report

    project_dir = Path(project_dir)
    state = read_state(project_dir)
    rows = []
    for name in sorted(set(entries) | set(state["tomograms"])):
        record = dict(state["tomograms"].get(name) or {"status": "pending"})
        if record["status"] == "running":
            record["status"] = "pending"  # a run was stopped while refining it
        entry = entries.get(name)
        if entry is not None and "tomo0" not in record:
            record.update(
                tomo0=str(entry.tomo0),
                tomo1=str(entry.tomo1),
                error=entry.error,
                tilt_range_deg=entry.tilt_range_deg,
            )
            if entry.error is not None:
                record["status"] = "failed"
        rows.append({"name": name, **record})
    table = [_csv_row(row) for row in rows]
    outputs = {"table": project_dir / "tomograms.csv", "report": project_dir / "report.html"}
    write_csv(outputs["table"], table)
    fit = state["fit"] or {}
    loss_curve = project_dir / "logs" / "loss_curve.png"
    summary = {
        "dataset": str(source),
        "model": fit.get("checkpoint", ""),
        "fitted on": ", ".join(fit.get("fit_on", [])),
        "fit seconds": fit.get("seconds", ""),
    }
    write_report(
        outputs["report"],
        title=f"DeepDeWedge: {Path(source).name}",
        rows=[_report_row(row, project_dir) for row in rows],
        loss_curve_png=loss_curve.read_bytes() if loss_curve.exists() else None,
        summary=summary,
    )
    if Path(source).suffix == ".star":
        from deepdewedge.io.relion_tomograms import write_tomograms_star_copy

        refined = {
            row["name"]: Path(row["outputs"]["refined"])
            for row in rows
            if row["status"] == "refined"
        }
        outputs["star"] = project_dir / "tomograms.star"
        write_tomograms_star_copy(source, outputs["star"], refined)
    return outputs


def _csv_row(row: dict[str, Any]) -> dict[str, Any]:
    outputs = row.get("outputs") or {}
    tilt_range = row.get("tilt_range_deg") or (None, None)
    return {
        "name": row["name"],
        "status": row["status"],
        "min_tilt_deg": tilt_range[0],
        "max_tilt_deg": tilt_range[1],
        "tomo0": row.get("tomo0"),
        "tomo1": row.get("tomo1"),
        "refined": outputs.get("refined"),
        "half_difference": outputs.get("half_difference"),
        "refine_seconds": (row.get("seconds") or {}).get("refine"),
        "model": row.get("model"),
        "error": row.get("error"),
    }


def _report_row(row: dict[str, Any], project_dir: Path) -> dict[str, Any]:
    outputs = dict(row.get("outputs") or {})
    images = outputs.pop("images", None) or {}
    return {
        "name": row["name"],
        "status": row["status"],
        "error": row.get("error"),
        "tilt_range_deg": row.get("tilt_range_deg"),
        "seconds": row.get("seconds"),
        "outputs": {k: Path(v) for k, v in outputs.items() if v},
        "images": {k: Path(v) for k, v in images.items() if Path(v).exists()},
    }


__all__ = [
    "DatasetCallbacks",
    "DatasetSummary",
    "Shard",
    "parse_shard",
    "run_dataset",
    "write_dataset_outputs",
]
