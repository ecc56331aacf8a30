"""``ddw evaluate``: compare reconstructions with a ground truth, write JSON, CSV and a figure.

Every volume (an FBP reconstruction, a noise2noise-only and a DeepDeWedge refinement, say) is
compared with the same ground truth; each gives one row of metrics
(:func:`deepdewedge.evaluate.metrics.evaluate_volume`).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np

from deepdewedge import __version__
from deepdewedge.evaluate.figures import fsc_curve_figure
from deepdewedge.evaluate.metrics import FSCCurve, evaluate_volume, particle_box_starts
from deepdewedge.io.atomic import atomic_write
from deepdewedge.io.errors import InputError
from deepdewedge.io.mrc import read_volume
from deepdewedge.io.particles import read_particles
from deepdewedge.pipeline.common import check_writable, save_figure, write_json

__all__ = ["METRIC_COLUMNS", "evaluate", "metrics_table"]

log = logging.getLogger(__name__)

#: Metric keys of a row, in the order of the CSV columns (particle metrics only with particles).
METRIC_COLUMNS = (
    "cc",
    "cc_outside_wedge",
    "cc_inside_wedge",
    "fsc_0143_angstrom",
    "fsc_05_angstrom",
    "fsc_inside_wedge_0143_angstrom",
    "fsc_inside_wedge_05_angstrom",
    "particle_fsc_0143_angstrom",
    "particle_fsc_05_angstrom",
    "particle_fsc_inside_wedge_0143_angstrom",
    "particle_fsc_inside_wedge_05_angstrom",
    "n_particles",
    "n_particles_skipped",
)
_PANELS = {
    "fsc": "tomogram",
    "fsc_inside_wedge": "tomogram, inside the missing wedge",
    "particle_fsc": "particles",
    "particle_fsc_inside_wedge": "particles, inside the missing wedge",
}
_TABLE = (
    ("cc", "CC", "{:.4f}"),
    ("cc_outside_wedge", "CC out", "{:.4f}"),
    ("cc_inside_wedge", "CC in", "{:.4f}"),
    ("fsc_0143_angstrom", "FSC0.143 Å", "{:.1f}"),
    ("fsc_05_angstrom", "FSC0.5 Å", "{:.1f}"),
    ("fsc_inside_wedge_0143_angstrom", "FSC-in0.143 Å", "{:.1f}"),
    ("particle_fsc_0143_angstrom", "pFSC0.143 Å", "{:.1f}"),
    ("particle_fsc_05_angstrom", "pFSC0.5 Å", "{:.1f}"),
    ("particle_fsc_inside_wedge_0143_angstrom", "pFSC-in0.143 Å", "{:.1f}"),
    ("n_particles", "particles", "{:d}"),
)
_FIGURE_FORMATS = (".png", ".pdf", ".svg")


def evaluate(
    volumes: Sequence[str | os.PathLike],
    ground_truth: str | os.PathLike,
    *,
    mw_angle_deg: float,
    tilt_range_deg: tuple[float, float] | None = None,
    voxel_size_angstrom: float | None = None,
    particles: str | os.PathLike | None = None,
    box_size_px: int | None = None,
    labels: Sequence[str] | None = None,
    json_path: str | os.PathLike | None = None,
    csv_path: str | os.PathLike | None = None,
    figure_path: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Compare each volume with the ground truth and write the requested outputs.

    Parameters
    ----------
    volumes
        MRC volumes to evaluate, each of the ground truth's shape.
    ground_truth
        The MRC ground truth.
    mw_angle_deg
        Full opening angle of the missing wedge of the tilt series, in degrees.
    tilt_range_deg
        ``(lowest, highest)`` tilt in degrees, for an asymmetric wedge; replaces
        `mw_angle_deg` in the split into inside and outside the wedge.
    voxel_size_angstrom
        Voxel size in Å; default from the MRC headers (volumes first, then ground truth).
    particles
        Particle list (see :func:`deepdewedge.io.particles.read_particles`) for the
        per-particle FSC.
    box_size_px
        Box edge around each particle; default the largest ``box_px`` of the particle list.
    labels
        One name per volume for the table and the figure; default the file names.
    json_path, csv_path, figure_path
        Outputs, each written atomically when given: all metrics and curves with the inputs
        and the command line (JSON), one row per volume (CSV), and FSC curves (PNG, PDF, SVG).

    Returns
    -------
    list of dict
        One row per volume: ``label``, ``volume`` and the metrics.

    Raises
    ------
    InputError
        One line naming the file or option at fault and the fix, before any metric is computed.
    """
    started = time.perf_counter()
    volume_paths = [Path(v) for v in volumes]
    gt_path = Path(ground_truth)
    names = _labels(volume_paths, labels)
    _check_options(mw_angle_deg, voxel_size_angstrom, box_size_px, particles)
    outputs = {
        "json": None if json_path is None else Path(json_path),
        "csv": None if csv_path is None else Path(csv_path),
        "figure": None if figure_path is None else Path(figure_path),
    }
    _check_outputs(outputs)

    gt_view, _ = read_volume(gt_path, mmap=True)
    shape = tuple(gt_view.shape)
    del gt_view
    for path in volume_paths:
        view, _ = read_volume(path, mmap=True)
        if tuple(view.shape) != shape:
            raise InputError(
                f"{path}: shape {tuple(view.shape)} (z, y, x) differs from the ground truth's "
                f"{shape} ({gt_path}); give volumes of the ground truth's size and binning"
            )
        del view
    voxel = _voxel_size(voxel_size_angstrom, volume_paths, gt_path)
    centres, box = _particles(particles, box_size_px, shape)

    ground = _read_nonconstant(gt_path)
    rows: list[dict[str, Any]] = []
    curves: dict[str, dict[str, FSCCurve]] = {}
    for name, path in zip(names, volume_paths, strict=True):
        volume = _read_nonconstant(path)
        result = evaluate_volume(
            volume,
            ground,
            voxel_size_angstrom=voxel,
            mw_angle_deg=None if tilt_range_deg is not None else float(mw_angle_deg),
            tilt_range_deg=tilt_range_deg,
            particles_zyx=centres,
            box_size_px=box,
        )
        rows.append({"label": name, "volume": str(path), **result.metrics})
        curves[name] = result.curves
        log.info("evaluated %s", path)

    if outputs["json"] is not None:
        write_json(
            outputs["json"],
            _clean(
                {
                    "deepdewedge_version": __version__,
                    "command_line": " ".join(sys.argv),
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "seconds": round(time.perf_counter() - started, 3),
                    "ground_truth": str(gt_path),
                    "shape_zyx": list(shape),
                    "voxel_size_angstrom": voxel,
                    "mw_angle_deg": float(mw_angle_deg),
                    "tilt_range_deg": tilt_range_deg,
                    "particles": None if particles is None else str(particles),
                    "box_size_px": box,
                    "results": rows,
                    "curves": {
                        name: {kind: _curve_record(c) for kind, c in by_kind.items()}
                        for name, by_kind in curves.items()
                    },
                }
            ),
        )
    if outputs["csv"] is not None:
        _write_csv(outputs["csv"], rows)
    if outputs["figure"] is not None:
        panels = {
            title: {name: _pair(by_kind[kind]) for name, by_kind in curves.items()}
            for kind, title in _PANELS.items()
            if kind in next(iter(curves.values()))
        }
        save_figure(fsc_curve_figure(panels), outputs["figure"])
    return rows


