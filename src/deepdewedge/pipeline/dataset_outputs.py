"""What a dataset run shows: per-tomogram figures, the table, the report page and the STAR."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deepdewedge.io.dataset import TomogramEntry
from deepdewedge.pipeline.dataset_state import read_state, state_dir


def tomogram_figures(
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
