"""Read tilt-series metadata: tilt angles, SerialEM .mdoc, defocus estimates.

Formats read here:

- IMOD ``.tlt`` / ``.rawtlt``: one tilt angle in degrees per line.
- SerialEM ``.mdoc`` of a tilt series: angles, acquisition order, dose, defocus.
- Defocus per tilt: IMOD ctfplotter ``.defocus``, CTFFIND4 diagnostic ``.txt``, or a plain
  list in µm.

Every problem with a file raises :class:`~deepdewedge.io.mrc.InputError` with one line naming
the file, what is wrong and how to fix it.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

import numpy as np

from deepdewedge.io.mrc import InputError

logger = logging.getLogger(__name__)

_SECTION = re.compile(r"^\[\s*([A-Za-z]+)\s*=\s*(.*?)\s*\]$")
_DATETIME_FORMATS = ("%d-%b-%y %H:%M:%S", "%d-%b-%Y %H:%M:%S")
# Plain defocus lists must be in µm; values outside this range are almost surely nm or Å.
_PLAIN_DEFOCUS_RANGE_UM = (0.05, 30.0)


def _show(text: str, width: int = 40) -> str:
    """Quote a line of a file for an error message, shortened to `width` characters."""
    text = text.strip()
    return repr(text if len(text) <= width else text[: width - 3] + "...")


def _read_lines(path: Path, *, kind: str) -> list[tuple[int, str]]:
    """Non-blank lines of a text file as ``(1-based line number, stripped text)``."""
    if not path.exists():
        raise InputError(f"{path}: no such file; check the path of the {kind}")
    if path.is_dir():
        raise InputError(f"{path}: is a directory; give the path of the {kind}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a text file; give the {kind}") from None
    lines = [(i, line.strip()) for i, line in enumerate(text.splitlines(), start=1)]
    return [(i, line) for i, line in lines if line]


def _number(path: Path, lineno: int, token: str, *, what: str, fix: str) -> float:
    """Parse one finite float, or raise an `InputError` naming the line."""
    try:
        value = float(token)
    except ValueError:
        raise InputError(
            f"{path}: line {lineno}: {what} {_show(token)} is not a number; {fix}"
        ) from None
    if not math.isfinite(value):
        raise InputError(f"{path}: line {lineno}: {what} is {token}; {fix}")
    return value


def _number_rows(
    path: Path, *, kind: str, columns: int, what: str, layout: str
) -> list[tuple[int, list[float]]]:
    """Rows of ``columns`` finite numbers with their 1-based line numbers; one-line errors.

    ``layout`` ends the message for a row with another number of values, e.g. "a tilt-angle
    file has one angle in degrees per line".
    """
    lines = _read_lines(path, kind=kind)
    if not lines:
        raise InputError(f"{path}: empty; give the {kind}")
    rows = []
    for lineno, line in lines:
        tokens = line.split()
        if len(tokens) != columns:
            raise InputError(
                f"{path}: line {lineno} ({_show(line)}) holds {len(tokens)} values; {layout}"
            )
        fix = f"give the {kind}"
        rows.append((lineno, [_number(path, lineno, t, what=what, fix=fix) for t in tokens]))
    return rows


# --------------------------------------------------------------------------- tilt angles


def read_tilt_angles(path: str | os.PathLike) -> np.ndarray:
    """Read an IMOD tilt-angle file (``.tlt`` or ``.rawtlt``).

    Parameters
    ----------
    path
        Text file with one tilt angle in degrees per line, in stack order; blank lines are
        ignored.

    Returns
    -------
    np.ndarray
        `(n,)` float64 tilt angles in degrees, in stack order.

    Raises
    ------
    InputError
        The file is missing, empty, has a line that is not one number (the message gives the
        line number) or an angle outside -90..90°.
    """
    path = Path(path)
    kind = "tilt-angle file (.tlt / .rawtlt, one angle in degrees per line)"
    angles = []
    rows = _number_rows(
        path,
        kind=kind,
        columns=1,
        what="tilt angle",
        layout="a tilt-angle file has one angle in degrees per line",
    )
    for lineno, (angle,) in rows:
        if not -90.0 <= angle <= 90.0:
            raise InputError(
                f"{path}: line {lineno}: tilt angle {angle:g} is outside -90..90°; give the "
                f"{kind}, not another list"
            )
        angles.append(angle)
    return np.asarray(angles, dtype=np.float64)


# --------------------------------------------------------------------------- acquisition order


def _positions(sequence: np.ndarray) -> np.ndarray:
    """Invert a sequence of stack indices into each index's position in the sequence."""
    positions = np.empty(len(sequence), dtype=np.int64)
    positions[sequence] = np.arange(len(sequence))
    return positions