def metrics_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of evaluation rows: one line per volume, resolutions in Å.

    ``CC out``/``CC in`` are the correlation coefficients outside/inside the missing wedge,
    ``FSC-in`` the FSC inside the missing wedge and ``pFSC`` the mean FSC of the particles.
    """
    columns = [(key, title, fmt) for key, title, fmt in _TABLE if any(key in r for r in rows)]
    header = ["volume", *(title for _, title, _ in columns)]
    body = [
        [str(row["label"]), *(_format(row.get(key), fmt) for key, _, fmt in columns)]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = []
    for line in [header, *body]:
        cells = [line[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def _format(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return fmt.format(value)


def _labels(volume_paths: list[Path], labels: Sequence[str] | None) -> list[str]:
    if not volume_paths:
        raise InputError("--volume: no volume given; give at least one --volume FILE.mrc")
    if labels:
        if len(labels) != len(volume_paths):
            raise InputError(
                f"--label: given {len(labels)} times for {len(volume_paths)} volumes; give one "
                "--label per --volume, in the same order, or none"
            )
        names = [str(label) for label in labels]
    else:
        stems = [p.stem for p in volume_paths]
        names = stems if len(set(stems)) == len(stems) else [str(p) for p in volume_paths]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(
            f"--label: {duplicates[0]!r} names more than one volume; give each volume its own "
            "--label"
        )
    return names


def _check_options(
    mw_angle_deg: float,
    voxel_size_angstrom: float | None,
    box_size_px: int | None,
    particles: str | os.PathLike | None,
) -> None:
    if not (isinstance(mw_angle_deg, int | float) and 0.0 <= mw_angle_deg < 180.0):
        raise InputError(
            f"--mw-angle {mw_angle_deg}: the missing wedge's opening angle must lie in [0, 180) "
            "degrees; give 180 - (max tilt - min tilt), e.g. 60 for tilts of ±60°"
        )
    if voxel_size_angstrom is not None and not (
        math.isfinite(voxel_size_angstrom) and voxel_size_angstrom > 0
    ):
        raise InputError(
            f"--voxel-size-angstrom {voxel_size_angstrom}: must be a positive number of Å"
        )
    if box_size_px is not None:
        if particles is None:
            raise InputError(
                "--box-size: given without --particles; give the particle list too, or drop it"
            )
        if box_size_px < 2:
            raise InputError(f"--box-size {box_size_px}: must be at least 2 voxels")


def _check_outputs(outputs: dict[str, Path | None]) -> None:
    figure = outputs["figure"]
    if figure is not None and figure.suffix.lower() not in _FIGURE_FORMATS:
        raise InputError(
            f"{figure}: unknown figure format {figure.suffix or '(no suffix)'!r}; name the "
            f"figure with one of {', '.join(_FIGURE_FORMATS)}"
        )
    for path in outputs.values():
        if path is None:
            continue
        if path.is_dir():
            raise InputError(f"{path}: is a directory; give a file name for this output")
        check_writable(path.parent)


def _read_nonconstant(path: Path) -> np.ndarray:
    volume, _ = read_volume(path)
    if volume.min() == volume.max():
        raise InputError(
            f"{path}: every voxel is {volume.flat[0]:g}, nothing to compare; check that this is "
            "the right file (a failed or empty reconstruction?)"
        )
    return volume


def _header_voxel_size(path: Path) -> float | None:
    """Voxel size (x spacing) in Å recorded in an MRC header; None where it is 0 (unset)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.open(path, mode="r", permissive=True, header_only=True) as mrc:
            value = float(mrc.voxel_size.x)
    return value if math.isfinite(value) and value > 0 else None


