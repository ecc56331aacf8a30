"""Read a RELION-5 ``tomograms.star`` as a dataset, and write a copy pointing at refined maps.

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
from pathlib import Path

from deepdewedge.io.atomic import atomic_write
from deepdewedge.io.dataset import TomogramEntry
from deepdewedge.io.errors import InputError
from deepdewedge.io.relion import _KIND, _TOKEN, StarBlock, read_star
from deepdewedge.io.tilts import _number

__all__ = ["read_relion_tomograms_star", "relion_tilt_range_deg", "write_tomograms_star_copy"]

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
