"""Read a tilt-series alignment in any supported format, recognised from the file's content.

Formats: IMOD ``.xf`` (with its ``.tlt`` and optional ``.xtilt``), AreTomo2/AreTomo3 ``.aln``,
Warp/WarpTools tilt-series ``.xml`` and RELION-5 tilt-series ``.star``. Each reader converts to
:class:`~deepdewedge.io.geometry.TiltSeriesGeometry`; this module picks the reader, checks the
result against the stack and the tilt-angle file, and explains every mismatch in one line.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import fields
from pathlib import Path
from typing import Literal

import numpy as np

from deepdewedge.io.aretomo import read_aretomo_aln, read_aretomo_pre_exposure
from deepdewedge.io.errors import InputError
from deepdewedge.io.geometry import TiltSeriesGeometry
from deepdewedge.io.imod import read_imod_xf
from deepdewedge.io.relion import read_relion_tilt_series_star
from deepdewedge.io.tilts import _read_lines, read_tilt_angles
from deepdewedge.io.warp import read_warp_xml

__all__ = ["alignment_format", "read_alignment"]

logger = logging.getLogger(__name__)

AlignmentFormat = Literal["imod", "aretomo", "warp", "relion"]
_NAMES = {
    "imod": "IMOD .xf",
    "aretomo": "AreTomo .aln",
    "warp": "Warp tilt-series .xml",
    "relion": "RELION-5 tilt-series .star",
}
_ACCEPTED = (
    "give an IMOD .xf (with its .tlt), an AreTomo2/AreTomo3 .aln, a Warp/WarpTools tilt-series "
    ".xml or a RELION-5 tilt-series .star"
)
_EXTENSIONS: dict[str, AlignmentFormat] = {
    ".xf": "imod",
    ".aln": "aretomo",
    ".xml": "warp",
    ".star": "relion",
}
# Tilt angles of the alignment and of the .tlt may differ by this much (degrees).
_ANGLE_TOLERANCE_DEG = 0.5
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def alignment_format(path: str | os.PathLike) -> AlignmentFormat | None:
    """Recognise the format of an alignment file from its content, else its extension.

    Parameters
    ----------
    path
        The alignment file.

    Returns
    -------
    str or None
        ``"warp"`` for XML with root ``<TiltSeries>``, ``"relion"`` for a STAR file
        (``data_`` / ``loop_``), ``"aretomo"`` for an ``# AreTomo`` header or a ``SEC ... ROT``
        column header, ``"imod"`` for rows of six numbers; otherwise the extension decides
        (``.xf``, ``.aln``, ``.xml``, ``.star``), so that a damaged file still reaches its
        reader and gets a precise message; None when nothing matches.

    Raises
    ------
    InputError
        The file is missing, a directory or not text.
    """
    path = Path(path)
    lines = [line for _, line in _read_lines(path, kind="alignment file")]
    if lines and lines[0].startswith("<"):
        roots = (re.match(r"<([A-Za-z_][\w.-]*)", line) for line in lines)
        root = next((m.group(1) for m in roots if m), None)
        return "warp" if root == "TiltSeries" else None
    if any(line.startswith(("data_", "loop_")) for line in lines):
        return "relion"
    comments = [line[1:] for line in lines if line.startswith("#")]
    if any("AreTomo" in c or re.search(r"\bSEC\b.*\bROT\b", c) for c in comments):
        return "aretomo"
    data = [line.split() for line in lines if not line.startswith("#")]
    if data and len(data[0]) == 6 and all(_NUMBER.match(t) for t in data[0]):
        return "imod"
    return _EXTENSIONS.get(path.suffix.lower())


def _fit_to_stack(geometry: TiltSeriesGeometry, n_views: int, path: Path) -> TiltSeriesGeometry:
    """The geometry of the stack's sections; a stack of the kept views only is accepted."""
    if geometry.n_views == n_views:
        return geometry
    kept = ~np.asarray(geometry.excluded, dtype=bool)
    if not kept.all() and int(kept.sum()) == n_views:
        logger.info(
            "%s: the stack has the %d views the alignment keeps; the %d excluded ones are "
            "taken to be absent from it",
            path,
            n_views,
            geometry.n_views - n_views,
        )
        names = [f.name for f in fields(geometry) if f.name != "source"]
        return geometry.with_changes(**{name: getattr(geometry, name)[kept] for name in names})
    raise InputError(
        f"{path}: the alignment has {geometry.n_views} views but the stack has {n_views} "
        "sections; give the alignment computed on this stack (or the stack it was computed on)"
    )


def _with_aretomo_doses(geometry: TiltSeriesGeometry, path: Path) -> TiltSeriesGeometry:
    """Fill the pre-exposure from AreTomo3's ``<name>_TLT.txt`` next to the .aln, if usable."""
    doses = path.with_name(f"{path.stem}_TLT.txt")
    if not doses.is_file():
        return geometry
    try:
        pre = read_aretomo_pre_exposure(doses, n_views=geometry.n_views)
    except InputError as err:
        logger.warning("%s; the pre-exposure stays unknown", err)
        return geometry
    logger.info("%s: pre-exposure from %s", path, doses)
    return geometry.with_changes(pre_exposure_e_per_a2=pre)


