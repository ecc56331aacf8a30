"""One tilt-series geometry, whatever program aligned the tilt series.

Every alignment reader in ``io/`` (IMOD, AreTomo, Warp, RELION-5) fills a
:class:`TiltSeriesGeometry`; reconstruction only ever sees this type.

Projection model
----------------
A point of the specimen at centred coordinates ``(x, y, z)`` in pixels of the raw stack (the
tomogram's frame: y is the tilt axis, z the beam direction at zero tilt) is imaged in raw view
``i`` at the raw-image position, relative to the image centre ``((w - 1) / 2, (h - 1) / 2)``
(pixel centres at integer indices),

    (x_t, y_t, z_t) = R_x(α_i) (x, y, z)
    r = m_i R(φ_i) (x_t cos θ_i + z_t sin θ_i,  y_t) + (s_x,i, s_y,i)

with ``θ`` the tilt angle (IMOD's sign: a positive tilt moves ``+z`` towards ``+x``), ``α``
the tilt about the x axis (IMOD's ``.xtilt``; ``R_x(α) = [[1, 0, 0], [0, cos α, -sin α],
[0, sin α, cos α]]`` on ``(x, y, z)``), ``R(φ) = [[cos φ, -sin φ], [sin φ, cos φ]]`` the
in-plane rotation by the tilt-axis angle ``φ`` (counter-clockwise from the image's +y axis, as
IMOD's and SerialEM's "tilt axis angle", Warp's ``AxisAngle`` and RELION-5's
``rlnTomoZRot``), ``m`` the magnification and ``s`` the shift: where the tilt axis at the
specimen's centre lands in the raw image. ``docs/conventions.md`` derives each format's
conversion to this model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

__all__ = ["TiltSeriesGeometry"]


def _frozen(values, n: int, name: str, dtype, fill) -> np.ndarray:
    array = np.full(n, fill, dtype=dtype) if values is None else np.array(values, dtype=dtype)
    if array.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {array.shape}")
    array.setflags(write=False)
    return array


@dataclass(frozen=True, eq=False)
class TiltSeriesGeometry:
    """Per-view geometry and exposure of a raw tilt series, in stack order.

    Every array has shape `(n,)`, one entry per section of the raw stack, and is read-only.

    Attributes
    ----------
    tilt_angle_deg
        Tilt angle ``θ`` in degrees.
    tilt_axis_angle_deg
        Angle ``φ`` of the tilt axis in the raw image, counter-clockwise from +y, in degrees.
    shift_x_px, shift_y_px
        Raw-image position (pixels from the image centre) of the specimen's centre on the tilt
        axis.
    magnification
        Scale ``m`` of the specimen in the raw image relative to the reconstruction's pixels.
    x_tilt_deg
        Tilt ``α`` about the x axis in degrees, applied before the tilt about y (IMOD's
        ``.xtilt``).
    excluded
        Views left out of the reconstruction (Warp's ``UseTilt = False``, AreTomo's dark
        frames, views missing from a RELION-5 STAR).
    pre_exposure_e_per_a2
        Dose in e/Å² each view had received before it was recorded; NaN where unknown.
    defocus_um
        Defocus in µm, positive = underfocus; NaN where unknown.
    source
        The file the geometry was read from, for messages.
    """

    tilt_angle_deg: np.ndarray
    tilt_axis_angle_deg: np.ndarray | None = None
    shift_x_px: np.ndarray | None = None
    shift_y_px: np.ndarray | None = None
    magnification: np.ndarray | None = None
    x_tilt_deg: np.ndarray | None = None
    excluded: np.ndarray | None = None
    pre_exposure_e_per_a2: np.ndarray | None = None
    defocus_um: np.ndarray | None = None
    source: str = field(default="")

    def __post_init__(self) -> None:
        """Fill unset arrays with neutral values and freeze every array."""
        angles = np.array(self.tilt_angle_deg, dtype=np.float64).reshape(-1)
        n = angles.size
        if n == 0:
            raise ValueError("a tilt-series geometry needs at least one view")
        defaults = {
            "tilt_angle_deg": (np.float64, 0.0),
            "tilt_axis_angle_deg": (np.float64, 0.0),
            "shift_x_px": (np.float64, 0.0),
            "shift_y_px": (np.float64, 0.0),
            "magnification": (np.float64, 1.0),
            "x_tilt_deg": (np.float64, 0.0),
            "excluded": (bool, False),
            "pre_exposure_e_per_a2": (np.float64, math.nan),
            "defocus_um": (np.float64, math.nan),
        }
        for name, (dtype, fill) in defaults.items():
            value = angles if name == "tilt_angle_deg" else getattr(self, name)
            object.__setattr__(self, name, _frozen(value, n, name, dtype, fill))
        for name in defaults:
            if name != "excluded" and np.isinf(getattr(self, name)).any():
                raise ValueError(f"{name} must be finite or NaN")

    @property
    def n_views(self) -> int:
        """Number of sections of the raw stack."""
        return int(self.tilt_angle_deg.size)

    @property
    def has_dose(self) -> bool:
        """Whether every view's pre-exposure is known."""
        return bool(np.isfinite(self.pre_exposure_e_per_a2).all())

    @property
    def has_defocus(self) -> bool:
        """Whether every view's defocus is known."""
        return bool(np.isfinite(self.defocus_um).all())

    def acquisition_order(self) -> np.ndarray | None:
        """Stack indices in acquisition sequence, from the pre-exposure; None if unknown.

        Returns
        -------
        numpy.ndarray or None
            `(n,)` int64: entry ``k`` is the stack index of the ``k``-th view recorded. Views
            with equal dose keep their stack order.
        """
        if not self.has_dose:
            return None
        return np.argsort(self.pre_exposure_e_per_a2, kind="stable").astype(np.int64)

    def with_changes(self, **changes) -> TiltSeriesGeometry:
        """A copy with some attributes replaced (validated like a new geometry)."""
        return replace(self, **changes)

    def raw_position_matrix(self) -> np.ndarray:
        """Affine maps from aligned-image to raw-image coordinates.

        Returns
        -------
        numpy.ndarray
            `(n, 2, 3)` float64: row-major ``[[a, b, s_x], [c, d, s_y]]`` such that the point
            ``(u, v)`` of the aligned image (tilt axis along +y through the centre, both
            relative to the image centre, in pixels) is at ``(a u + b v + s_x, c u + d v +
            s_y)`` in the raw image, i.e. ``m R(φ) (u, v) + s``.
        """
        phi = np.deg2rad(self.tilt_axis_angle_deg)
        m = self.magnification
        matrix = np.zeros((self.n_views, 2, 3))
        matrix[:, 0, 0] = m * np.cos(phi)
        matrix[:, 0, 1] = -m * np.sin(phi)
        matrix[:, 1, 0] = m * np.sin(phi)
        matrix[:, 1, 1] = m * np.cos(phi)
        matrix[:, 0, 2] = self.shift_x_px
        matrix[:, 1, 2] = self.shift_y_px
        return matrix
