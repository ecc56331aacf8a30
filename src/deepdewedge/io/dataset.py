"""One tomogram of a dataset, whatever program reconstructed it, and the dataset readers.

Every dataset reader in ``io/`` (AreTomo3 folders, Warp/WarpTools projects, RELION-5
``tomograms.star``, folders of paired files, the published tool's file lists) fills a list of
:class:`TomogramEntry`; the dataset run only ever sees this type. :func:`read_dataset`
recognises the layout of a path and calls the right reader:

- a RELION-5 ``tomograms.star``
  (:func:`deepdewedge.io.relion_tomograms.read_relion_tomograms_star`);
- an AreTomo3 output folder, holding ``*_EVN_Vol.mrc`` / ``*_ODD_Vol.mrc``
  (:func:`deepdewedge.io.aretomo.read_aretomo3_folder`);
- a Warp/WarpTools processing folder with ``reconstruction/even/`` and ``reconstruction/odd/``,
  or that ``reconstruction`` folder itself (:func:`deepdewedge.io.warp.read_warp_folder`);
- a folder, a glob pattern or one file of paired half tomograms, told apart by a token in the
  file name: ``tomo0``/``tomo1`` (what ``ddw reconstruct`` writes, with ``{stem}_full.mrc`` and
  ``{stem}_reconstruct.json``), ``half1``/``half2`` (RELION), ``even``/``odd`` and
  ``EVN``/``ODD`` (AreTomo, cryoCARE), in any case, separated from the rest of the name by
  ``_``, ``-`` or ``.``; ``.mrc`` and ``.rec`` files.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from deepdewedge.io.errors import InputError

__all__ = ["TomogramEntry", "entries_from_lists", "read_dataset", "read_paired_files"]

LAYOUTS = (
    "give a folder or glob pattern of paired half tomograms (*_tomo0/*_tomo1, *_half1/*_half2, "
    "*_even/*_odd or *_EVN/*_ODD .mrc), an AreTomo3 output folder, a Warp/WarpTools processing "
    "or reconstruction folder, or a RELION-5 tomograms.star"
)
_EXTENSIONS = (".mrc", ".rec")
# Token -> (family, half): half 0 is tomo0, half 1 is tomo1.
_TOKENS = {
    "tomo0": ("tomo", 0),
    "tomo1": ("tomo", 1),
    "half1": ("half", 0),
    "half2": ("half", 1),
    "even": ("even/odd", 0),
    "evn": ("even/odd", 0),
    "odd": ("even/odd", 1),
}
_PARTNERS = {"tomo0": "tomo1", "tomo1": "tomo0", "half1": "half2", "half2": "half1"}
_HALF_TOKEN = re.compile(r"(?<=[_.-])(" + "|".join(_TOKENS) + r")(?=$|[_.-])", re.IGNORECASE)
_SLOT = "\0"  # where the half token stood in a file name


@dataclass(frozen=True)
class TomogramEntry:
    """The files and the missing wedge of one tomogram of a dataset.

    Attributes
    ----------
    name
        Unique within the dataset; names the outputs (``{name}_refined.mrc``).
    tomo0, tomo1
        Half tomograms reconstructed from independent halves of the tilt series.
    full
        The tomogram reconstructed from all views, if the program wrote one.
    tilt_range_deg
        ``(lowest, highest)`` tilt angle in degrees from the tomogram's own metadata (an
        asymmetric range stays asymmetric), or None where the dataset does not say.
    error
        Why the tomogram cannot be used (a missing half, an unreadable metadata file), one
        line naming the file and the fix; None for a usable tomogram. A dataset run reports
        it and goes on with the others.
    """

    name: str
    tomo0: Path | None
    tomo1: Path | None
    full: Path | None = None
    tilt_range_deg: tuple[float, float] | None = None
    error: str | None = None


def read_dataset(path: str | os.PathLike) -> list[TomogramEntry]:
    """Read the tomograms of a dataset, whichever program's layout `path` follows.

    Parameters
    ----------
    path
        A RELION-5 ``tomograms.star``, an AreTomo3 output folder, a Warp/WarpTools processing
        or ``reconstruction`` folder, or a folder, glob pattern (``data/*_tomo0.mrc``) or single
        file of paired half tomograms; see the module docstring.

    Returns
    -------
    list of TomogramEntry
        One entry per tomogram, sorted by name. A tomogram with a missing half or unreadable
        tilt metadata gets an entry whose ``error`` says why, so the others can go on.

    Raises
    ------
    InputError
        A path that is none of these layouts, no tomograms found, two tomograms of the same
        name, or a ``tomograms.star`` without the needed columns.
    """
    # The format readers import TomogramEntry from this module, hence imported here.
    from deepdewedge.io.aretomo import is_aretomo3_folder, read_aretomo3_folder
    from deepdewedge.io.relion_tomograms import read_relion_tomograms_star
    from deepdewedge.io.warp import is_warp_folder, read_warp_folder

    text = os.fspath(path)
    path = Path(path)
    if path.is_dir():
        if is_warp_folder(path):
            entries = read_warp_folder(path)
        elif is_aretomo3_folder(path):
            entries = read_aretomo3_folder(path)
        else:
            entries = read_paired_files(_volumes(path.iterdir()), source=path)
    elif path.is_file() and path.suffix.lower() == ".star":
        entries = read_relion_tomograms_star(path)
    elif path.is_file():
        entries = read_paired_files(_volumes([path]), source=path)
    elif glob.has_magic(text):
        matches = [Path(m) for m in sorted(glob.glob(text))]
        if not matches:
            raise InputError(f"{text}: the pattern matches no files; {LAYOUTS}")
        entries = read_paired_files(_volumes(matches), source=text)
    else:
        raise InputError(f"{path}: no such file or folder; {LAYOUTS}")
    if not entries:
        where = "this folder" if path.is_dir() else "these files"
        raise InputError(f"{text}: no tomograms found in {where}; {LAYOUTS}")
    return _checked(entries, source=text)


def _volumes(paths: Iterable[Path]) -> list[Path]:
    """The volume files among `paths`, sorted."""
    return sorted(p for p in paths if p.suffix.lower() in _EXTENSIONS and p.is_file())


def _checked(entries: list[TomogramEntry], *, source: str) -> list[TomogramEntry]:
    """`entries` sorted by name; two tomograms of one name are an `InputError`."""
    entries = sorted(entries, key=lambda e: e.name)
    for first, second in zip(entries, entries[1:], strict=False):
        if first.name == second.name:
            raise InputError(
                f"{source}: two tomograms are named {first.name!r} ({first.tomo0 or first.tomo1}"
                f" and {second.tomo0 or second.tomo1}); keep one pair of halves per tomogram"
            )
    return entries


def _split(file: Path) -> tuple[str, str, int, str] | None:
    """File name with a slot for its half token, the family, the half and the token itself."""
    matches = list(_HALF_TOKEN.finditer(file.stem))
    if not matches:
        return None
    match = matches[-1]
    family, half = _TOKENS[match.group(1).lower()]
    slotted = file.stem[: match.start()] + _SLOT + file.stem[match.end() :]
    return slotted, family, half, match.group(1)


def _fill(slotted: str, token: str) -> str:
    """A slotted name with `token` in the slot; an empty token takes a separator with it."""
    if token:
        return slotted.replace(_SLOT, token)
    before, after = slotted.split(_SLOT)
    return (before[:-1] + after) if before else after.lstrip("_.-")


def _partners(token: str) -> list[str]:
    """Tokens that name the other half, spelt in the case of `token`."""
    lower = token.lower()
    if lower in _PARTNERS:
        names = [_PARTNERS[lower]]
    else:
        names = ["even", "evn"] if lower == "odd" else ["odd"]
        if token.isupper():
            names.reverse()  # AreTomo's EVN/ODD before even/odd
    spell = str.upper if token.isupper() else str.title if token.istitle() else str.lower
    return [spell(name) for name in names]


def read_paired_files(files: Sequence[Path], *, source: str | os.PathLike) -> list[TomogramEntry]:
    """Pair half tomograms by the token in their names (see the module docstring).

    Parameters
    ----------
    files
        Volume files; those without a half token are ignored. A half whose partner is not
        among them is paired with the partner beside it on disk, if there is one.
    source
        The folder or pattern the files come from, for messages.

    Returns
    -------
    list of TomogramEntry
        One per pair, named after the file name without its half token (``x_tomo0.mrc`` gives
        ``x``), sorted by name; the full tomogram is ``{name}{ext}`` or the name with ``full``
        in place of the token, where one exists. A half without its partner is an entry with
        an error; the tilt range comes from ``{name}_reconstruct.json`` beside a
        ``{name}_tomo0.mrc``.

    Raises
    ------
    InputError
        Two pairs that would give one tomogram name.
    """
    groups: dict[tuple[Path, str, str, str], dict[int, tuple[Path, str]]] = {}
    for file in files:
        split = _split(file)
        if split is None:
            continue
        slotted, family, half, token = split
        halves = groups.setdefault((file.parent, slotted, file.suffix, family), {})
        if half in halves and halves[half][0] != file:
            raise InputError(
                f"{file}: both this file and {halves[half][0]} would be the same half of "
                f"{_fill(slotted, '')!r}; {LAYOUTS}, one file per half"
            )
        halves[half] = (file, token)
    entries = [_pair(key[0], key[1], key[2], halves) for key, halves in groups.items()]
    return _checked(entries, source=os.fspath(source))


def _pair(
    folder: Path, slotted: str, suffix: str, halves: dict[int, tuple[Path, str]]
) -> TomogramEntry:
    """The entry of one pair: partner looked up on disk, full tomogram, tilt range."""
    name = _fill(slotted, "") or folder.name
    known = dict(halves)
    for half, (_, token) in halves.items():
        if 1 - half not in known:
            for partner in _partners(token):
                candidate = folder / (_fill(slotted, partner) + suffix)
                if candidate.is_file():
                    known[1 - half] = (candidate, partner)
                    break
    tomo0, tomo1 = (known[h][0] if h in known else None for h in (0, 1))
    error = None
    missing = [h for h in (0, 1) if h not in known]
    if missing:
        present, token = known[1 - missing[0]]
        expected = folder / (_fill(slotted, _partners(token)[0]) + suffix)
        error = (
            f"{expected}: no such file, the other half of {present.name}; reconstruct the "
            "missing half or move the unpaired one out of the dataset"
        )
    full = next(
        (
            folder / (stem + suffix)
            for stem in (_fill(slotted, "full"), name)
            if (folder / (stem + suffix)).is_file()
        ),
        None,
    )
    tilt_range = None
    if tomo0 is not None:
        try:
            tilt_range = recorded_tilt_range(tomo0)
        except InputError as err:
            error = error or str(err)
    return TomogramEntry(name, tomo0, tomo1, full=full, tilt_range_deg=tilt_range, error=error)


def recorded_tilt_range(tomo0: str | os.PathLike) -> tuple[float, float] | None:
    """The tilt range that ``ddw reconstruct`` recorded beside a ``{stem}_tomo0`` volume.

    Parameters
    ----------
    tomo0
        A half tomogram; only a name ending in ``_tomo0`` has a record,
        ``{stem}_reconstruct.json`` beside it.

    Returns
    -------
    tuple of float or None
        ``tilt_range_deg`` of the record, ``(lowest, highest)`` in degrees; None where there is
        no record or it holds no range.

    Raises
    ------
    InputError
        A record that is not JSON, or whose ``tilt_range_deg`` is not two numbers.
    """
    tomo0 = Path(tomo0)
    if not tomo0.stem.endswith("_tomo0"):
        return None
    record = tomo0.with_name(tomo0.stem.removesuffix("_tomo0") + "_reconstruct.json")
    if not record.is_file():
        return None
    fix = "run ddw reconstruct again or delete this record"
    try:
        value = json.loads(record.read_text(encoding="utf-8")).get("tilt_range_deg")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as err:
        reason = " ".join(str(err).split())[:80]
        raise InputError(
            f"{record}: not a readable ddw reconstruct record ({reason}); {fix}"
        ) from None
    if value is None:
        return None
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(
            f"{record}: tilt_range_deg is {json.dumps(value)[:40]}, not [lowest, highest] in "
            f"degrees; {fix}"
        ) from None
    return low, high


def entries_from_lists(
    tomo0_files: Sequence[str | os.PathLike],
    tomo1_files: Sequence[str | os.PathLike],
    tomo_files: Sequence[str | os.PathLike] | None = None,
) -> list[TomogramEntry]:
    """Entries for the published tool's ``tomo0_files`` / ``tomo1_files`` lists.

    Parameters
    ----------
    tomo0_files, tomo1_files
        The halves of each tomogram, the k-th of one list paired with the k-th of the other.
    tomo_files
        The full tomograms in the same order, if any.

    Returns
    -------
    list of TomogramEntry
        One per pair, in list order. The name is the ``tomo0`` file name without its half
        token (``x_tomo0.mrc`` gives ``x``), made unique by ``_2``, ``_3``, ... in list order.
        A missing file makes an entry with an error; the tilt range comes from
        ``{stem}_reconstruct.json`` beside a ``{stem}_tomo0.mrc``.

    Raises
    ------
    InputError
        Lists of different lengths.
    """
    lists = {"tomo1_files": tomo1_files}
    if tomo_files is not None:
        lists["tomo_files"] = tomo_files
    for key, files in lists.items():
        if len(files) != len(tomo0_files):
            raise InputError(
                f"{key}: {len(files)} files for {len(tomo0_files)} tomo0_files; give one file "
                "per tomo0 file, in the same order"
            )
    entries, names = [], set()
    for k, (file0, file1) in enumerate(zip(tomo0_files, tomo1_files, strict=True)):
        tomo0, tomo1 = Path(file0), Path(file1)
        full = None if tomo_files is None else Path(tomo_files[k])
        split = _split(tomo0)
        base = (_fill(split[0], "") if split else tomo0.stem) or tomo0.stem
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}_{n}"
        names.add(name)
        error, tilt_range = None, None
        for key, file in (("tomo0_files", tomo0), ("tomo1_files", tomo1), ("tomo_files", full)):
            if file is not None and not file.is_file():
                error = f"{file}: no such file; correct {key} in your config"
                break
        try:
            tilt_range = recorded_tilt_range(tomo0)
        except InputError as err:
            error = error or str(err)
        entries.append(TomogramEntry(name, tomo0, tomo1, full, tilt_range, error))
    return entries