def acquisition_order_from_angles(
    angles_deg: np.ndarray,
    *,
    scheme: Literal["sequential", "dose-symmetric"] = "sequential",
    start_deg: float = 0.0,
    group_size: int = 2,
    positive_first: bool = True,
) -> np.ndarray:
    """Acquisition order of a tilt series assumed to follow a standard tilt scheme.

    For users without a SerialEM .mdoc.

    Parameters
    ----------
    angles_deg
        `(n,)` tilt angles in degrees, in stack order.
    scheme
        ``"sequential"``: tilts acquired in ascending angle from the lowest (the most negative).
        ``"dose-symmetric"``: the Hagen scheme, see Notes.
    start_deg
        Dose-symmetric only: the scheme starts at the tilt nearest this angle.
    group_size
        Dose-symmetric only: number of consecutive tilts taken on one side before switching.
    positive_first
        Dose-symmetric only: the first group after the start tilt goes to angles above it
        (``True``) or below it (``False``).

    Returns
    -------
    np.ndarray
        `(n,)` int64, a permutation of ``0 .. n - 1``: entry ``i`` is the position of stack
        tilt ``i`` in the acquisition sequence (0 = acquired first), the same convention as
        :attr:`MdocTilts.acquisition_order`.

    Raises
    ------
    ValueError
        Empty or non-finite angles, unknown scheme, or ``group_size < 1``.

    Notes
    -----
    The dose-symmetric scheme (Hagen, Wan & Briggs 2017) takes the start tilt, then
    ``group_size`` tilts stepping away from it on one side, then ``group_size`` on the other,
    alternating; when one side runs out, the rest of the other side follows in order. For
    ±60° in 3° steps, start 0°, group size 2: 0, 3, 6, -3, -6, 9, 12, -9, -12, ..., 57, 60,
    -57, -60. Equal angles are taken in stack order.

    References
    ----------
    W. J. H. Hagen, W. Wan, J. A. G. Briggs, "Implementation of a cryo-electron tomography
    tilt-scheme optimized for high resolution subtomogram averaging", J. Struct. Biol. 197
    (2017) 191-198.
    """
    angles = np.asarray(angles_deg, dtype=np.float64).reshape(-1)
    if angles.size == 0 or not np.isfinite(angles).all():
        raise ValueError(f"angles_deg must be finite and non-empty, got {angles_deg!r}")
    if scheme not in ("sequential", "dose-symmetric"):
        raise ValueError(f"scheme must be 'sequential' or 'dose-symmetric', got {scheme!r}")
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1, got {group_size}")
    by_angle = np.argsort(angles, kind="stable")
    if scheme == "sequential":
        return _positions(by_angle)
    start = int(np.argmin(np.abs(angles[by_angle] - start_deg)))
    above = list(by_angle[start + 1 :])
    below = list(by_angle[:start][::-1])
    sides = (above, below) if positive_first else (below, above)
    sequence = [int(by_angle[start])]
    taken = [0, 0]
    side = 0
    while taken[0] < len(sides[0]) or taken[1] < len(sides[1]):
        if taken[side] >= len(sides[side]):
            side = 1 - side
        group = sides[side][taken[side] : taken[side] + group_size]
        sequence.extend(int(i) for i in group)
        taken[side] += len(group)
        side = 1 - side
    return _positions(np.asarray(sequence, dtype=np.int64))


# --------------------------------------------------------------------------- SerialEM .mdoc


