"""Read particle lists: centres ``(z, y, x)`` in voxels and, optionally, box sizes.

Two layouts are read:

- a CSV table with a header naming at least the columns ``z_px``, ``y_px`` and ``x_px`` and
  optionally ``box_px`` (the simulator writes ``particle,template,z_px,y_px,x_px,phi_deg,
  theta_deg,psi_deg,box_px``); other columns are ignored;
- a plain list with three numbers ``z y x`` per line, separated by white space or commas.

Empty lines and lines starting with ``#`` are skipped in both.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np

from deepdewedge.io.errors import InputError

__all__ = ["ParticleList", "read_particles"]

_CENTRE_COLUMNS = ("z_px", "y_px", "x_px")
_SEPARATOR = re.compile(r"[,\s]+")


class ParticleList(NamedTuple):
    """Particles read from a file.

    Attributes
    ----------
    centres_zyx : numpy.ndarray
        `(n, 3)` float64 centres ``(z, y, x)`` in voxels.
    box_px : numpy.ndarray or None
        `(n,)` int box edge per particle in voxels, when the file has a ``box_px`` column.
    """

    centres_zyx: np.ndarray
    box_px: np.ndarray | None


def read_particles(path: str | os.PathLike) -> ParticleList:
    """Read a particle list (CSV table with a header, or plain ``z y x`` lines).

    Parameters
    ----------
    path
        The file.

    Returns
    -------
    ParticleList
        The centres and, if the file gives them, the box sizes.

    Raises
    ------
    InputError
        One line naming the file and what is wrong in it: missing, empty, no ``z_px``/``y_px``/
        ``x_px`` columns, or a value that is not a number.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file; check the path of the particle list")
    if path.is_dir():
        raise InputError(f"{path}: is a directory; give the path of a particle list (.csv)")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(
            f"{path}: cannot read it as text ({err}); give a CSV file or a list of 'z y x' lines"
        ) from None
    lines = [
        (number, line.strip())
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not lines:
        raise InputError(
            f"{path}: no particles in it; give one particle per line (a CSV table with columns "
            "z_px,y_px,x_px or three numbers z y x)"
        )
    first = lines[0][1]
    if re.search(r"[A-Za-z_]", first) and not _is_number_row(first):
        return _read_table(path, lines)
    return _read_plain(path, lines)


def _is_number_row(line: str) -> bool:
    try:
        [float(v) for v in _SEPARATOR.split(line) if v]
    except ValueError:
        return False
    return True


def _number(path: Path, line: int, column: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise InputError(
            f"{path}: line {line}, column {column}: {value!r} is not a number; fix that line"
        )
    return number


def _read_table(path: Path, lines: list[tuple[int, str]]) -> ParticleList:
    delimiter = "," if "," in lines[0][1] else None
    rows = []
    for number, line in lines:
        if delimiter is None:
            fields = line.split()
        else:
            fields = next(csv.reader(io.StringIO(line), delimiter=delimiter))
        rows.append((number, [f.strip() for f in fields]))
    header = rows[0][1]
    missing = [c for c in _CENTRE_COLUMNS if c not in header]
    if missing:
        raise InputError(
            f"{path}: the header has no column {', '.join(missing)} (found {', '.join(header)}); "
            "name the centre columns z_px,y_px,x_px"
        )
    index = {name: header.index(name) for name in header}
    has_box = "box_px" in index
    centres, boxes = [], []
    for number, fields in rows[1:]:
        if len(fields) != len(header):
            raise InputError(
                f"{path}: line {number} has {len(fields)} fields but the header has "
                f"{len(header)}; fix that line"
            )
        centres.append([_number(path, number, c, fields[index[c]]) for c in _CENTRE_COLUMNS])
        if has_box:
            box = _number(path, number, "box_px", fields[index["box_px"]])
            if box != int(box) or box < 2:
                raise InputError(
                    f"{path}: line {number}, column box_px: {fields[index['box_px']]!r} is not "
                    "a whole number of at least 2; fix that line"
                )
            boxes.append(int(box))
    if not centres:
        raise InputError(f"{path}: a header but no particles; add one particle per line")
    return ParticleList(
        np.asarray(centres, dtype=np.float64),
        np.asarray(boxes, dtype=np.int64) if has_box else None,
    )


def _read_plain(path: Path, lines: list[tuple[int, str]]) -> ParticleList:
    centres = []
    for number, line in lines:
        fields = [f for f in _SEPARATOR.split(line) if f]
        if len(fields) != 3:
            raise InputError(
                f"{path}: line {number} has {len(fields)} values, expected 3 (z y x in voxels); "
                "fix that line or give a CSV table with columns z_px,y_px,x_px"
            )
        centres.append([_number(path, number, c, f) for c, f in zip("zyx", fields, strict=True)])
    return ParticleList(np.asarray(centres, dtype=np.float64), None)
