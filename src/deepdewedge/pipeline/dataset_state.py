"""The state of a dataset run: what is done, what failed, which shard does what.

A dataset run keeps its state in ``{project_dir}/dataset/``: ``state.json`` for a run over
the whole dataset, ``state.shard-K-of-N.json`` for shard K of N (a SLURM array task), so no
two processes ever write the same file. Each file maps tomogram names to records; reading the
state merges every file, the latest record of each tomogram winning. Files are written
atomically after every change, so a kill at any point leaves a readable state.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepdewedge.io.atomic import atomic_write
from deepdewedge.io.dataset import TomogramEntry
from deepdewedge.io.errors import InputError

STATE_VERSION = 1
# Statuses of a tomogram; "running" is only ever seen after a kill, and means "pending".
STATUSES = ("pending", "running", "refined", "failed")


@dataclass(frozen=True)
class Shard:
    """Shard `index` (1-based) of `count`: every `count`-th tomogram in name order."""

    index: int = 1
    count: int = 1

    @property
    def is_whole(self) -> bool:
        """Whether this shard is the whole dataset."""
        return self.count == 1

    @property
    def label(self) -> str:
        """``K-of-N``, as in the shard's state file name."""
        return f"{self.index}-of-{self.count}"

    def take(self, names: list[str]) -> list[str]:
        """The names of this shard: round robin over `names` sorted, so shards balance."""
        return sorted(names)[self.index - 1 :: self.count]


def parse_shard(text: str | None, environ: dict[str, str] | None = None) -> Shard:
    """The shard of this process: ``K/N`` from `text`, else from a SLURM array task, else 1/1.

    A SLURM array task takes ``K = SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN + 1`` and
    ``N = SLURM_ARRAY_TASK_COUNT``, so ``--array=0-3`` and ``--array=1-4`` both give shards
    1/4 to 4/4 (arrays with a step, such as ``0-6:2``, need an explicit ``--shard``).
    """
    environ = os.environ if environ is None else environ
    source = "--shard"
    if text is None and "SLURM_ARRAY_TASK_COUNT" in environ:
        try:
            first = int(environ.get("SLURM_ARRAY_TASK_MIN", "0"))
            text = f"{int(environ['SLURM_ARRAY_TASK_ID']) - first + 1}/"
            text += environ["SLURM_ARRAY_TASK_COUNT"]
        except (KeyError, ValueError):
            raise InputError(
                "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT: not whole numbers; give the "
                "shard with --shard K/N"
            ) from None
        source = "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT"
    if text is None:
        return Shard()
    index, _, count = str(text).partition("/")
    try:
        shard = Shard(int(index), int(count))
    except ValueError:
        raise InputError(f"{source}: '{text}' is not K/N; give e.g. --shard 2/4") from None
    if not 1 <= shard.index <= shard.count:
        raise InputError(
            f"{source}: shard {shard.index} of {shard.count} does not exist; shards run from "
            f"1/{shard.count} to {shard.count}/{shard.count}"
        )
    return shard


def state_dir(project_dir: Path) -> Path:
    """Folder of the state files, the per-tomogram images and the dataset's tables."""
    return Path(project_dir) / "dataset"


def state_file(project_dir: Path, shard: Shard) -> Path:
    """The one state file this process writes."""
    name = "state.json" if shard.is_whole else f"state.shard-{shard.label}.json"
    return state_dir(project_dir) / name


def read_state(project_dir: Path) -> dict[str, Any]:
    """Merge every state file of `project_dir`: ``{"fit": {...}, "tomograms": {name: {...}}}``.

    The latest record of each tomogram (by its ``updated`` time) wins, and so does the
    latest fit record. Unreadable files are an error naming the file: deleting it makes the
    run redo what it recorded.
    """
    merged: dict[str, Any] = {"fit": None, "tomograms": {}}
    for path in sorted(state_dir(project_dir).glob("state*.json")):
        state = read_state_file(path)
        fit = state.get("fit")
        if fit and (merged["fit"] is None or fit["updated"] >= merged["fit"]["updated"]):
            merged["fit"] = fit
        for name, record in state["tomograms"].items():
            known = merged["tomograms"].get(name)
            if known is None or record["updated"] >= known["updated"]:
                merged["tomograms"][name] = record
    return merged


class StateWriter:
    """Keeps this process's state file: the records it changed, written after each change."""

    def __init__(self, project_dir: Path, shard: Shard, dataset: str) -> None:
        self.path = state_file(project_dir, shard)
        self.shard = shard
        self.dataset = dataset
        self.fit: dict[str, Any] | None = None
        self.tomograms: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            own = read_state_file(self.path)
            self.fit, self.tomograms = own.get("fit"), own["tomograms"]

    def set_fit(self, **record: Any) -> None:
        """Record the fit (status, checkpoint, the tomograms fitted on, timings)."""
        self.fit = {**record, "updated": time.time()}
        self.save()

    def set(self, name: str, **record: Any) -> dict[str, Any]:
        """Record tomogram `name` (status, files, error, outputs, timings); returns it."""
        if record.get("status") not in STATUSES:
            raise ValueError(f"unknown status {record.get('status')!r}")
        self.tomograms[name] = {**record, "updated": time.time()}
        self.save()
        return self.tomograms[name]

    def set_entry(
        self,
        entry: TomogramEntry,
        on_change: Callable[[str, dict[str, Any]], None] | None = None,
        **record: Any,
    ) -> dict[str, Any]:
        """Record tomogram `entry` with its files and tilt range; tell `on_change`."""
        files = {
            "tomo0": None if entry.tomo0 is None else str(entry.tomo0),
            "tomo1": None if entry.tomo1 is None else str(entry.tomo1),
            "full": None if entry.full is None else str(entry.full),
            "tilt_range_deg": None if entry.tilt_range_deg is None else list(entry.tilt_range_deg),
        }
        saved = self.set(entry.name, **files, **record)
        if on_change is not None:
            on_change(entry.name, saved)
        return saved

    def save(self) -> None:
        """Write the state file atomically."""
        payload = {
            "version": STATE_VERSION,
            "dataset": self.dataset,
            "shard": self.shard.label,
            "fit": self.fit,
            "tomograms": self.tomograms,
        }
        with atomic_write(self.path) as tmp:
            tmp.write_text(json.dumps(payload, indent=1, default=str))


def read_state_file(path: Path) -> dict[str, Any]:
    """One state file, as written by :class:`StateWriter`."""
    try:
        state = json.loads(Path(path).read_text())
        state["tomograms"]  # noqa: B018 - the one key every state file has
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(
            f"{path}: not a readable dataset state; delete it and run again (its tomograms "
            "are then redone)"
        ) from None
    return state