@dataclass(frozen=True, eq=False)
class MdocTilts:
    """Per-tilt metadata from a SerialEM tilt-series .mdoc, in stack order.

    Arrays are read-only.

    Attributes
    ----------
    angles_deg
        `(n,)` float64 tilt angles in degrees (``TiltAngle``).
    acquisition_order
        `(n,)` int64 permutation of ``0 .. n - 1``: entry ``i`` is the position of stack tilt
        ``i`` in the acquisition sequence (0 = acquired first).
    dose_e_per_a2
        `(n,)` float64 dose of each exposure in e/Å² (``ExposureDose``); NaN where absent or
        when every value is 0 (SerialEM writes 0 when its dose is not calibrated).
    prior_dose_e_per_a2
        `(n,)` float64 cumulative dose in e/Å² each tilt had received before it was taken:
        ``PriorRecordDose`` when every section has it, else the sum of ``dose_e_per_a2`` over
        the tilts acquired before it; NaN where unknown.
    pixel_size_angstrom
        Pixel size in Å (``PixelSpacing``), or None.
    voltage_kv
        Accelerating voltage in kV (``Voltage``), or None.
    defocus_um
        `(n,)` float64 defocus in µm, positive = underfocus, or None; see :func:`read_mdoc`.
    """

    angles_deg: np.ndarray
    acquisition_order: np.ndarray
    dose_e_per_a2: np.ndarray
    prior_dose_e_per_a2: np.ndarray
    pixel_size_angstrom: float | None = None
    voltage_kv: float | None = None
    defocus_um: np.ndarray | None = None

    def __post_init__(self) -> None:
        """Keep read-only copies of the arrays, so that the frozen record cannot change."""
        for name, value in list(vars(self).items()):
            if isinstance(value, np.ndarray):
                value = value.copy()
                value.setflags(write=False)
                object.__setattr__(self, name, value)


def _parse_datetime(path: Path, lineno: int, value: str) -> datetime:
    """Parse a SerialEM ``DateTime`` such as ``09-Jun-22  14:03:12``."""
    text = " ".join(value.split())
    for fmt in _DATETIME_FORMATS:
        try:
            return datetime.strptime(text, fmt)
        except ValueError:
            continue
    raise InputError(
        f"{path}: line {lineno}: DateTime {_show(value)} is not like '09-Jun-22  14:03:12'; "
        "fix the line or delete the DateTime lines to use the section order"
    )


def _mdoc_sections(
    path: Path, lines: list[tuple[int, str]]
) -> tuple[dict[str, tuple[int, str]], list[dict[str, tuple[int, str]]], bool]:
    """Split an .mdoc into its global header and its ``[ZValue = k]`` sections, in file order.

    Each dictionary maps a key to ``(line number, value)``; a section also holds its ZValue
    under ``"[ZValue]"``. Also says whether any ``[FrameSet = ...]`` section was seen.
    """
    header: dict[str, tuple[int, str]] = {}
    sections: list[dict[str, tuple[int, str]]] = []
    current: dict[str, tuple[int, str]] | None = header
    frame_sets = False
    for lineno, line in lines:
        match = _SECTION.match(line)
        if match:
            name, value = match.groups()
            if name == "ZValue":
                current = {"[ZValue]": (lineno, value)}
                sections.append(current)
            elif name == "T":  # title lines belong to the global header
                current = header if not sections else None
            else:  # [FrameSet = k], [MontSection = k], ...: not tilts of the stack
                frame_sets = frame_sets or name == "FrameSet"
                current = None
            continue
        if current is None or "=" not in line:
            continue
        key, value = (part.strip() for part in line.split("=", 1))
        current[key] = (lineno, value)
    return header, sections, frame_sets


