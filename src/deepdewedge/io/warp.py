"""Read a Warp / WarpTools tilt-series ``.xml``.

Warp keeps per tilt, one value per line inside an element: ``Angles`` (degrees), ``Dose``
(e/Å² received before the tilt), ``UseTilt``, ``AxisAngle`` (degrees) and ``AxisOffsetX/Y``
(Å). It projects a specimen point ``p`` (Å from the volume centre) to the image position
``E(0, θ + LevelAngleY, -AxisAngle) R_x(LevelAngleX) p + AxisOffset`` (Å from the image
centre), ``E`` being the ZYZ Euler matrix of RELION and Warp. Written out, that is this
package's model with the specimen's z axis reversed; ``docs/conventions.md`` derives the
conversion ``θ = Angle + LevelAngleY``, ``α = -LevelAngleX``, ``φ = AxisAngle``,
``s = AxisOffset / pixel size``. Warp's importer of IMOD ``.xf`` files makes the same
identification (tilt angles copied, offsets ``-A⁻¹ d`` times the pixel size).

``AreAnglesInverted="True"`` is how Warp records that its defocus-handedness check found the
tilt angles' sign opposite to the specimen's real tilt; Warp then keeps the angles for image
positions and only flips the depth used for defocus. Here the flag negates ``θ`` and ``α``:
the image positions stay the same (negating both angles mirrors the tomogram in z) and the
tomogram's hand agrees with the defocus gradient Warp measured.

A Warp/WarpTools processing folder (WarpTools' ``--output_processing``, e.g.
``warp_tiltseries/``) holds each tilt series' ``{name}.xml`` (``Movie.XMLPath``) and the
folder ``reconstruction/`` (``TiltSeries.ReconstructionDir``) with the tomograms
``{name}_{pixel:F2}Apx.mrc``. ``ts_reconstruct --halfmap_frames`` (from even and odd frames)
or ``--halfmap_tilts`` (from alternating tilts) adds ``reconstruction/even/`` and
``reconstruction/odd/`` with the half tomograms under the same file names
(``TiltSeries.ReconstructFull``); ``deconv/``, ``ctf/`` and ``denoised/`` hold other volumes.
Warp reconstructs each tilt at ``t = Angle + LevelAngleY`` in its frame, whose z axis is this
package's reversed (above), and writes z slices in increasing z. Its tomogram therefore
measured the Fourier planes of tilts ``-t`` in this package's convention:
:func:`read_warp_folder` gives the range ``(-max t, -min t)`` over the tilts with
``UseTilt``, whatever ``AreAnglesInverted`` says (Warp's positions do not use it).
"""

from __future__ import annotations

import logging
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from deepdewedge.io.dataset import TomogramEntry
from deepdewedge.io.errors import InputError
from deepdewedge.io.geometry import TiltSeriesGeometry
from deepdewedge.io.tilts import _number, _read_lines, _show

__all__ = ["is_warp_folder", "read_warp_folder", "read_warp_xml", "warp_tilt_range_deg"]

logger = logging.getLogger(__name__)

_KIND = "Warp tilt-series .xml"
_FIX = "give the tilt-series .xml that Warp wrote"
# Local deformations Warp may refine; this package uses the global alignment only.
_IGNORED_GRIDS = (
    "GridMovementX",
    "GridMovementY",
    "GridAngleX",
    "GridAngleY",
    "GridAngleZ",
    "GridVolumeWarpX",
    "GridVolumeWarpY",
    "GridVolumeWarpZ",
)


