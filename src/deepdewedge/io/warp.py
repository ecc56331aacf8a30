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
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from deepdewedge.io.errors import InputError
from deepdewedge.io.geometry import TiltSeriesGeometry
from deepdewedge.io.tilts import _number, _read_lines, _show

__all__ = ["read_warp_xml"]

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