def read_mdoc(path: str | os.PathLike) -> MdocTilts:
    """Read a SerialEM tilt-series .mdoc.

    Parameters
    ----------
    path
        The .mdoc written next to the tilt-series stack (one ``[ZValue = k]`` section per
        image). Global header lines before the first section, any key order, extra keys and
        Windows line endings are accepted; ``[FrameSet = ...]`` and other non-ZValue sections
        are ignored.

    Returns
    -------
    MdocTilts
        Angles, acquisition order, dose, pixel size, voltage and defocus, in stack order.

    Raises
    ------
    InputError
        Missing or non-text file, no ``[ZValue]`` section (e.g. a frame-set .mdoc), ZValues
        that do not number the stack ``0 .. n - 1``, a section without ``TiltAngle``, or an
        unparsable value.

    Notes
    -----
    In SerialEM, ``[ZValue = k]`` is the index of the image in the stack, so the sections are
    returned sorted by ZValue. The acquisition order comes from each section's ``DateTime``
    (ties broken by section order in the file). If no section has a ``DateTime``, the order in
    which the sections appear in the file is taken as the acquisition order: SerialEM appends
    a section for every image as it is taken, so this is right for the .mdoc it wrote, but not
    for an .mdoc whose sections were re-sorted afterwards.

    SerialEM's ``Defocus`` (or, when absent, ``TargetDefocus``) is in µm with negative values
    meaning underfocus; it is returned with the sign flipped (positive = underfocus).
    ``Defocus`` is the microscope's reading, meaningful only if the focus was reset at
    eucentric focus; prefer a CTF estimate (:func:`read_defocus`) where there is one.
    """
    path = Path(path)
    kind = "SerialEM tilt-series .mdoc"
    header, sections, frame_sets = _mdoc_sections(path, _read_lines(path, kind=kind))
    if not sections:
        if frame_sets:
            raise InputError(
                f"{path}: has only [FrameSet] sections (an .mdoc of movie frames); give the "
                "tilt-series .mdoc saved next to the stack"
            )
        raise InputError(f"{path}: no [ZValue = ...] sections; give the {kind}")

    def number(section: dict[str, tuple[int, str]], key: str, fix: str) -> float:
        lineno, value = section[key]
        return _number(path, lineno, value, what=key, fix=fix)

    fix = "correct the .mdoc or regenerate it in SerialEM"
    z_values = np.array([number(s, "[ZValue]", fix) for s in sections])
    n = len(sections)
    if not np.array_equal(np.sort(z_values), np.arange(n)):
        raise InputError(
            f"{path}: the ZValues are not 0..{n - 1} once each; the .mdoc must have one "
            "[ZValue] section per image of the stack"
        )
    by_z = [sections[i] for i in np.argsort(z_values)]
    file_position = np.argsort(z_values)  # stack index -> position of its section in the file

    angles = []
    for section in by_z:
        if "TiltAngle" not in section:
            z = section["[ZValue]"][1]
            raise InputError(f"{path}: section [ZValue = {z}] has no TiltAngle; {fix}")
        angles.append(number(section, "TiltAngle", fix))

    dated = [s for s in by_z if "DateTime" in s]
    if dated and len(dated) < n:
        z = next(s["[ZValue]"][1] for s in by_z if "DateTime" not in s)
        raise InputError(
            f"{path}: section [ZValue = {z}] has no DateTime but others do; add it or delete "
            "all DateTime lines to use the section order"
        )
    if dated:
        # Naive times compared as written: no time zone or daylight-saving shift applies.
        times = np.array(
            [(_parse_datetime(path, *s["DateTime"]) - datetime.min).total_seconds() for s in by_z]
        )
        sequence = np.lexsort((file_position, times))  # stack indices in acquisition order
    else:
        sequence = np.argsort(file_position)

    def column(key: str) -> np.ndarray | None:
        if not all(key in s for s in by_z):
            return None
        return np.array([number(s, key, fix) for s in by_z], dtype=np.float64)

    dose = column("ExposureDose")
    if dose is None or not dose.any():
        dose = np.full(n, np.nan)
    prior = column("PriorRecordDose")
    if prior is None or (n > 1 and not prior.any()):
        prior = np.full(n, np.nan)
        if np.isfinite(dose).all():
            prior[sequence] = np.concatenate(([0.0], np.cumsum(dose[sequence])[:-1]))

    defocus = column("Defocus")
    if defocus is None:
        defocus = column("TargetDefocus")

    def scalar(key: str) -> float | None:
        source = header if key in header else next((s for s in by_z if key in s), None)
        return None if source is None else number(source, key, fix)

    return MdocTilts(
        angles_deg=np.asarray(angles, dtype=np.float64),
        acquisition_order=_positions(sequence),
        dose_e_per_a2=dose,
        prior_dose_e_per_a2=prior,
        pixel_size_angstrom=scalar("PixelSpacing"),
        voltage_kv=scalar("Voltage"),
        defocus_um=None if defocus is None else -defocus,
    )


