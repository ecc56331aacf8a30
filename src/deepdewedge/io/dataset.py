"""One tomogram of a dataset, whatever program reconstructed it.

Every dataset reader in ``io/`` (AreTomo3 folders, Warp/WarpTools projects, RELION-5
``tomograms.star``, folders of paired files, the published tool's file lists) fills a list of
:class:`TomogramEntry`; the dataset run only ever sees this type.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["TomogramEntry"]


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
