"""``ddw score-heldout``: score tomograms by reprojection against the views held out of them.

``ddw reconstruct --holdout every:4`` leaves views out of every tomogram it makes and writes
them, prepared like the others, beside the tomograms; its record names them. Any volume made
from those tomograms (the full tomogram, a refined one) is then scored by
:func:`deepdewedge.evaluate.reprojection.reprojection_score`, with no ground truth.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deepdewedge.evaluate.figures import fsc_curve_figure
from deepdewedge.evaluate.reprojection import reprojection_score
from deepdewedge.io.errors import InputError
from deepdewedge.io.mrc import read_volume
from deepdewedge.pipeline.common import save_figure, write_csv

__all__ = ["score_heldout"]


def score_heldout(
    record: str | os.PathLike,
    volumes: Sequence[str | os.PathLike],
    *,
    labels: Sequence[str] | None = None,
    csv_path: str | os.PathLike | None = None,
    figure_path: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Score each volume against the held-out views named in a ``*_reconstruct.json`` record.

    Returns one row per volume: ``label``, ``volume``, ``mean_cc``, ``mean_frc`` (over views
    and rings up to half Nyquist) and ``cc_per_view``. The CSV holds one row per volume and
    view; the figure, the mean FRC of each volume.
    """
    record = Path(record)
    try:
        meta = json.loads(record.read_text())
    except (OSError, ValueError) as err:
        raise InputError(
            f"{record}: not a readable reconstruct record ({err}); give the "
            "*_reconstruct.json that ddw reconstruct wrote"
        ) from None
    heldout = meta.get("heldout")
    if not heldout:
        raise InputError(
            f"{record}: no views were held out of this reconstruction; run ddw reconstruct "
            "with --holdout every:4 (or highest:K) first"
        )
    stack_path = Path(heldout["stack"])
    if not stack_path.is_absolute() and not stack_path.exists():
        stack_path = record.parent / stack_path.name
    views, pixel = read_volume(stack_path)
    angles = np.asarray(heldout["tilt_angles_deg"], dtype=np.float32)
    labels = list(labels) if labels else [Path(v).name for v in volumes]
    if len(labels) != len(volumes):
        raise InputError(f"{len(labels)} labels for {len(volumes)} volumes; give one per volume")
    rows, view_rows, curves = [], [], {}
    for label, path in zip(labels, volumes, strict=True):
        volume, _ = read_volume(path)
        if volume.shape[1:] != views.shape[1:]:
            raise InputError(
                f"{path}: shape {volume.shape} does not match the held-out views "
                f"{views.shape[1:]} (y, x) of {record}; score volumes of that reconstruction"
            )
        score = reprojection_score(volume, views, angles, pixel_size_angstrom=pixel or 1.0)
        rows.append(
            {
                "label": label,
                "volume": str(path),
                "mean_cc": score.mean_cc,
                "mean_frc": score.mean_frc,
                "cc_per_view": score.cc.tolist(),
            }
        )
        view_rows += [
            {"label": label, "view": view, "tilt_angle_deg": float(angle), "cc": float(cc)}
            for view, angle, cc in zip(heldout["views"], angles, score.cc, strict=True)
        ]
        curves[label] = (score.frc_frequencies, np.nanmean(score.frc, axis=0))
    if csv_path is not None:
        write_csv(Path(csv_path), view_rows)
    if figure_path is not None:
        figure = fsc_curve_figure(
            {"held-out views: mean FRC of the reprojections": curves},
            thresholds=(),
            ylabel="FRC",
        )
        save_figure(figure, Path(figure_path))
    return rows