def _voxel_size(given: float | None, volume_paths: list[Path], gt_path: Path) -> float:
    if given is not None:
        return float(given)
    found = {p: _header_voxel_size(p) for p in [*volume_paths, gt_path]}
    known = {p: v for p, v in found.items() if v is not None}
    if not known:
        raise InputError(
            f"{volume_paths[0]}: no voxel size in its MRC header, nor in the other inputs' "
            "headers; give --voxel-size-angstrom"
        )
    (first, value), *others = known.items()
    for path, other in others:
        if abs(other - value) > 1e-3 * value:
            raise InputError(
                f"{path}: voxel size {other:g} Å in the header, but {value:g} Å in {first}'s; "
                "give --voxel-size-angstrom to choose"
            )
    return value


def _particles(
    particles: str | os.PathLike | None, box_size_px: int | None, shape: tuple[int, ...]
) -> tuple[np.ndarray | None, int | None]:
    if particles is None:
        return None, None
    path = Path(particles)
    listed = read_particles(path)
    if box_size_px is not None:
        box = int(box_size_px)
    elif listed.box_px is not None:
        box = int(listed.box_px.max())
    else:
        raise InputError(f"{path}: no box_px column; give the box edge with --box-size")
    if box > min(shape):
        raise InputError(
            f"{path}: box size {box} voxels is larger than the volume {shape} (z, y, x); give "
            "a smaller --box-size"
        )
    _, inside = particle_box_starts(listed.centres_zyx, box_size_px=box, shape_zyx=shape)
    n_inside, n_total = int(inside.sum()), int(inside.numel())
    if n_inside == 0:
        raise InputError(
            f"{path}: none of the {n_total} particles has its {box}-voxel box inside the volume "
            f"{shape} (z, y, x); check that the centres are z, y, x in voxels of this volume, "
            "or give a smaller --box-size"
        )
    if n_inside < n_total:
        log.warning(
            "%s: %d of %d particles have a box leaving the volume and are skipped",
            path,
            n_total - n_inside,
            n_total,
        )
    return listed.centres_zyx, box


def _pair(curve: FSCCurve) -> tuple[np.ndarray, np.ndarray]:
    return curve.frequencies_per_angstrom.numpy(), curve.fsc.numpy()


def _curve_record(curve: FSCCurve) -> dict[str, list[float]]:
    return {
        "frequencies_per_angstrom": curve.frequencies_per_angstrom.tolist(),
        "fsc": curve.fsc.tolist(),
        "n_coefficients": curve.n_coefficients.tolist(),
    }


def _clean(value: Any) -> Any:
    """NaN and infinities become None (JSON null): strict JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys = [k for k in METRIC_COLUMNS if any(k in row for row in rows)]
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["label", "volume", *keys])
        for row in rows:
            writer.writerow([row["label"], row["volume"], *(_csv_value(row.get(k)) for k in keys)])


def _csv_value(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value
