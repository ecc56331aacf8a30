"""A dataset of tilt series not yet reconstructed: stacks beside their alignments.

Each stack ``{name}.mrc``, ``{name}.st`` or ``{name}.ali`` in the folder is one tilt series
when a file beside it gives its geometry: an alignment (IMOD ``{name}.xf``, AreTomo
``{name}.aln``, Warp/WarpTools ``{name}.xml``, RELION-5 ``{name}.star``; see
:func:`deepdewedge.io.alignment.read_alignment`) or, for an aligned stack, its tilt angles
(``{name}.tlt``, ``{name}.rawtlt``) or SerialEM record (``{name}.mrc.mdoc``, ``{name}.mdoc``).
Optional files beside it are passed on as well: the angles of an ``.xf``, IMOD's ``.xtilt``,
the ``.mdoc`` (acquisition order, dose) and a defocus table (``{name}.defocus``,
``{name}_ctf.txt``, ``{name}.ctf``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TiltSeriesFiles", "read_tilt_series_folder"]

_STACKS = (".mrc", ".st", ".ali")
_ALIGNMENTS = (".xf", ".aln", ".xml", ".star")
_ANGLES = (".tlt", ".rawtlt")
_DEFOCUS = (".defocus", "_ctf.txt", ".ctf")


@dataclass(frozen=True)
class TiltSeriesFiles:
    """One tilt series of a folder and the files beside it (None where absent)."""

    name: str
    tilt_series: Path
    alignment: Path | None = None
    tilt_angles: Path | None = None
    x_tilt_file: Path | None = None
    mdoc: Path | None = None
    defocus_file: Path | None = None

    def reconstruct_options(self) -> dict[str, Path]:
        """The files as options of ``ddw reconstruct``."""
        fields = ("tilt_series", "alignment", "tilt_angles", "x_tilt_file", "mdoc")
        options = {f: getattr(self, f) for f in (*fields, "defocus_file")}
        return {k: v for k, v in options.items() if v is not None}


def _beside(stack: Path, suffixes: tuple[str, ...]) -> Path | None:
    """The first existing ``{stem}{suffix}`` beside `stack`."""
    for suffix in suffixes:
        candidate = stack.with_name(stack.stem + suffix)
        if candidate.is_file():
            return candidate
    return None


def read_tilt_series_folder(folder: str | os.PathLike) -> list[TiltSeriesFiles]:
    """The tilt series of `folder`, sorted by name; empty if it holds none.

    A stack counts when an alignment, a tilt-angle file or an ``.mdoc`` lies beside it, so
    reconstructed volumes and other MRC files in the folder are not taken for tilt series.
    """
    series = []
    for stack in sorted(Path(folder).iterdir()):
        if stack.suffix.lower() not in _STACKS or not stack.is_file():
            continue
        alignment = _beside(stack, _ALIGNMENTS)
        angles = _beside(stack, _ANGLES)
        mdoc = next(
            (p for p in (Path(f"{stack}.mdoc"), stack.with_suffix(".mdoc")) if p.is_file()), None
        )
        if alignment is None and angles is None and mdoc is None:
            continue
        series.append(
            TiltSeriesFiles(
                name=stack.stem,
                tilt_series=stack,
                alignment=alignment,
                tilt_angles=angles,
                x_tilt_file=_beside(stack, (".xtilt",)),
                mdoc=mdoc,
                defocus_file=_beside(stack, _DEFOCUS),
            )
        )
    return series