class _Xml:
    """A parsed Warp .xml with the line on which each element starts, for messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        lines = _read_lines(path, kind=_KIND)
        if not lines:
            raise InputError(f"{path}: empty; {_FIX}")
        by_number = dict(lines)
        text = "\n".join(by_number.get(i, "") for i in range(1, lines[-1][0] + 1))
        try:
            self.root = ET.fromstring(text)
        except ET.ParseError as err:
            raise InputError(
                f"{path}: line {err.position[0]}: not well-formed XML ({_show(str(err), 60)}); "
                f"{_FIX}"
            ) from None
        if self.root.tag != "TiltSeries":
            raise InputError(
                f"{path}: the root element is <{self.root.tag}>, not <TiltSeries>; {_FIX}"
            )
        self.starts: dict[str, int] = {}
        for lineno, line in lines:
            if line.startswith("<") and not line.startswith(("</", "<?")):
                self.starts.setdefault(line[1:].split(">")[0].split()[0], lineno)

    def number(self, text: str, tag: str, offset: int, what: str) -> float:
        """Parse one number of element `tag`, `offset` lines below its start."""
        lineno = self.starts.get(tag, 0) + offset
        return _number(self.path, lineno, text, what=f"{what} of <{tag}>", fix=_FIX)

    def column(self, tag: str, n: int | None) -> list[str] | None:
        """The per-tilt entries of element `tag` (one per line), or None if it is absent."""
        element = self.root.find(tag)
        if element is None:
            return None
        tokens = (element.text or "").split()
        if n is not None and len(tokens) != n:
            raise InputError(
                f"{self.path}: <{tag}> has {len(tokens)} entries but <Angles> has {n}; {_FIX}"
            )
        return tokens

    def numbers(self, tag: str, n: int, default: float) -> np.ndarray:
        tokens = self.column(tag, n)
        if tokens is None:
            return np.full(n, default)
        return np.array([self.number(t, tag, k, f"entry {k + 1}") for k, t in enumerate(tokens)])

    def attribute(self, name: str, default: float) -> float:
        value = self.root.get(name)
        return default if value is None else self.number(value, "TiltSeries", 0, name)


def _use_tilt(xml: _Xml, n: int) -> np.ndarray:
    tokens = xml.column("UseTilt", n)
    if tokens is None:
        return np.ones(n, dtype=bool)
    flags = [t.lower() for t in tokens]
    for k, flag in enumerate(flags):
        if flag not in ("true", "false"):
            lineno = xml.starts.get("UseTilt", 0) + k
            raise InputError(
                f"{xml.path}: line {lineno}: UseTilt entry {_show(tokens[k])} is not True or "
                f"False; {_FIX}"
            )
    return np.array([flag == "true" for flag in flags])


def _defocus(xml: _Xml, n: int) -> np.ndarray:
    """Defocus per tilt (µm): the GridCTF nodes if it has one per tilt, else the CTF's."""
    grid = xml.root.find("GridCTF")
    if grid is not None:
        size = [grid.get(k, "") for k in ("Width", "Height", "Depth")]
        nodes = grid.findall("Node")
        if size == ["1", "1", str(n)] and len(nodes) == n:
            defocus = np.full(n, np.nan)
            for k, node in enumerate(nodes):
                z = int(xml.number(node.get("Z", ""), "GridCTF", k + 1, f"node {k + 1} Z"))
                if not 0 <= z < n:
                    raise InputError(f"{xml.path}: <GridCTF> node {k + 1} has Z = {z}; {_FIX}")
                defocus[z] = xml.number(node.get("Value", ""), "GridCTF", k + 1, "node value")
            return defocus
    for param in xml.root.iterfind("CTF/Param"):
        if param.get("Name") == "Defocus":
            return np.full(n, xml.number(param.get("Value", ""), "CTF", 0, "Defocus"))
    return np.full(n, np.nan)


def _warn_ignored(xml: _Xml) -> None:
    """Log what Warp refined but this package cannot use."""
    moving = []
    for tag in _IGNORED_GRIDS:
        for node in xml.root.iterfind(f"{tag}/Node"):
            try:
                value = float(node.get("Value", "0"))
            except ValueError:
                value = np.nan
            if value != 0.0:
                moving.append(tag)
                break
    if moving:
        logger.warning(
            "%s: %s hold non-zero values (local deformations); they are ignored and the "
            "global alignment is used",
            xml.path,
            ", ".join(moving),
        )
    correction = xml.root.get("MagnificationCorrection")
    if correction is not None:
        values = [
            xml.number(v, "TiltSeries", 0, "MagnificationCorrection") for v in correction.split(",")
        ]
        if len(values) != 4 or not np.allclose(values, [1.0, 0.0, 0.0, 1.0], atol=1e-6):
            logger.warning(
                "%s: MagnificationCorrection %s is not the identity; the anisotropic "
                "magnification is ignored",
                xml.path,
                correction,
            )


