"""Read an AreTomo2 / AreTomo3 alignment (``.aln``) and AreTomo3's ``_TLT.txt``.

An ``.aln`` as AreTomo writes it (``MrcUtil/CSaveAlignFile``)::

    # AreTomo Alignment / Priims bprmMn
    # RawSize = 4096 4096 41
    # NumPatches = 0
    # DarkFrame =     0    1   -60.00
    # AlphaOffset =     0.00
    # BetaOffset =     0.00
    # Thickness = 1910
    # SEC     ROT         GMAG       TX          TY      SMEAN     SFIT    SCALE     BASE     TILT
        2    84.4445    1.00000     13.382     21.802     1.00     1.00     1.00     0.00    -57.00
    # Local Alignment
       0   0 -1537.16  -1363.14     -6.93    -36.22   1.0

``RawSize`` is the raw stack's size; each ``DarkFrame`` line gives a view AreTomo removed as
dark (its index in tilt order, its section, its tilt angle); each row gives a kept view. The
raw position of the aligned point ``a`` (tilt axis along +y, pixels from the image centre) is
``R(ROT) a + (TX, TY)``: AreTomo's own IMOD export (``ImodUtil/CSaveXF``) writes for a row the
``.xf`` ``A = R(-ROT)``, ``d = A (-TX, -TY)``, whose inverse is that map, and RELION-5's AreTomo
importer likewise sets ``rlnTomoZRot = ROT`` and ``rlnTomoX/YShiftAngst = (TX, TY)`` times
the pixel size. So ``φ = ROT`` and ``s = (TX, TY)`` in pixels of the raw stack, and
``θ = TILT``, which already includes the ``AlphaOffset`` AreTomo applied (AreTomo's ``.tlt``
export writes ``TILT`` unchanged). ``BetaOffset`` only enters AreTomo's CTF estimation and is
not used; the local alignment is ignored.

``SEC`` numbers sections of the raw stack: from 1 in AreTomo3 (``CAlignParam``), from 0 in
AreTomo2 and early AreTomo3, which is recognised, as AreTomo3 itself does, by a section 0.
Some early AreTomo3 files number the rows after the dark views were taken out; rows whose
sections collide with dark frames are therefore given, in order, the sections that are not
dark.

An AreTomo3 output folder (``-OutDir``) holds, per tilt series ``{TS}`` (the input's name), the
volumes ``{TS}_Vol.mrc`` and, with ``-SplitSum 1`` (the default since 2.0.2), the volumes of the
even and odd frame sums ``{TS}_EVN_Vol.mrc`` and ``{TS}_ODD_Vol.mrc`` (``CAsyncSaveVol``), all
directly in the folder; beside them ``{TS}.aln`` (``CSaveAlignFile::GenFileName``) and
``{TS}_TLT.txt`` (``CTsPackage::mSaveTiltFile``: tilt, acquisition index and, since 2.0, dose
of every section of the tilt series, dark ones included). ``-OutImod`` adds a ``{TS}_Imod/``
folder of IMOD files and a second ``-AtBin`` a ``{TS}_2ND_Vol.mrc``, neither with half
volumes; ``TiltSeries_Metrics.csv`` (``CTsMetrics``) gives thickness, tilt axis, CTF and the
alpha and beta offsets, but no tilt angles, so it cannot give a tilt range.
:func:`read_aretomo3_folder` takes the tilt range from the ``TILT`` column of the ``.aln``
(the views kept in the alignment and reconstruction), else from the ``_TLT.txt``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deepdewedge.io.dataset import TomogramEntry
from deepdewedge.io.errors import InputError
from deepdewedge.io.geometry import TiltSeriesGeometry
from deepdewedge.io.mrc import map_volume
from deepdewedge.io.tilts import _number, _read_lines, _show

__all__ = [
    "is_aretomo3_folder",
    "read_aretomo3_folder",
    "read_aretomo_aln",
    "read_aretomo_pre_exposure",
]

logger = logging.getLogger(__name__)

_KIND = "AreTomo .aln"
_FIX = "give the .aln that AreTomo wrote, unchanged"
_COLUMNS = "SEC ROT GMAG TX TY SMEAN SFIT SCALE BASE TILT"


@dataclass
class _Aln:
    raw_size: list[int] | None = None
    darks: list[tuple[int, int, float]] = field(default_factory=list)  # line, section, tilt
    rows: list[tuple[int, list[float]]] = field(default_factory=list)  # line, 10 values
    n_local: int = 0


def _integer(path: Path, lineno: int, token: str, what: str) -> int:
    value = _number(path, lineno, token, what=what, fix=_FIX)
    if value != int(value):
        raise InputError(f"{path}: line {lineno}: {what} {_show(token)} is not an integer; {_FIX}")
    return int(value)


def _parse(path: Path) -> _Aln:
    aln, local = _Aln(), False
    for lineno, line in _read_lines(path, kind=_KIND):
        if line.startswith("#"):
            body = line[1:].strip()
            local = local or body.startswith("Local Alignment")
            key, _, value = (part.strip() for part in body.partition("="))
            if key == "RawSize":
                aln.raw_size = [_integer(path, lineno, t, "RawSize") for t in value.split()]
                if len(aln.raw_size) != 3:
                    raise InputError(f"{path}: line {lineno}: RawSize needs nx ny nz; {_FIX}")
            elif key == "DarkFrame":
                tokens = value.split()
                if len(tokens) != 3:
                    raise InputError(
                        f"{path}: line {lineno}: DarkFrame needs 3 values (index, section, "
                        f"tilt), got {len(tokens)}; {_FIX}"
                    )
                section = _integer(path, lineno, tokens[1], "DarkFrame section")
                tilt = _number(path, lineno, tokens[2], what="DarkFrame tilt", fix=_FIX)
                aln.darks.append((lineno, section, tilt))
            continue
        if local:
            aln.n_local += 1
            continue
        tokens = line.split()
        if len(tokens) != 10:
            raise InputError(
                f"{path}: line {lineno} ({_show(line)}) holds {len(tokens)} values; an .aln row "
                f"has 10: {_COLUMNS}"
            )
        values = [_number(path, lineno, t, what="value", fix=_FIX) for t in tokens]
        _integer(path, lineno, tokens[0], "SEC")
        aln.rows.append((lineno, values))
    if not aln.rows:
        raise InputError(f"{path}: no alignment rows ({_COLUMNS}); {_FIX}")
    return aln


def _sections(path: Path, aln: _Aln) -> tuple[np.ndarray, np.ndarray, int]:
    """Raw-stack sections (0-based) of the rows and of the dark frames, and the stack size."""
    rows = np.array([int(values[0]) for _, values in aln.rows])
    darks = np.array([section for _, section, _ in aln.darks], dtype=int)
    base = 0 if (rows == 0).any() or (darks == 0).any() else 1
    rows, darks = rows - base, darks - base
    n = aln.raw_size[2] if aln.raw_size else len(rows) + len(darks)
    for (lineno, _, _), section in zip(aln.darks, darks, strict=True):
        if not 0 <= section < n:
            raise InputError(
                f"{path}: line {lineno}: dark section {section + base} is outside the {n} "
                f"sections of RawSize; {_FIX}"
            )
    if np.intersect1d(rows, darks).size:
        kept = np.setdiff1d(np.arange(n), darks)
        if len(kept) != len(rows) or len(np.unique(rows)) != len(rows):
            raise InputError(
                f"{path}: rows and DarkFrame lines name the same sections, and the rows do not "
                f"number the {len(kept)} views that are not dark; {_FIX}"
            )
        logger.info("%s: rows are numbered after the dark views were removed", path)
        rows = kept[np.argsort(np.argsort(rows))]
    for (lineno, _), section in zip(aln.rows, rows, strict=True):
        if not 0 <= section < n:
            raise InputError(
                f"{path}: line {lineno}: SEC {section + base} is outside the {n} sections of "
                f"RawSize; {_FIX}"
            )
    taken = np.concatenate([rows, darks])
    if len(np.unique(taken)) != len(taken) or len(taken) != n:
        raise InputError(
            f"{path}: the rows and DarkFrame lines do not name each of the {n} sections of "
            f"RawSize once; {_FIX}"
        )
    return rows, darks, n


def read_aretomo_pre_exposure(path: str | os.PathLike, *, n_views: int) -> np.ndarray:
    """Pre-exposure of every view from AreTomo3's ``<name>_TLT.txt``.

    Parameters
    ----------
    path
        The ``_TLT.txt`` AreTomo3 (2.0 and later) writes next to the tilt series it saves: one
        line ``tilt acquisition-index dose`` per section, the dose (e/Å²) being that image's.
    n_views
        Number of sections of the raw stack.

    Returns
    -------
    numpy.ndarray
        `(n_views,)` float64: dose received before each view, summing the doses of the views
        acquired earlier (ties in acquisition index keep stack order).

    Raises
    ------
    InputError
        Missing file, a line with fewer than three values (an older two-column file has no
        dose), a non-integer acquisition index, or a line count other than ``n_views``.
    """
    path = Path(path)
    kind = "AreTomo3 _TLT.txt (tilt, acquisition index, dose per line)"
    lines = _read_lines(path, kind=kind)
    acquisition, dose = [], []
    for lineno, line in lines:
        tokens = line.split()
        if len(tokens) < 3:
            raise InputError(
                f"{path}: line {lineno} ({_show(line)}) has no dose column; give the "
                "_TLT.txt of AreTomo3 2.0 or later (tilt, acquisition index, dose)"
            )
        acquisition.append(_integer(path, lineno, tokens[1], "acquisition index"))
        dose.append(_number(path, lineno, tokens[2], what="dose", fix=f"give the {kind}"))
    if len(dose) != n_views:
        raise InputError(
            f"{path}: {len(dose)} lines for a raw stack of {n_views} views; give the _TLT.txt "
            "written with this alignment"
        )
    order = np.argsort(acquisition, kind="stable")
    pre = np.empty(n_views)
    pre[order] = np.concatenate(([0.0], np.cumsum(np.asarray(dose)[order])[:-1]))
    return pre


def read_aretomo_aln(
    path: str | os.PathLike, *, tlt_file: str | os.PathLike | None = None
) -> TiltSeriesGeometry:
    """Read an AreTomo2 / AreTomo3 ``.aln`` alignment of a raw tilt series.

    Parameters
    ----------
    path
        The ``.aln``; shifts are in pixels of the raw stack that AreTomo aligned.
    tlt_file
        Optional AreTomo3 ``_TLT.txt`` giving each view's dose, to fill the pre-exposure.

    Returns
    -------
    TiltSeriesGeometry
        One view per section of the raw stack (``RawSize``); dark frames are excluded views
        with their tilt angle. Defocus is unknown; pre-exposure is unknown without
        ``tlt_file``.

    Raises
    ------
    InputError
        A row that is not 10 numbers (with its line number), sections outside ``RawSize`` or
        not named exactly once by the rows and dark frames, no rows, or a bad ``tlt_file``.

    Notes
    -----
    See the module docstring for the conventions. The local alignment, if present, is
    ignored with a warning, and so is a ``GMAG`` other than 1 (AreTomo writes 1).
    """
    path = Path(path)
    aln = _parse(path)
    rows, darks, n = _sections(path, aln)
    values = np.array([row for _, row in aln.rows])
    tilt, phi = np.zeros(n), np.full(n, float(np.median(values[:, 1])))
    shift_x, shift_y = np.zeros(n), np.zeros(n)
    tilt[rows], phi[rows] = values[:, 9], values[:, 1]
    shift_x[rows], shift_y[rows] = values[:, 3], values[:, 4]
    tilt[darks] = [angle for _, _, angle in aln.darks]
    excluded = np.zeros(n, dtype=bool)
    excluded[darks] = True
    if aln.n_local:
        logger.warning("%s: the local alignment is ignored; the global alignment is used", path)
    if not np.allclose(values[:, 2], 1.0):
        logger.warning("%s: GMAG other than 1 is ignored", path)
    pre = None if tlt_file is None else read_aretomo_pre_exposure(tlt_file, n_views=n)
    return TiltSeriesGeometry(
        tilt_angle_deg=tilt,
        tilt_axis_angle_deg=phi,
        shift_x_px=shift_x,
        shift_y_px=shift_y,
        excluded=excluded,
        pre_exposure_e_per_a2=pre,
        source=str(path),
    )


# --------------------------------------------------------------------------- AreTomo3 folders

_HALVES = ("_EVN_Vol.mrc", "_ODD_Vol.mrc")


def is_aretomo3_folder(folder: str | os.PathLike) -> bool:
    """Whether `folder` is AreTomo3's output: half volumes, or even-frame tilt series.

    That is: it holds ``*_EVN_Vol.mrc`` or ``*_ODD_Vol.mrc``, or, where AreTomo3 aligned
    without reconstructing (``-VolZ 0``), a ``{TS}_EVN.mrc`` tilt series beside its
    ``{TS}_TLT.txt`` (which must not be taken for a half tomogram).
    """
    folder = Path(folder)
    if any(any(folder.glob(f"*{suffix}")) for suffix in _HALVES):
        return True
    stacks = folder.glob("*_EVN.mrc")
    return any(p.with_name(p.name.removesuffix("_EVN.mrc") + "_TLT.txt").is_file() for p in stacks)


def _xzy_volume(path: Path) -> str | None:
    """Why `path` looks saved x-z-y (thinnest along y), or None."""
    depth, height, width = map_volume(path)[0].shape
    if height < depth and height < width:
        return (
            f"{path}: {depth}x{height}x{width} voxels (nz, ny, nx), thinnest along y: AreTomo3 "
            "saves volumes x-z-y unless run with -FlipVol 1; reconstruct with -FlipVol 1 or "
            "rotate the volumes (IMOD: clip rotx)"
        )
    return None


def _tilt_range(folder: Path, name: str) -> tuple[float, float] | None:
    """Lowest and highest tilt of ``{name}.aln`` (kept views), else of ``{name}_TLT.txt``."""
    aln = folder / f"{name}.aln"
    if aln.is_file():
        tilts = [values[9] for _, values in _parse(aln).rows]
        return min(tilts), max(tilts)
    tlt = folder / f"{name}_TLT.txt"
    if not tlt.is_file():
        return None
    kind = "AreTomo3 _TLT.txt (tilt, acquisition index[, dose] per line)"
    lines = _read_lines(tlt, kind=kind)
    if not lines:
        raise InputError(f"{tlt}: empty; give the {kind}")
    tilts = [
        _number(tlt, lineno, line.split()[0], what="tilt", fix=f"give the {kind}")
        for lineno, line in lines
    ]
    return min(tilts), max(tilts)


def read_aretomo3_folder(folder: str | os.PathLike) -> list[TomogramEntry]:
    """Read the half tomograms of an AreTomo3 output folder (see the module docstring).

    Parameters
    ----------
    folder
        AreTomo3's ``-OutDir``, holding ``{TS}_EVN_Vol.mrc`` and ``{TS}_ODD_Vol.mrc``.

    Returns
    -------
    list of TomogramEntry
        One per tilt series ``{TS}`` with either half volume, sorted by name: ``tomo0`` the
        even-frame volume, ``tomo1`` the odd one, ``full`` ``{TS}_Vol.mrc`` where present. The
        tilt range is that of the ``TILT`` column of ``{TS}.aln``, else of the angles in
        ``{TS}_TLT.txt``, else None. A missing half, a volume saved x-z-y (``-FlipVol 0``,
        AreTomo3's default: recognised by being thinnest along y) or an unreadable volume,
        ``.aln`` or ``_TLT.txt`` gives an entry with an error.

    Raises
    ------
    InputError
        A folder without half volumes.

    Notes
    -----
    The angles are AreTomo's, which this package reads in IMOD's sign (see the module
    docstring), so the range is that of the volume when AreTomo3 wrote it with xy slices
    along z (``-FlipVol 1``), as this package's tomograms are.
    """
    folder = Path(folder)
    names = sorted(
        {p.name[: -len(suffix)] for suffix in _HALVES for p in folder.glob(f"*{suffix}")}
    )
    if not names:
        raise InputError(
            f"{folder}: AreTomo3 output without *_EVN_Vol.mrc / *_ODD_Vol.mrc volumes; run "
            "AreTomo3 with -VolZ above 0, -SplitSum 1 and -FlipVol 1"
        )
    entries = []
    for name in names:
        even, odd = (folder / f"{name}{suffix}" for suffix in _HALVES)
        full = folder / f"{name}_Vol.mrc"
        error = next(
            (
                f"{half}: no such file, the other half of {other.name}; run AreTomo3 with "
                "-SplitSum 1 again or move the unpaired volume out of the folder"
                for half, other in ((even, odd), (odd, even))
                if not half.is_file()
            ),
            None,
        )
        try:
            error = error or _xzy_volume(even if even.is_file() else odd)
            tilt_range = _tilt_range(folder, name)
        except InputError as err:
            tilt_range, error = None, error or str(err)
        entries.append(
            TomogramEntry(
                name,
                even if even.is_file() else None,
                odd if odd.is_file() else None,
                full=full if full.is_file() else None,
                tilt_range_deg=tilt_range,
                error=error,
            )
        )
    return entries
