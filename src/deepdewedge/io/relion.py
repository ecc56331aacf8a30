"""Read a RELION-5 tilt-series STAR file (``tilt_series/<name>.star``), with a minimal STAR parser.

RELION-5 projects the specimen point ``p`` (pixels from the tomogram's centre) to the image
position ``S(shift) Rz(rlnTomoZRot) Ry(rlnTomoYTilt) Rx(rlnTomoXTilt) p`` (pixels from the image
centre), with right-handed rotations and the shift ``rlnTomoX/YShiftAngst`` applied last, in
the raw image (``TomoBackprojectProgram::getProjectMatrices``; RELION-5's IMOD importer sets
``rlnTomoYTilt`` to the ``.tlt`` angle, ``rlnTomoZRot`` to the rotation of ``A⁻¹`` and the shift
to ``-A⁻¹ d``). That is this package's model term by term: ``θ = rlnTomoYTilt``,
``α = rlnTomoXTilt``, ``φ = rlnTomoZRot``, ``s = shift / pixel size``.

RELION-5 keeps one image file per tilt and drops excluded tilts from the STAR file, so its rows
do not name sections of a stack. Without the stack's tilt angles, row ``k`` is taken to be
section ``k`` (a stack built from ``rlnMicrographName`` in file order). With them, each row is
matched to the section of nearest angle (``rlnTomoNominalStageTiltAngle``, else
``rlnTomoYTilt``) within 0.5°, and sections left without a row are excluded views.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deepdewedge.io.errors import InputError
from deepdewedge.io.geometry import TiltSeriesGeometry
from deepdewedge.io.tilts import _number, _read_lines, _show

__all__ = ["StarBlock", "read_relion_tilt_series_star", "read_star"]

_TOKEN = re.compile(r"""'([^']*)'(?=\s|$)|"([^"]*)"(?=\s|$)|(\S+)""")
_KIND = "RELION-5 tilt-series STAR file (tilt_series/<name>.star)"
_REQUIRED = ("rlnTomoYTilt", "rlnTomoZRot", "rlnTomoXShiftAngst", "rlnTomoYShiftAngst")
# A row matches a section whose tilt angle is at most this far from the row's (degrees).
_MATCH_TOLERANCE_DEG = 0.5
_NAMES = ("rlnMicrographName", "rlnMicrographMovieName")


@dataclass
class StarBlock:
    """One ``data_`` block: its key-value pairs and its loop (columns without the ``_``)."""

    name: str
    values: dict[str, str] = field(default_factory=dict)
    columns: list[str] = field(default_factory=list)
    rows: list[tuple[int, list[str]]] = field(default_factory=list)  # (line number, values)


def _tokens(line: str) -> list[str]:
    """Split a STAR line into values, honouring quotes and dropping a trailing comment."""
    tokens = []
    for match in _TOKEN.finditer(line):
        single, double, bare = match.groups()
        if bare is not None and bare.startswith("#"):
            break
        tokens.append(bare if bare is not None else single if single is not None else double)
    return tokens


def read_star(path: str | os.PathLike) -> list[StarBlock]:
    """Parse a STAR file: ``data_`` blocks with key-value pairs and one loop each.

    Parameters
    ----------
    path
        A STAR file as RELION writes it (comments, quoted values, ``loop_`` tables).

    Returns
    -------
    list of StarBlock
        The blocks in file order.

    Raises
    ------
    InputError
        Values outside a block or loop, a key without a value, or a loop row whose number of
        values differs from the number of columns (with its line number).
    """
    path = Path(path)
    blocks: list[StarBlock] = []
    state = "values"  # "values", "columns" (after loop_) or "rows"
    for lineno, line in _read_lines(path, kind="STAR file"):
        tokens = _tokens(line)
        if not tokens or tokens[0] in ("global_", "stop_"):
            continue
        if tokens[0].startswith("data_"):
            blocks.append(StarBlock(name=tokens[0][5:]))
            state = "values"
        elif not blocks:
            raise InputError(
                f"{path}: line {lineno}: {_show(line)} before any data_ block; give a STAR file"
            )
        elif tokens[0] == "loop_":
            if blocks[-1].columns:
                blocks.append(StarBlock(name=blocks[-1].name))
            state = "columns"
        elif tokens[0].startswith("_") and state == "columns":
            blocks[-1].columns.append(tokens[0][1:])
        elif tokens[0].startswith("_"):
            if len(tokens) < 2:
                raise InputError(
                    f"{path}: line {lineno}: {tokens[0]} has no value; give a STAR file"
                )
            blocks[-1].values[tokens[0][1:]] = tokens[1]
            state = "values"
        elif state == "values":
            raise InputError(
                f"{path}: line {lineno}: {_show(line)} outside a loop; give a STAR file"
            )
        else:
            state = "rows"
            if len(tokens) != len(blocks[-1].columns):
                raise InputError(
                    f"{path}: line {lineno} holds {len(tokens)} values for "
                    f"{len(blocks[-1].columns)} columns; give the STAR file RELION wrote"
                )
            blocks[-1].rows.append((lineno, tokens))
    return blocks


def _table(path: Path) -> StarBlock:
    """The block of a tilt-series STAR file that holds the per-tilt loop."""
    blocks = read_star(path)
    tables = [b for b in blocks if "rlnTomoYTilt" in b.columns]
    if len(tables) == 1:
        return tables[0]
    if len(tables) > 1:
        names = ", ".join(f"data_{b.name}" for b in tables)
        raise InputError(f"{path}: several tilt series ({names}); give one tilt series' STAR file")
    if any("rlnTomoTiltSeriesStarFile" in b.columns for b in blocks):
        raise InputError(
            f"{path}: is the tomograms' list; give the tilt-series STAR file named in its "
            "_rlnTomoTiltSeriesStarFile column"
        )
    raise InputError(f"{path}: no loop with column _rlnTomoYTilt; give the {_KIND}")