def read_warp_xml(path: str | os.PathLike, *, pixel_size_angstrom: float) -> TiltSeriesGeometry:
    """Read the alignment, exposure and defocus of a Warp / WarpTools tilt series.

    Parameters
    ----------
    path
        The tilt series' ``.xml`` (``<name>.xml`` next to the ``.tomostar``), UTF-8 with or
        without a byte-order mark; one entry per tilt of the tilt series, in its order.
    pixel_size_angstrom
        Pixel size of the raw stack in Å, to turn the ``AxisOffsetX/Y`` (Å) into pixels.

    Returns
    -------
    TiltSeriesGeometry
        One view per tilt; ``UseTilt = False`` marks a view excluded. Pre-exposure is
        ``Dose``; defocus is the ``GridCTF`` value of each tilt when the grid holds one per
        tilt, else the ``CTF`` element's ``Defocus``, else unknown.

    Raises
    ------
    InputError
        Not well-formed XML (with the line), a root other than ``<TiltSeries>``, no
        ``<Angles>``, per-tilt elements of different lengths, or an unparsable entry.
    ValueError
        A pixel size that is not positive.

    Notes
    -----
    See the module docstring for the conversion and for ``AreAnglesInverted``. Local
    deformations (``GridMovementX/Y``, ``GridAngleX/Y/Z``, ``GridVolumeWarpX/Y/Z``) and a
    ``MagnificationCorrection`` other than the identity are logged as warnings and ignored.
    """
    if not pixel_size_angstrom > 0:
        raise ValueError(f"pixel_size_angstrom must be positive, got {pixel_size_angstrom}")
    path = Path(path)
    xml = _Xml(path)
    tokens = xml.column("Angles", None)
    if not tokens:
        raise InputError(f"{path}: no <Angles>; {_FIX}")
    n = len(tokens)
    angles = xml.numbers("Angles", n, 0.0)
    tilt = angles + xml.attribute("LevelAngleY", 0.0)
    x_tilt = np.full(n, 0.0 - xml.attribute("LevelAngleX", 0.0))
    if (xml.root.get("AreAnglesInverted") or "").lower() == "true":
        tilt, x_tilt = -tilt, -x_tilt
    _warn_ignored(xml)
    return TiltSeriesGeometry(
        tilt_angle_deg=tilt,
        tilt_axis_angle_deg=xml.numbers("AxisAngle", n, 0.0),
        shift_x_px=xml.numbers("AxisOffsetX", n, 0.0) / pixel_size_angstrom,
        shift_y_px=xml.numbers("AxisOffsetY", n, 0.0) / pixel_size_angstrom,
        x_tilt_deg=x_tilt,
        excluded=~_use_tilt(xml, n),
        pre_exposure_e_per_a2=xml.numbers("Dose", n, np.nan),
        defocus_um=_defocus(xml, n),
        source=str(path),
    )


# --------------------------------------------------------------------------- Warp folders

# Warp's tomogram name: the tilt series' name and the pixel size with two decimals (C# "F2",
# whose decimal separator follows the locale).
_TOMOGRAM = re.compile(r"^(?P<series>.+)_\d+[.,]\d{2}Apx$")


def _reconstruction_folder(folder: Path) -> Path | None:
    """The ``reconstruction`` folder of a processing folder, or the folder itself if it is one."""
    for candidate in (folder / "reconstruction", folder):
        if (candidate / "even").is_dir() and (candidate / "odd").is_dir():
            if candidate != folder or folder.name == "reconstruction":
                return candidate
    return None


