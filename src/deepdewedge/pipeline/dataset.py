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

import json
import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from deepdewedge.config import DatasetConfig, step_config
from deepdewedge.io.dataset import TomogramEntry, entries_from_lists, read_dataset
from deepdewedge.io.errors import InputError
from deepdewedge.io.tilt_series_folder import read_tilt_series_folder
from deepdewedge.pipeline.dataset_fit import choose_fit_on, fit_dataset
from deepdewedge.pipeline.dataset_outputs import tomogram_figures, write_dataset_outputs
from deepdewedge.pipeline.dataset_reconstruct import reconstruct_series
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


@dataclass
class DatasetCallbacks:
    """Progress hooks; the pipeline itself never prints.

    ``fit`` is handed to the fitting loop (:class:`deepdewedge.fit.loop.Callbacks`);
    ``message(text)`` tells what the run is doing (e.g. which tilt series it reconstructs);
    ``tiles(done, total)`` follows the tiles of the tomogram being refined;
    ``tomogram(name, record)`` follows every change of a tomogram's state.
    """

    fit: Any = None
    message: Callable[[str], None] | None = None
    tiles: Callable[[int, int], None] | None = None
    tomogram: Callable[[str, dict[str, Any]], None] | None = None


@dataclass
class DatasetSummary:
    """What a dataset run did, over the tomograms of its shard."""

    checkpoint: Path | None
    refined: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # refined before, not redone
    failed: dict[str, str] = field(default_factory=dict)  # name -> one-line reason
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
    checkpoint = model_checkpoint_file
    if checkpoint is None and not (overwrite and steps != "refine"):
        checkpoint = _fitted_model(project_dir, config_file, any_fit=steps == "refine")
    if checkpoint is None and steps == "refine":
        raise InputError(
            f"{project_dir}: no fitted model; give --model-checkpoint-file or fit first with "
            "ddw run and the same --dataset and --project-dir"
        )
    if checkpoint is None and not shard.is_whole:
        raise InputError(
            f"{project_dir}: no fitted model for shard {shard.index}/{shard.count}; fit first "
            "with the same ddw run command and --stop-after fit (no shard), then start the "
            "shards"
        )
    entries = {
        e.name: e for e in _entries(config, config_file, shard, callbacks, overwrite=overwrite)
    }
    source = config.path or str(config_file)
    writer = StateWriter(project_dir, shard, source)
    summary = DatasetSummary(checkpoint=None)
    if checkpoint is None:
        chosen = choose_fit_on(list(entries.values()), config.fit_on, source)
        checkpoint = fit_dataset(
            chosen,
            project_dir,
            config_file,
            writer,
            fit_callbacks=callbacks.fit,
            on_tomogram=callbacks.tomogram,
            overwrite=overwrite,
        )
    summary.checkpoint = Path(checkpoint)
    if steps == "fit":
        return summary

    last_written = time.monotonic()
    known = read_state(project_dir)["tomograms"]  # shards never share a tomogram
    for name in shard.take(list(entries)):
        refined = _refine_one(
            entries[name],
            known.get(name),
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


def _entries(
    config: DatasetConfig,
    config_file: Path | None,
    shard: Shard,
    callbacks: DatasetCallbacks,
    *,
    overwrite: bool,
) -> list[TomogramEntry]:
    """The dataset's tomograms, their halves checked: from its path, else the config's lists.

    A folder of tilt series is reconstructed first: all of them in a run over the whole
    dataset, a shard's own in a shard.
    """
    if config.path is not None:
        try:
            return [_checked(e) for e in read_dataset(config.path)]
        except InputError:
            path = Path(config.path)
            series = read_tilt_series_folder(path) if path.is_dir() else []
            if not series:
                raise
        # Options missing for every tilt series (thickness) stop the run, not each tomogram.
        step_config(
            "reconstruct", config_file=config_file, overrides=series[0].reconstruct_options()
        )
        mine = set(shard.take([s.name for s in series]))
        entries = []
        for i, files in enumerate(s for s in series if s.name in mine):
            if callbacks.message is not None:
                callbacks.message(f"reconstructing {files.name} ({i + 1} of {len(mine)})")
            entry = reconstruct_series(
                files, Path(config.project_dir), config_file, overwrite=overwrite
            )
            entries.append(_checked(entry))
        return entries
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


def _fitted_model(project_dir: Path, config_file: Path | None, *, any_fit: bool) -> Path | None:
    """The checkpoint of the finished fit recorded in the state, if it still exists.

    With `any_fit`, else the best checkpoint of a fit made in the project's ``logdir`` by
    other means (``ddw fit-model``).
    """
    fit = read_state(project_dir)["fit"]
    if fit and fit.get("status") == "done" and Path(fit["checkpoint"]).exists():
        return Path(fit["checkpoint"])
    if any_fit:
        from deepdewedge.pipeline.fitting import best_checkpoint, log_dir

        fit_config = step_config(
            "fit_model", config_file=config_file, overrides={"project_dir": project_dir}
        )
        checkpoint = best_checkpoint(log_dir(fit_config) / "checkpoints")  # type: ignore[arg-type]
        return checkpoint if checkpoint.exists() else None
    return None


def _refine_one(
    entry: TomogramEntry,
    known: dict[str, Any] | None,
    checkpoint: Path,
    project_dir: Path,
    config_file: Path | None,
    writer: StateWriter,
    callbacks: DatasetCallbacks,
    summary: DatasetSummary,
    *,
    overwrite: bool,
) -> bool:
    """Refine one tomogram unless done before (`known`: its record); never raise for it.

    Returns whether it was refined (or failed) now, not skipped. An unexpected error's
    traceback goes to ``dataset/errors/{name}.txt``; its one-line reason to the state.
    """
    from deepdewedge.pipeline.refining import refine_tomogram

    if entry.error is not None:
        summary.failed[entry.name] = entry.error
        if not known or known.get("error") != entry.error:
            writer.set_entry(entry, callbacks.tomogram, status="failed", error=entry.error)
        return True
    if not overwrite and _is_done(known, checkpoint, entry):
        summary.skipped.append(entry.name)
        return False
    writer.set_entry(entry, callbacks.tomogram, status="running", model=str(checkpoint))
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
        outputs["images"] = tomogram_figures(entry, refined, outputs, project_dir)
    except InputError as err:
        _fail(writer, callbacks, summary, entry, str(err))
        return True
    except Exception as err:  # noqa: BLE001 - one tomogram must not stop the others
        details = state_dir(project_dir) / "errors" / f"{entry.name}.txt"
        details.parent.mkdir(parents=True, exist_ok=True)
        details.write_text(traceback.format_exc())
        reason = " ".join(str(err).split()) or type(err).__name__
        reason = f"{entry.tomo0}: {type(err).__name__}: {reason} (details in {details})"
        _fail(writer, callbacks, summary, entry, reason)
        return True
    writer.set_entry(
        entry,
        callbacks.tomogram,
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
    writer.set_entry(entry, callbacks.tomogram, status="failed", error=reason)


def _is_done(known: dict[str, Any] | None, checkpoint: Path, entry: TomogramEntry) -> bool:
    """Whether `entry` was refined with `checkpoint` from the same files and still exists."""
    if not known or known.get("status") != "refined" or known.get("model") != str(checkpoint):
        return False
    if known.get("tomo0") != str(entry.tomo0) or known.get("tomo1") != str(entry.tomo1):
        return False
    return Path(known.get("outputs", {}).get("refined", "")).exists()


__all__ = [
    "DatasetCallbacks",
    "DatasetSummary",
    "Shard",
    "parse_shard",
    "run_dataset",
    "write_dataset_outputs",
]
