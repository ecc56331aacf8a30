"""Read an IMOD alignment: ``.xf`` transforms, ``.tlt`` angles and an optional ``.xtilt``.

An ``.xf`` holds one line ``A11 A12 A21 A22 DX DY`` per section of the raw stack. IMOD aligns
a view by sending its raw-image point ``r`` (pixels from the image centre, the centre of
rotation that IMOD places at ``((w - 1) / 2, (h - 1) / 2)`` in 0-based pixel indices) to the
aligned point ``a = A r + d``, where the tilt axis runs along +y. So the raw position of the
aligned point ``a`` is ``A⁻¹ (a - d)``, which is the geometry's ``m R(φ) a + s`` (see
:mod:`deepdewedge.io.geometry`) with ``s = -A⁻¹ d`` and ``m R(φ)`` the similarity part of ``A⁻¹``:
``φ = atan2(c - b, a + d)`` and ``m = sqrt(det A⁻¹)`` for ``A⁻¹ = [[a, b], [c, d]]``.
``docs/conventions.md`` gives the derivation. A stretch or skew left in ``A`` (IMOD's
``tiltalign`` may fit one) cannot be represented and is reported, then ignored.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from deepdewedge.io.errors import InputError
from deepdewedge.io.geometry import TiltSeriesGeometry
from deepdewedge.io.tilts import _number_rows

__all__ = ["read_imod_xf", "read_x_tilt_angles"]

logger = logging.getLogger(__name__)

_XF_KIND = "IMOD .xf (one line 'A11 A12 A21 A22 DX DY' per view of the raw stack)"
_XTILT_KIND = "IMOD .xtilt (one x-axis tilt in degrees per view, or a single value)"
# Relative stretch or skew of an .xf transform beyond which a warning says it is ignored.
_STRETCH_TOLERANCE = 1e-3


def _xf_rows(path: Path) -> tuple[np.ndarray, list[int]]:
    """The `(n, 6)` numbers of an .xf and the line number of each row."""
    rows = _number_rows(
        path,
        kind=_XF_KIND,
        columns=6,
        what="value",
        layout="an IMOD .xf has six per line: A11 A12 A21 A22 DX DY",
    )
    return np.asarray([r for _, r in rows], dtype=np.float64), [lineno for lineno, _ in rows]


def read_x_tilt_angles(path: str | os.PathLike, *, n_views: int) -> np.ndarray:
    """Read an IMOD ``.xtilt`` file: the tilt about the x axis of every view.

    Parameters
    ----------
    path
        One angle in degrees per view, or a single angle for all views.
    n_views
        Number of views of the tilt series.

    Returns
    -------
    numpy.ndarray
        `(n_views,)` float64 x-axis tilts in degrees.

    Raises
    ------
    InputError
        Missing or empty file, a line that is not one number, or neither one nor ``n_views``
        values.
    """
    path = Path(path)
    rows = _number_rows(
        path, kind=_XTILT_KIND, columns=1, what="x tilt", layout=f"give the {_XTILT_KIND}"
    )
    values = [value for _, (value,) in rows]
    if len(values) == 1:
        return np.full(n_views, values[0])
    if len(values) != n_views:
        raise InputError(
            f"{path}: {len(values)} x tilts for {n_views} views; give the .xtilt of this "
            "alignment (one value per view, or a single value)"
        )
    return np.asarray(values, dtype=np.float64)


def read_imod_xf(
    path: str | os.PathLike,
    *,
    tilt_angles_deg: np.ndarray,
    x_tilt_file: str | os.PathLike | None = None,
) -> TiltSeriesGeometry:
    """Read an IMOD ``.xf`` alignment of a raw tilt series.

    Parameters
    ----------
    path
        The ``.xf`` (e.g. ``<name>.xf`` from etomo's fine alignment), one transform per section
        of the raw stack, with shifts in pixels of that stack.
    tilt_angles_deg
        `(n,)` tilt angles in degrees in stack order, from the ``.tlt`` written with the
        ``.xf`` (see :func:`deepdewedge.io.tilts.read_tilt_angles`).
    x_tilt_file
        Optional ``.xtilt``: the tilt about the x axis, per view or one value.

    Returns
    -------
    TiltSeriesGeometry
        Angles, tilt-axis angles, shifts, magnifications and x tilts; no view is excluded
        (IMOD excludes views in ``tilt``, not in the ``.xf``) and dose and defocus are unknown.

    Raises
    ------
    InputError
        A line that is not six numbers (the message gives its line number), a transform that
        is singular or mirrors the image, or a count of angles that differs from the count of
        transforms.

    Notes
    -----
    See the module docstring: the geometry's shift is ``-A⁻¹ d`` and its rotation and
    magnification are those of ``A⁻¹``. A transform with a stretch or skew above 0.1 % of its
    magnification is logged as a warning: that part is ignored.
    """
    path = Path(path)
    rows, linenos = _xf_rows(path)
    angles = np.asarray(tilt_angles_deg, dtype=np.float64).reshape(-1)
    if angles.size != len(rows):
        raise InputError(
            f"{path}: {len(rows)} transforms for {angles.size} tilt angles; give the .tlt "
            "written with this .xf, one angle per view of the raw stack"
        )
    matrices = rows[:, :4].reshape(-1, 2, 2)
    det = np.linalg.det(matrices)
    singular = np.flatnonzero(~(det > 1e-9))
    if singular.size:
        i = int(singular[0])
        raise InputError(
            f"{path}: line {linenos[i]}: the transform has determinant {det[i]:g} (singular or "
            "mirrored); give the .xf that IMOD wrote for this tilt series"
        )
    inverse = np.linalg.inv(matrices)
    (a, b), (c, d) = inverse[:, 0].T, inverse[:, 1].T
    phi = np.arctan2(c - b, a + d)
    mag = np.sqrt(np.linalg.det(inverse))
    similarity = mag[:, None, None] * np.stack(
        [np.stack([np.cos(phi), -np.sin(phi)], -1), np.stack([np.sin(phi), np.cos(phi)], -1)], -2
    )
    stretch = np.abs(inverse - similarity).max(axis=(1, 2)) / mag
    if (stretch > _STRETCH_TOLERANCE).any():
        views = np.flatnonzero(stretch > _STRETCH_TOLERANCE) + 1
        logger.warning(
            "%s: views %s have a stretch or skew of up to %.2g beyond rotation and "
            "magnification; it is ignored",
            path,
            ", ".join(map(str, views)),
            stretch.max(),
        )
    shift = -np.einsum("nij,nj->ni", inverse, rows[:, 4:])
    x_tilt = None if x_tilt_file is None else read_x_tilt_angles(x_tilt_file, n_views=len(rows))
    return TiltSeriesGeometry(
        tilt_angle_deg=angles,
        tilt_axis_angle_deg=np.rad2deg(phi),
        shift_x_px=shift[:, 0],
        shift_y_px=shift[:, 1],
        magnification=mag,
        x_tilt_deg=x_tilt,
        source=str(path),
    )