# --------------------------------------------------------------------------- defocus


def _ctfplotter_defocus(
    path: Path, rows: list[tuple[int, list[str]]], n_tilts: int | None
) -> np.ndarray:
    """Defocus per view from IMOD ctfplotter rows (nm), filling unestimated views."""
    fix = "fix the row or re-save the file from ctfplotter"
    flags = 0
    first_line, first = rows[0]
    if len(first) == 6 and first[1] == "0" and first[-1] == "3":
        flags = int(_number(path, first_line, first[0], what="version-3 flags", fix=fix))
        rows = rows[1:]
    astigmatic = bool(flags & 1)
    needed = 7 if astigmatic else 5
    estimates: list[tuple[int, int, float]] = []
    for lineno, tokens in rows:
        if len(tokens) < needed:
            columns = "defocus 1 and 2 in nm, astigmatism angle" if astigmatic else "defocus in nm"
            raise InputError(
                f"{path}: line {lineno} has {len(tokens)} values, expected at least {needed} "
                f"(start view, end view, two angles, {columns}); {fix}"
            )
        values = [_number(path, lineno, t, what="value", fix=fix) for t in tokens[:needed]]
        start, end = values[0], values[1]
        if start != int(start) or end != int(end) or not 1 <= start <= end:
            raise InputError(
                f"{path}: line {lineno}: views {start:g}..{end:g} are not a range of view "
                "numbers counted from 1; renumber the views from 1 as IMOD does"
            )
        defocus_nm = (values[4] + values[5]) / 2 if astigmatic else values[4]
        estimates.append((int(start), int(end), defocus_nm / 1000.0))
    if not estimates:
        raise InputError(f"{path}: holds no defocus rows; re-save the file from ctfplotter")
    last_view = max(end for _, end, _ in estimates)
    n = last_view if n_tilts is None else n_tilts
    if last_view > n:
        raise InputError(
            f"{path}: has defocus for view {last_view}, but the stack has {n} views; give the "
            "defocus file of this tilt series"
        )
    defocus = np.full(n, np.nan)
    centre = np.full(n, np.inf)
    for start, end, value in estimates:
        mid = (start + end) / 2
        for view in range(start, end + 1):
            # Where ranges overlap, keep the estimate whose range is centred nearest the view.
            if abs(view - mid) < abs(view - centre[view - 1]):
                defocus[view - 1], centre[view - 1] = value, mid
    missing = np.flatnonzero(np.isnan(defocus))
    if missing.size:
        known = np.flatnonzero(~np.isnan(defocus))
        nearest = known[np.argmin(np.abs(missing[:, None] - known[None, :]), axis=1)]
        defocus[missing] = defocus[nearest]
        logger.warning(
            "%s: no defocus for views %s; using the nearest estimated view's value",
            path,
            ", ".join(str(v + 1) for v in missing),
        )
    return defocus


def _ctffind_defocus(path: Path, rows: list[tuple[int, list[str]]]) -> np.ndarray:
    """Defocus per micrograph from CTFFIND4 rows (Å), ordered by micrograph number."""
    fix = "give the CTFFIND4 output .txt unchanged"
    numbers, defocus = [], []
    for lineno, tokens in rows:
        if len(tokens) < 7:
            raise InputError(
                f"{path}: line {lineno} has {len(tokens)} values, CTFFIND4 writes at least 7 "
                f"(micrograph number, defocus 1 and 2 in Å, ...); {fix}"
            )
        number, defocus_1, defocus_2 = (
            _number(path, lineno, t, what="value", fix=fix) for t in tokens[:3]
        )
        numbers.append(number)
        defocus.append((defocus_1 + defocus_2) / 2 / 1e4)
    order = np.argsort(numbers, kind="stable")
    if not np.array_equal(np.asarray(numbers)[order], np.arange(1, len(numbers) + 1)):
        raise InputError(
            f"{path}: micrograph numbers are not 1..{len(numbers)} once each; {fix}, one row "
            "per image of the stack"
        )
    return np.asarray(defocus, dtype=np.float64)[order]


