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

A RELION-5 ``tomograms.star`` lists the tomograms in its ``data_global`` loop: ``rlnTomoName``,
``rlnTomoTiltSeriesStarFile`` (the tilt series' STAR file) and, from a 'Reconstruct
tomograms' job, ``rlnTomoReconstructedTomogram`` or, with ``--generate_split_tomograms``,
``rlnTomoReconstructedTomogramHalf1`` and ``Half2``, the tomograms of the even and odd frames
(``{job}/tomograms/rec_{name}_half1.mrc`` and ``_half2.mrc``; ``TomoBackprojectProgram``).
RELION writes paths relative to the project folder it runs in, usually two folders above the
STAR file (``Tomograms/job008/tomograms.star``), so a relative path is looked up in the
current folder, then in the STAR file's folder and each folder above it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deepdewedge.io.atomic import atomic_write
from deepdewedge.io.dataset import TomogramEntry
from deepdewedge.io.errors import InputError
from deepdewedge.io.geometry import TiltSeriesGeometry
from deepdewedge.io.tilts import _number, _read_lines, _show

__all__ = [
    "StarBlock",
    "read_relion_tilt_series_star",
    "read_relion_tomograms_star",
    "read_star",
    "relion_tilt_range_deg",
    "write_tomograms_star_copy",
]

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


# --------------------------------------------------------------------------- tomograms.star

_HALF_COLUMNS = ("rlnTomoReconstructedTomogramHalf1", "rlnTomoReconstructedTomogramHalf2")
_FULL_COLUMN = "rlnTomoReconstructedTomogram"
_SERIES_COLUMN = "rlnTomoTiltSeriesStarFile"
_TOMOGRAMS_FIX = (
    "give the tomograms.star of a RELION-5 'Reconstruct tomograms' job run with "
    "--generate_split_tomograms"
)


def _global_table(path: Path, blocks: list[StarBlock]) -> StarBlock:
    """The ``data_global`` loop of a tomograms.star, with the columns a dataset needs."""
    table = next((b for b in blocks if b.name == "global" and b.columns), None)
    if table is None:
        raise InputError(f"{path}: no data_global loop; {_TOMOGRAMS_FIX}")
    for column in ("rlnTomoName", *_HALF_COLUMNS):
        if column not in table.columns:
            raise InputError(f"{path}: data_global has no column _{column}; {_TOMOGRAMS_FIX}")
    return table


def _bases(star: Path) -> list[Path]:
    """Folders a relative path of `star` may be relative to: cwd, then `star`'s and above."""
    folder = Path(os.path.abspath(star)).parent
    return [Path.cwd(), folder, *folder.parents]


def _resolve(star: Path, value: str) -> Path | None:
    """The existing file `value` names, relative paths tried against :func:`_bases`."""
    path = Path(value)
    if path.is_absolute():
        return path if path.exists() else None
    return next((base / path for base in _bases(star) if (base / path).exists()), None)


def _not_found(star: Path, lineno: int, value: str) -> str:
    return (
        f"{value}: no such file (line {lineno} of {star}), neither in the current folder nor "
        f"in {Path(os.path.abspath(star)).parent} or a folder above it; run from the RELION "
        "project folder or correct the path"
    )


def relion_tilt_range_deg(path: str | os.PathLike, name: str | None = None) -> tuple[float, float]:
    """The tilt range of a RELION-5 tilt series: lowest and highest ``rlnTomoYTilt``.

    Parameters
    ----------
    path
        The tilt series' STAR file (``rlnTomoTiltSeriesStarFile``).
    name
        The tomogram's name, to choose its block if the file has several.

    Returns
    -------
    tuple of float
        ``(lowest, highest)`` in degrees. ``rlnTomoYTilt`` is the angle RELION back-projects
        with, in this package's sign (module docstring), alignment offsets included; a file
        without it (not aligned yet) gives the range of ``rlnTomoNominalStageTiltAngle``.
        RELION drops excluded tilts from the file, so every row counts.

    Raises
    ------
    InputError
        A file that cannot be read, without either column, or with an unparsable angle.
    """
    path = Path(path)
    columns = ("rlnTomoYTilt", "rlnTomoNominalStageTiltAngle")
    tables = [b for b in read_star(path) if any(c in b.columns for c in columns) and b.rows]
    if len(tables) > 1:
        tables = [b for b in tables if b.name == name] or tables
    if len(tables) != 1:
        what = "several tilt series" if tables else "no rows with _rlnTomoYTilt"
        raise InputError(f"{path}: {what}; give the tilt-series STAR file of one tomogram")
    table = tables[0]
    column = next(c for c in columns if c in table.columns)
    k = table.columns.index(column)
    fix = f"give the {_KIND}"
    tilts = [_number(path, i, row[k], what=column, fix=fix) for i, row in table.rows]
    return min(tilts), max(tilts)


def read_relion_tomograms_star(path: str | os.PathLike) -> list[TomogramEntry]:
    """Read the half tomograms listed in a RELION-5 ``tomograms.star`` (module docstring).

    Parameters
    ----------
    path
        The ``tomograms.star`` of a 'Reconstruct tomograms' job run with
        ``--generate_split_tomograms``.

    Returns
    -------
    list of TomogramEntry
        One per row of ``data_global``, in file order, named ``rlnTomoName``: ``tomo0`` from
        ``rlnTomoReconstructedTomogramHalf1``, ``tomo1`` from ``Half2``, ``full`` from
        ``rlnTomoReconstructedTomogram`` where the column is present and the file exists.
        Relative paths are looked up in the current folder, then in the STAR file's folder and
        each folder above it (RELION writes them relative to its project folder). The tilt
        range comes from the tilt series' STAR file (:func:`relion_tilt_range_deg`); it is
        None without the ``rlnTomoTiltSeriesStarFile`` column. A half or tilt-series file that
        cannot be found or read gives an entry with an error.

    Raises
    ------
    InputError
        An unreadable STAR file, no ``data_global`` loop, or no ``rlnTomoName``,
        ``rlnTomoReconstructedTomogramHalf1`` or ``Half2`` column (named).
    """
    path = Path(path)
    table = _global_table(path, read_star(path))
    entries = []
    for lineno, row in table.rows:
        value = dict(zip(table.columns, row, strict=True))
        name = value["rlnTomoName"]
        halves = [_resolve(path, value[column]) for column in _HALF_COLUMNS]
        error = next(
            (
                _not_found(path, lineno, value[column])
                for column, half in zip(_HALF_COLUMNS, halves, strict=True)
                if half is None
            ),
            None,
        )
        full = _resolve(path, value[_FULL_COLUMN]) if value.get(_FULL_COLUMN) else None
        tilt_range = None
        series = value.get(_SERIES_COLUMN)
        if series is not None:
            series_path = _resolve(path, series)
            if series_path is None:
                error = error or _not_found(path, lineno, series)
            else:
                try:
                    tilt_range = relion_tilt_range_deg(series_path, name)
                except InputError as err:
                    error = error or str(err)
        entries.append(TomogramEntry(name, *halves, full, tilt_range, error))
    return entries


def _star_value(text: str) -> str:
    """A value as a STAR file holds it: quoted where it is empty, spaced or looks reserved."""
    reserved = text.startswith(("_", "#", "$", "'", '"', "data_", "loop_", "save_", "stop_"))
    if text and not reserved and not any(c.isspace() for c in text):
        return text
    return f"'{text}'" if '"' in text else f'"{text}"'


def _relion_path(star: Path, row_value: str, refined: Path) -> str:
    """`refined` relative to the project folder that resolves `row_value`, else absolute."""
    refined = Path(os.path.abspath(refined))
    if not Path(row_value).is_absolute():
        base = next((b for b in _bases(star) if (b / row_value).exists()), None)
        if base is not None and refined.is_relative_to(base):
            return refined.relative_to(base).as_posix()
    return refined.as_posix()


def write_tomograms_star_copy(
    source_star: str | os.PathLike,
    destination: str | os.PathLike,
    refined: dict[str, Path],
) -> Path:
    """Copy a RELION-5 ``tomograms.star``, pointing the refined tomograms at their volumes.

    Parameters
    ----------
    source_star
        The ``tomograms.star`` the dataset was read from.
    destination
        Where the copy is written, atomically.
    refined
        Refined volume of each refined tomogram, by ``rlnTomoName``.

    Returns
    -------
    Path
        `destination`.

    Raises
    ------
    InputError
        A source without the columns :func:`read_relion_tomograms_star` needs, or a
        destination that cannot be written.
    ValueError
        A name in `refined` that the source does not list.

    Notes
    -----
    Every line of the source is copied unchanged (blocks, comments, columns, values and their
    spacing) except, in the ``data_global`` rows of refined tomograms, the value of
    ``rlnTomoReconstructedTomogram``, which becomes the refined volume: relative to the
    project folder that the row's ``Half1`` path is relative to where the volume lies inside
    it, else absolute. Without that column, it is added after the last column; the rows of
    tomograms that were not refined then hold an empty value ``""``.
    """
    source_star = Path(source_star)
    table = _global_table(source_star, read_star(source_star))
    names = table.columns.index("rlnTomoName")
    unknown = sorted(set(refined) - {row[names] for _, row in table.rows})
    if unknown:
        raise ValueError(f"{source_star} does not list the tomograms {', '.join(unknown)}")
    lines = source_star.read_text(encoding="utf-8-sig").splitlines(keepends=True)
    half1 = table.columns.index(_HALF_COLUMNS[0])
    added = _FULL_COLUMN not in table.columns
    k = len(table.columns) if added else table.columns.index(_FULL_COLUMN)
    for lineno, row in table.rows:
        line = lines[lineno - 1]
        body = line.rstrip("\r\n")
        spans = [m.span() for m in _TOKEN.finditer(body)][: len(row)]
        name = row[names]
        if name in refined:
            value = _star_value(_relion_path(source_star, row[half1], refined[name]))
        elif added:
            value = '""'
        else:
            continue
        if added:
            end = spans[-1][1]
            body = f"{body[:end]} {value}{body[end:]}"
        else:
            start, end = spans[k]
            body = body[:start] + value + body[end:]
        lines[lineno - 1] = body + line[len(line.rstrip("\r\n")) :]
    if added:
        start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["data_global"])
        stop = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("data_")), len(lines)
        )
        stop = table.rows[0][0] - 1 if table.rows else stop
        header = max(i for i in range(start, stop) if lines[i].lstrip().startswith("_"))
        numbered = len(lines[header].split()) > 1 and lines[header].split()[1].startswith("#")
        label = f"_{_FULL_COLUMN}" + (f" #{k + 1} " if numbered else "")
        newline = lines[header][len(lines[header].rstrip("\r\n")) :] or "\n"
        lines.insert(header + 1, label + newline)
    destination = Path(destination)
    with atomic_write(destination) as tmp:
        tmp.write_text("".join(lines), encoding="utf-8")
    return destination