def is_warp_folder(folder: str | os.PathLike) -> bool:
    """Whether `folder` is a Warp processing folder with half tomograms, or its reconstructions.

    That is: it has ``reconstruction/even/`` and ``reconstruction/odd/``, or it is a folder
    named ``reconstruction`` with ``even/`` and ``odd/``.
    """
    return _reconstruction_folder(Path(folder)) is not None


def warp_tilt_range_deg(path: str | os.PathLike) -> tuple[float, float]:
    """The tilt range of a Warp tomogram in this package's convention, from its tilt series' .xml.

    Parameters
    ----------
    path
        The tilt series' ``.xml``.

    Returns
    -------
    tuple of float
        ``(-max t, -min t)`` in degrees over the tilts with ``UseTilt``, ``t`` being
        ``Angle + LevelAngleY`` (see the module docstring for the sign).

    Raises
    ------
    InputError
        An .xml that cannot be read, without ``<Angles>``, or with no tilt in use.
    """
    xml = _Xml(Path(path))
    tokens = xml.column("Angles", None)
    if not tokens:
        raise InputError(f"{path}: no <Angles>; {_FIX}")
    n = len(tokens)
    tilts = xml.numbers("Angles", n, 0.0) + xml.attribute("LevelAngleY", 0.0)
    used = tilts[_use_tilt(xml, n)]
    if used.size == 0:
        raise InputError(f"{path}: no tilt has UseTilt True; {_FIX}")
    return -float(used.max()), -float(used.min())


def read_warp_folder(folder: str | os.PathLike) -> list[TomogramEntry]:
    """Read the half tomograms of a Warp/WarpTools processing folder (see the module docstring).

    Parameters
    ----------
    folder
        The processing folder (with ``reconstruction/even/`` and ``reconstruction/odd/``) or
        its ``reconstruction`` folder.

    Returns
    -------
    list of TomogramEntry
        One per file name in ``even/`` or ``odd/``, named after the file
        (``{name}_{pixel}Apx``, so reconstructions at two pixel sizes stay apart), sorted:
        ``tomo0`` the even half, ``tomo1`` the odd one, ``full`` the same name in
        ``reconstruction/``. The tilt range comes from ``{name}.xml`` in the processing folder
        (:func:`warp_tilt_range_deg`); it is None where there is no .xml. A missing half or an
        unreadable .xml gives an entry with an error.
    """
    reconstruction = _reconstruction_folder(Path(folder))
    if reconstruction is None:
        raise InputError(
            f"{folder}: no reconstruction/even and reconstruction/odd folders; run WarpTools "
            "ts_reconstruct with --halfmap_frames or --halfmap_tilts"
        )
    even, odd = reconstruction / "even", reconstruction / "odd"
    stems = sorted({p.stem for half in (even, odd) for p in half.glob("*.mrc")})
    entries = []
    for stem in stems:
        tomo0, tomo1 = even / f"{stem}.mrc", odd / f"{stem}.mrc"
        full = reconstruction / f"{stem}.mrc"
        error = next(
            (
                f"{half}: no such file, the other half of {other}; reconstruct the tilt series "
                "again with --halfmap_frames or --halfmap_tilts"
                for half, other in ((tomo0, tomo1), (tomo1, tomo0))
                if not half.is_file()
            ),
            None,
        )
        match = _TOMOGRAM.match(stem)
        xml = reconstruction.parent / f"{match['series'] if match else stem}.xml"
        tilt_range = None
        if xml.is_file():
            try:
                tilt_range = warp_tilt_range_deg(xml)
            except InputError as err:
                error = error or str(err)
        entries.append(
            TomogramEntry(
                stem,
                tomo0 if tomo0.is_file() else None,
                tomo1 if tomo1.is_file() else None,
                full=full if full.is_file() else None,
                tilt_range_deg=tilt_range,
                error=error,
            )
        )
    return entries