def _plain_defocus(path: Path, rows: list[tuple[int, list[str]]]) -> np.ndarray:
    """Defocus per tilt from a plain list in µm, range-checked against unit mistakes."""
    low, high = _PLAIN_DEFOCUS_RANGE_UM
    defocus = []
    for lineno, tokens in rows:
        value = _number(
            path, lineno, tokens[0], what="defocus", fix="give one defocus in µm per line"
        )
        if not low <= value <= high:
            raise InputError(
                f"{path}: line {lineno}: defocus {value:g} is outside {low:g}..{high:g} µm; a "
                "plain defocus list must be in µm, positive = underfocus (convert nm or Å to µm)"
            )
        defocus.append(value)
    return np.asarray(defocus, dtype=np.float64)


def read_defocus(path: str | os.PathLike, *, n_tilts: int | None = None) -> np.ndarray:
    """Read the defocus of every tilt, whichever of the common formats the file is in.

    Parameters
    ----------
    path
        One of (detected from the content):

        - IMOD ctfplotter ``.defocus``: rows ``startView endView angle1 angle2 defocus_nm``,
          or with astigmatism ``... defocus1_nm defocus2_nm astigAngle``; views counted from
          1; a row may cover several views. The first line may be a version-3 header
          ``flags 0 0. 0. 0 3`` (flag 1 = astigmatic rows) or end in the version number 2.
        - CTFFIND4 diagnostic output ``.txt``: recognised by its ``#`` comment lines; rows
          ``micrograph_number defocus1_A defocus2_A astig_angle phase_shift cc fit_res``.
        - A plain list: one defocus in µm per line, positive = underfocus.
    n_tilts
        Number of images in the stack. When given, a CTFFIND4 or plain list must have exactly
        this many rows, and ctfplotter views must lie in ``1 .. n_tilts``.

    Returns
    -------
    np.ndarray
        `(n,)` float64 defocus in µm, positive = underfocus, in stack order. Astigmatic
        estimates give the mean of the two defoci.

    Raises
    ------
    InputError
        Missing, empty or unparsable file; wrong number of tilts; a plain-list value outside
        0.05..30 µm (likely nm or Å: the unit is not guessed).

    Notes
    -----
    ctfplotter need not estimate every view. A view covered by several rows takes the
    estimate whose range is centred nearest to it; a view covered by none takes the value of
    the nearest estimated view (the lower one on a tie), and a warning is logged.
    """
    path = Path(path)
    kind = "defocus file (ctfplotter .defocus, CTFFIND4 .txt or one value in µm per line)"
    if n_tilts is not None and n_tilts < 1:
        raise ValueError(f"n_tilts must be positive, got {n_tilts}")
    lines = _read_lines(path, kind=kind)
    comments = any(line.startswith("#") for _, line in lines)
    rows = [(i, line.split()) for i, line in lines if not line.startswith("#")]
    if not rows:
        raise InputError(f"{path}: holds no defocus values; give the {kind}")
    if all(len(tokens) == 1 for _, tokens in rows):
        defocus, source = _plain_defocus(path, rows), "values"
    elif comments:
        defocus, source = _ctffind_defocus(path, rows), "CTFFIND4 rows"
    else:
        return _ctfplotter_defocus(path, rows, n_tilts)
    if n_tilts is not None and len(defocus) != n_tilts:
        raise InputError(
            f"{path}: {len(defocus)} {source} for a stack of {n_tilts} images; give the defocus "
            "file of this tilt series"
        )
    return defocus