def _check_angles(
    geometry: TiltSeriesGeometry, angles: np.ndarray, path: Path, tlt: str | os.PathLike | None
) -> None:
    """Raise if the alignment's and the .tlt's angles differ on some view."""
    if len(angles) != geometry.n_views:
        raise InputError(
            f"{tlt}: {len(angles)} tilt angles for the {geometry.n_views} views of {path}; "
            "give the .tlt of this tilt series or leave it out (the alignment has its angles)"
        )
    difference = np.abs(geometry.tilt_angle_deg - angles)
    if (difference > _ANGLE_TOLERANCE_DEG).any():
        view = int(np.argmax(difference > _ANGLE_TOLERANCE_DEG))
        mirrored = bool(np.abs(geometry.tilt_angle_deg + angles).max() <= _ANGLE_TOLERANCE_DEG)
        hint = " (they agree with opposite signs: the alignment inverts the angles)" * mirrored
        raise InputError(
            f"{path}: view {view + 1} has tilt {geometry.tilt_angle_deg[view]:.2f}° but {tlt} "
            f"gives {angles[view]:.2f}° (more than {_ANGLE_TOLERANCE_DEG}° apart){hint}; give "
            "the .tlt of this alignment, or leave it out (the alignment has its own angles)"
        )


def read_alignment(
    path: str | os.PathLike,
    *,
    n_views: int,
    pixel_size_angstrom: float,
    tilt_angles: str | os.PathLike | None = None,
    x_tilt_file: str | os.PathLike | None = None,
) -> TiltSeriesGeometry:
    """Read the alignment of a raw tilt series, whichever program wrote it.

    Parameters
    ----------
    path
        IMOD ``.xf``, AreTomo ``.aln``, Warp ``.xml`` or RELION-5 tilt-series ``.star``; the
        format is recognised from the content (:func:`alignment_format`).
    n_views
        Number of sections of the raw stack the alignment is applied to.
    pixel_size_angstrom
        Pixel size of that stack in Å (Warp and RELION-5 store shifts in Å).
    tilt_angles
        ``.tlt`` / ``.rawtlt`` of the stack. Required for IMOD (an ``.xf`` has no angles);
        for RELION-5 it places the rows on the stack's sections by angle; for AreTomo and
        Warp it is checked against the alignment's angles.
    x_tilt_file
        IMOD ``.xtilt`` (IMOD only).

    Returns
    -------
    TiltSeriesGeometry
        One view per section of the stack. For AreTomo3, the pre-exposure is filled from the
        ``<name>_TLT.txt`` next to the ``.aln`` when it exists and has a dose column.

    Raises
    ------
    InputError
        An unknown format (the message lists the accepted ones), an ``.xf`` without
        ``tilt_angles``, an ``.xtilt`` for another format, a view count other than
        ``n_views``, alignment and ``.tlt`` angles more than 0.5° apart on a view, or any
        problem the format's reader finds.

    Notes
    -----
    A stack that holds only the views the alignment keeps (Warp's ``ts_stack`` writes only
    the tilts with ``UseTilt``; AreTomo can save its stack without the dark views) is
    accepted when its section count equals the number of kept views.
    """
    path = Path(path)
    kind = alignment_format(path)
    if kind is None:
        raise InputError(f"{path}: not a tilt-series alignment this program reads; {_ACCEPTED}")
    if x_tilt_file is not None and kind != "imod":
        raise InputError(
            f"{x_tilt_file}: an .xtilt goes with an IMOD .xf, not with the {_NAMES[kind]} "
            f"{path}; leave it out"
        )
    angles = None if tilt_angles is None else read_tilt_angles(tilt_angles)
    if kind == "imod":
        if angles is None:
            raise InputError(
                f"{path}: an IMOD .xf holds no tilt angles; give the .tlt written with it too"
            )
        geometry = read_imod_xf(path, tilt_angles_deg=angles, x_tilt_file=x_tilt_file)
    elif kind == "relion":
        geometry = read_relion_tilt_series_star(
            path,
            pixel_size_angstrom=pixel_size_angstrom,
            stack_tilt_angles_deg=angles,
            stack_angles_source=str(tilt_angles),
        )
    elif kind == "warp":
        geometry = read_warp_xml(path, pixel_size_angstrom=pixel_size_angstrom)
    else:
        geometry = _with_aretomo_doses(read_aretomo_aln(path), path)
    geometry = _fit_to_stack(geometry, n_views, path)
    if angles is not None and kind in ("aretomo", "warp"):
        _check_angles(geometry, angles, path, tilt_angles)
    return geometry