def _match(
    path: Path, table: StarBlock, reference: np.ndarray, stack: np.ndarray, source: str
) -> np.ndarray:
    """Stack section of every row: the nearest free angle within the tolerance."""
    distance = np.abs(reference[:, None] - stack[None, :])
    sections = np.full(len(reference), -1)
    free = np.ones(len(stack), dtype=bool)
    for row in np.argsort(distance.min(axis=1), kind="stable"):
        candidates = np.flatnonzero(free & (distance[row] <= _MATCH_TOLERANCE_DEG))
        if candidates.size == 0:
            nearest = int(np.argmin(distance[row]))
            lineno, values = table.rows[row]
            name = next((n for n in _NAMES if n in table.columns), None)
            what = f"{values[table.columns.index(name)]!r} at " if name else ""
            raise InputError(
                f"{path}: line {lineno}: {what}tilt {reference[row]:.2f}° has no free view of "
                f"{source} within {_MATCH_TOLERANCE_DEG}° (nearest: view {nearest + 1} at "
                f"{stack[nearest]:.2f}°); give the stack's own tilt angles (e.g. its .rawtlt)"
            )
        sections[row] = candidates[np.argmin(distance[row, candidates])]
        free[sections[row]] = False
    return sections


def read_relion_tilt_series_star(
    path: str | os.PathLike,
    *,
    pixel_size_angstrom: float,
    stack_tilt_angles_deg: np.ndarray | None = None,
    stack_angles_source: str = "the stack",
) -> TiltSeriesGeometry:
    """Read the alignment, exposure and defocus of a RELION-5 tilt series.

    Parameters
    ----------
    path
        The per-tilt-series STAR file (``_rlnTomoYTilt``, ``_rlnTomoZRot``,
        ``_rlnTomoXShiftAngst``, ``_rlnTomoYShiftAngst``; optional ``_rlnTomoXTilt``,
        ``_rlnMicrographPreExposure``, ``_rlnDefocusU/V``, ``_rlnTomoNominalStageTiltAngle``).
    pixel_size_angstrom
        Pixel size of the stack in Å, to turn the shifts (Å) into pixels.
    stack_tilt_angles_deg
        `(n,)` tilt angles of the stack's sections; rows are matched to sections by angle (see
        the module docstring). Without them, row ``k`` is section ``k``.
    stack_angles_source
        Where those angles come from, for messages.

    Returns
    -------
    TiltSeriesGeometry
        One view per row, or per section of the stack when its angles are given (sections
        without a row are excluded). Defocus is the mean of ``rlnDefocusU`` and ``V`` in µm.

    Raises
    ------
    InputError
        A missing column (named), an unparsable value (with its line number), the tomograms'
        list instead of a tilt series, or a row without a view of matching angle.
    ValueError
        A pixel size that is not positive.
    """
    if not pixel_size_angstrom > 0:
        raise ValueError(f"pixel_size_angstrom must be positive, got {pixel_size_angstrom}")
    path = Path(path)
    table = _table(path)
    missing = [name for name in _REQUIRED if name not in table.columns]
    if missing:
        raise InputError(
            f"{path}: no column _{missing[0]}; give the STAR file of an aligned tilt series "
            "(RELION-5 'Align tilt series' output)"
        )
    if not table.rows:
        raise InputError(f"{path}: data_{table.name} has no rows; give the {_KIND}")

    def column(name: str, default: float = np.nan) -> np.ndarray:
        if name not in table.columns:
            return np.full(len(table.rows), default)
        k = table.columns.index(name)
        fix = f"give the {_KIND}"
        return np.array([_number(path, i, row[k], what=name, fix=fix) for i, row in table.rows])

    tilt = column("rlnTomoYTilt")
    u, v = column("rlnDefocusU"), column("rlnDefocusV")
    defocus = np.where(np.isnan(v), u, np.where(np.isnan(u), v, (u + v) / 2)) / 1e4
    per_row = {
        "tilt_angle_deg": tilt,
        "tilt_axis_angle_deg": column("rlnTomoZRot"),
        "shift_x_px": column("rlnTomoXShiftAngst") / pixel_size_angstrom,
        "shift_y_px": column("rlnTomoYShiftAngst") / pixel_size_angstrom,
        "x_tilt_deg": column("rlnTomoXTilt", 0.0),
        "pre_exposure_e_per_a2": column("rlnMicrographPreExposure"),
        "defocus_um": defocus,
    }
    if stack_tilt_angles_deg is None:
        return TiltSeriesGeometry(**per_row, source=str(path))
    stack = np.asarray(stack_tilt_angles_deg, dtype=np.float64).reshape(-1)
    nominal = column("rlnTomoNominalStageTiltAngle")
    reference = nominal if np.isfinite(nominal).all() else tilt
    sections = _match(path, table, reference, stack, stack_angles_source)
    full = {name: np.full(len(stack), np.nan) for name in per_row}
    for name in ("tilt_axis_angle_deg", "shift_x_px", "shift_y_px", "x_tilt_deg"):
        full[name][:] = 0.0
    full["tilt_angle_deg"][:] = stack
    for name, values in per_row.items():
        full[name][sections] = values
    excluded = np.ones(len(stack), dtype=bool)
    excluded[sections] = False
    return TiltSeriesGeometry(**full, excluded=excluded, source=str(path))
