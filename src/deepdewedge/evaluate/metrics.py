"""Quality metrics of reconstructions against a ground truth: CC and FSC, whole or per particle.

The metrics are those of the DeepDeWedge paper's section 2.2.3: the correlation coefficient
(eq. 6), the correlation coefficient outside the missing wedge (denoising alone) and inside it
(missing-wedge filling alone), and Fourier shell correlation resolutions of the tomogram and of
the particles in it, overall and inside the missing wedge.

All Fourier sums run over the non-redundant half of the spectrum (``rfftn``) with each stored
coefficient weighted by the number of full-spectrum coefficients it stands for (1 on the
``kx = 0`` plane and, for even widths, on the ``kx`` Nyquist plane; 2 elsewhere), so that they
equal the sums over the full spectrum of the real volumes.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from deepdewedge.fourier import missing_wedge_mask

__all__ = [
    "Evaluation",
    "FSCCurve",
    "ParticleFSC",
    "cc_inside_wedge",
    "cc_outside_wedge",
    "correlation_coefficient",
    "evaluate_volume",
    "fsc",
    "particle_box_starts",
    "particle_fsc",
    "resolution_at",
    "soft_sphere_mask",
]

log = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor
# A Fourier region holding less than this fraction of a volume's power (without its mean) holds
# none: what a missing-wedge filter in float32 leaves there is about 1e-14.
_NEGLIGIBLE_POWER = 1e-10
# Particle boxes are Fourier transformed in chunks of at most this many voxels.
_CHUNK_VOXELS = 2**22


class FSCCurve(NamedTuple):
    """A Fourier shell correlation curve.

    Attributes
    ----------
    frequencies_per_angstrom : torch.Tensor
        `(n_shells,)` float64 centre frequency of each shell in 1/Å, increasing; the last one is
        the Nyquist frequency ``1 / (2 * voxel_size_angstrom)``.
    fsc : torch.Tensor
        `(..., n_shells)` float64 FSC of each shell; NaN for a shell with no coefficient.
    n_coefficients : torch.Tensor
        `(n_shells,)` float64 number of full-spectrum Fourier coefficients in each shell (and in
        the Fourier region, if one was given).
    """

    frequencies_per_angstrom: torch.Tensor
    fsc: torch.Tensor
    n_coefficients: torch.Tensor


class ParticleFSC(NamedTuple):
    """Mean Fourier shell correlation of particles cut out of two volumes.

    Attributes
    ----------
    overall : FSCCurve
        Mean over particles of the per-particle FSC curves, shape `(n_shells,)`.
    inside_wedge : FSCCurve or None
        The same, restricted to the missing-wedge region of Fourier space; None when no wedge
        was given.
    n_particles : int
        Particles whose box lies inside the volume; only these are averaged.
    n_skipped : int
        Particles left out because their box leaves the volume.
    """

    overall: FSCCurve
    inside_wedge: FSCCurve | None
    n_particles: int
    n_skipped: int


class Evaluation(NamedTuple):
    """Result of :func:`evaluate_volume`.

    Attributes
    ----------
    metrics : dict of str to float or int
        Scalar metrics (see :func:`evaluate_volume`); NaN where a metric is undefined.
    curves : dict of str to FSCCurve
        The FSC curves behind the resolutions: ``fsc``, ``fsc_inside_wedge`` and, with
        particles, ``particle_fsc`` and ``particle_fsc_inside_wedge``.
    """

    metrics: dict[str, float | int]
    curves: dict[str, FSCCurve]


# --- input checks -----------------------------------------------------------------------


def _as_float64(array: ArrayLike, name: str) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        tensor = array.detach()
    elif isinstance(array, np.ndarray):
        # A float64 copy: read-only inputs (memory-mapped MRC files) stay untouched.
        tensor = torch.from_numpy(
            np.array(array, dtype=np.complex128 if np.iscomplexobj(array) else np.float64)
        )
    else:
        raise ValueError(f"{name} must be a numpy array or a torch tensor, got {type(array)}")
    if tensor.is_complex():
        raise ValueError(f"{name} must be real-valued")
    return tensor.to(torch.float64)


def _pair(
    a: ArrayLike, b: ArrayLike, *, min_ndim: int = 0, exact_ndim: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both inputs as float64 tensors on `a`'s device, after checking shapes and values."""
    x = _as_float64(a, "a")
    y = _as_float64(b, "b")
    if x.shape != y.shape:
        raise ValueError(
            f"a and b must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if exact_ndim is not None and x.ndim != exact_ndim:
        raise ValueError(f"a and b must be volumes of shape (d, h, w), got {tuple(x.shape)}")
    if x.ndim < min_ndim:
        raise ValueError(f"a and b must have shape (..., d, h, w), got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError("a and b must not be empty")
    y = y.to(x.device)
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("a and b must contain only finite values")
    return x, y


def _positive(value: object, name: str) -> float:
    if (
        not isinstance(value, numbers.Real)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _check_n_shells(n_shells: int | None, shape_zyx: Sequence[int]) -> int:
    if n_shells is None:
        n_shells = min(shape_zyx) // 2
        if n_shells < 1:
            raise ValueError(
                f"volumes of shape {tuple(shape_zyx)} are too small for an FSC; they need at "
                "least 2 voxels along each axis"
            )
        return n_shells
    if not isinstance(n_shells, numbers.Integral) or isinstance(n_shells, bool) or n_shells < 1:
        raise ValueError(f"n_shells must be a positive integer, got {n_shells!r}")
    return int(n_shells)


# --- Fourier-space building blocks ------------------------------------------------------


def _spectrum(volumes: torch.Tensor) -> torch.Tensor:
    """`(..., d, h, w)` real -> `(..., d, h, w // 2 + 1)` complex128 unshifted spectrum."""
    return torch.fft.rfftn(volumes, dim=(-3, -2, -1))


def _hermitian_weights(shape_zyx: Sequence[int], device: torch.device) -> torch.Tensor:
    """`(d, h, w // 2 + 1)` float64: how many full-spectrum coefficients each stored one is."""
    d, h, w = shape_zyx
    columns = torch.full((w // 2 + 1,), 2.0, dtype=torch.float64, device=device)
    columns[0] = 1.0
    if w % 2 == 0:
        columns[-1] = 1.0
    return columns.expand(d, h, w // 2 + 1)


def _radius(shape_zyx: Sequence[int], device: torch.device) -> torch.Tensor:
    """`(d, h, w // 2 + 1)` float64 spatial frequency |k| in cycles per voxel."""
    d, h, w = shape_zyx
    kz = torch.fft.fftfreq(d, dtype=torch.float64, device=device)
    ky = torch.fft.fftfreq(h, dtype=torch.float64, device=device)
    kx = torch.fft.rfftfreq(w, dtype=torch.float64, device=device)
    return torch.sqrt(kz[:, None, None] ** 2 + ky[None, :, None] ** 2 + kx[None, None, :] ** 2)


def _shell_index(shape_zyx: Sequence[int], n_shells: int, device: torch.device) -> torch.Tensor:
    """`(d * h * (w // 2 + 1),)` long shell of each rfft coefficient, `n_shells` if in none.

    Shell ``i`` (0-based) holds the frequencies nearest to ``(i + 1) * 0.5 / n_shells`` cycles
    per voxel; the zero frequency and the corners beyond the last shell belong to none.
    """
    step = 0.5 / n_shells
    nearest = torch.floor(_radius(shape_zyx, device) / step + 0.5).to(torch.long)
    shell = nearest - 1
    outside = (nearest < 1) | (nearest > n_shells)
    return torch.where(outside, torch.full_like(shell, n_shells), shell).reshape(-1)


def _wedge_region(
    shape_zyx: Sequence[int],
    *,
    mw_angle_deg: float | None,
    tilt_range_deg: tuple[float, float] | None,
    inside: bool,
    device: torch.device,
) -> torch.Tensor:
    """`(d, h, w // 2 + 1)` float64: 1 outside (measured) or inside the missing wedge."""
    measured = missing_wedge_mask(
        tuple(shape_zyx),
        mw_angle_deg=mw_angle_deg,
        tilt_range_deg=tilt_range_deg,
        rfft=True,
        device=device,
    ).to(torch.float64)
    return 1.0 - measured if inside else measured


def _check_fourier_mask(mask: ArrayLike, shape_zyx: Sequence[int], device) -> torch.Tensor:
    d, h, w = shape_zyx
    expected = (d, h, w // 2 + 1)
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
        mask = mask.to(torch.float64)
    elif isinstance(mask, np.ndarray) and mask.dtype == np.bool_:
        mask = mask.astype(np.float64)
    region = _as_float64(mask, "mask").to(device)
    if tuple(region.shape) != expected:
        raise ValueError(
            f"mask must have the rfft shape (d, h, w // 2 + 1) = {expected} of the volumes, "
            f"got {tuple(region.shape)}"
        )
    if not torch.isfinite(region).all() or (region < 0).any():
        raise ValueError("mask must hold finite, non-negative weights")
    return region


def _region_cc(
    spec_a: torch.Tensor, spec_b: torch.Tensor, hermitian: torch.Tensor, region: torch.Tensor
) -> float:
    """Correlation of two spectra over a Fourier region, the zero frequency left out.

    NaN when either spectrum has no power there: less than `_NEGLIGIBLE_POWER` of its total
    power (float32 round-off of a filtered volume leaks about 1e-14 into the filtered region).
    """
    weights = hermitian.clone()
    weights[0, 0, 0] = 0.0
    power_a, power_b = weights * spec_a.abs().square(), weights * spec_b.abs().square()
    total_a, total_b = power_a.sum(), power_b.sum()
    weights = weights * region
    in_a, in_b = (region * power_a).sum(), (region * power_b).sum()
    if in_a <= _NEGLIGIBLE_POWER * total_a or in_b <= _NEGLIGIBLE_POWER * total_b:
        return math.nan
    cross = (weights * (spec_a * spec_b.conj()).real).sum()
    return float(torch.clamp(cross / torch.sqrt(in_a * in_b), -1.0, 1.0))


def _shell_sum(values: torch.Tensor, shells: torch.Tensor, n_shells: int) -> torch.Tensor:
    """Sum `(..., d, h, w')` values per shell -> `(..., n_shells)`."""
    batch = values.shape[:-3]
    flat = values.reshape(-1, shells.numel())
    total = torch.zeros(flat.shape[0], n_shells + 1, dtype=torch.float64, device=values.device)
    total.index_add_(1, shells, flat)
    return total[:, :n_shells].reshape(*batch, n_shells)


def _fsc_curves(
    spec_a: torch.Tensor,
    spec_b: torch.Tensor,
    hermitian: torch.Tensor,
    region: torch.Tensor | None,
    shells: torch.Tensor,
    n_shells: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FSC `(..., n_shells)` of two `(..., d, h, w')` spectra, and coefficients per shell.

    A shell where a volume's power per coefficient is below `_NEGLIGIBLE_POWER` of its power
    per coefficient over the whole spectrum holds nothing of it: its FSC is 0 (round-off left
    by a filter correlates at random). A shell with no coefficient in the region is NaN.
    """
    weights = hermitian if region is None else hermitian * region
    counts = _shell_sum(hermitian * (weights > 0), shells, n_shells)
    shell_weight = _shell_sum(weights, shells, n_shells)
    power_a, power_b = spec_a.abs().square(), spec_b.abs().square()
    n_total = hermitian.sum() - 1.0
    thresholds = []
    for power in (power_a, power_b):
        total = (hermitian * power).sum(dim=(-3, -2, -1)) - power[..., 0, 0, 0]
        thresholds.append(_NEGLIGIBLE_POWER * (total / n_total)[..., None] * shell_weight)
    cross = _shell_sum(weights * (spec_a * spec_b.conj()).real, shells, n_shells)
    in_a = _shell_sum(weights * power_a, shells, n_shells)
    in_b = _shell_sum(weights * power_b, shells, n_shells)
    some = (in_a > thresholds[0]) & (in_b > thresholds[1])
    norm = torch.where(some, torch.sqrt(in_a * in_b), torch.ones_like(in_a))
    values = torch.where(some, cross / norm, torch.zeros_like(cross)).clamp(-1.0, 1.0)
    return torch.where(counts > 0, values, torch.full_like(values, math.nan)), counts


def _frequencies(n_shells: int, voxel_size_angstrom: float, device) -> torch.Tensor:
    shells = torch.arange(1, n_shells + 1, dtype=torch.float64, device=device)
    return shells * (0.5 / n_shells) / voxel_size_angstrom


# --- correlation coefficients -----------------------------------------------------------


def correlation_coefficient(
    a: ArrayLike,
    b: ArrayLike,
) -> float:
    """Pearson correlation coefficient of two volumes over all voxels.

    Parameters
    ----------
    a, b : numpy.ndarray or torch.Tensor
        Volumes of identical shape, e.g. `(d, h, w)`; a reconstruction and a ground truth.
        Tensors may live on any device.

    Returns
    -------
    float
        ``CC(a, b)`` in ``[-1, 1]``, computed in float64. It is invariant to rescaling either
        volume by a positive factor and to adding a constant.

    Notes
    -----
    This is eq. (6) of the DeepDeWedge paper::

        CC(v, v*) = <v - mean(v), v* - mean(v*)> / (||v - mean(v)||_2 ||v* - mean(v*)||_2)

    It measures both denoising and missing-wedge reconstruction, as the ground truth contains
    the information the missing wedge removes.
    """
    x = _as_float64(a, "a")
    y = _as_float64(b, "b")
    if x.shape != y.shape:
        raise ValueError(
            f"a and b must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.numel() == 0:
        raise ValueError("a and b must not be empty")
    y = y.to(x.device)
    x = x - x.mean()
    y = y - y.mean()
    norm = torch.linalg.vector_norm(x) * torch.linalg.vector_norm(y)
    if not torch.isfinite(norm):
        raise ValueError("a and b must contain only finite values")
    if norm == 0:
        raise ValueError("the correlation coefficient is undefined for a constant volume")
    return float(torch.clamp((x * y).sum() / norm, -1.0, 1.0))


def _wedge_cc(
    a: ArrayLike,
    b: ArrayLike,
    *,
    mw_angle_deg: float | None,
    tilt_range_deg: tuple[float, float] | None,
    inside: bool,
) -> float:
    x, y = _pair(a, b, exact_ndim=3)
    region = _wedge_region(
        x.shape,
        mw_angle_deg=mw_angle_deg,
        tilt_range_deg=tilt_range_deg,
        inside=inside,
        device=x.device,
    )
    where = "inside" if inside else "outside"
    if region.sum() - region[0, 0, 0] == 0:
        raise ValueError(
            f"no Fourier coefficient of a {tuple(x.shape)} volume lies {where} this missing "
            f"wedge (mw_angle_deg={mw_angle_deg}, tilt_range_deg={tilt_range_deg})"
        )
    hermitian = _hermitian_weights(x.shape, x.device)
    value = _region_cc(_spectrum(x), _spectrum(y), hermitian, region)
    if math.isnan(value):
        raise ValueError(
            f"the correlation coefficient {where} the missing wedge is undefined: a or b has no "
            f"power {where} it (apart from its mean)"
        )
    return value


def cc_outside_wedge(
    a: ArrayLike,
    b: ArrayLike,
    *,
    mw_angle_deg: float | None = None,
    tilt_range_deg: tuple[float, float] | None = None,
) -> float:
    """Correlation coefficient of two volumes restricted to the measured Fourier region.

    Parameters
    ----------
    a, b : numpy.ndarray or torch.Tensor
        Volumes of identical shape `(d, h, w)`, e.g. a reconstruction and its ground truth.
    mw_angle_deg : float, optional
        Full opening angle of the missing wedge around kz (symmetric tilt range).
    tilt_range_deg : tuple of float, optional
        ``(min, max)`` tilt angles instead of `mw_angle_deg`, for asymmetric ranges.
        Give exactly one of the two.

    Returns
    -------
    float
        The coefficient in ``[-1, 1]``, computed in float64. Invariant to positive rescaling
        and to adding a constant to either volume.

    Raises
    ------
    ValueError
        If the shapes differ, the region is empty, or either volume has no power in it (less
        than 1e-10 of its power without the mean).

    Notes
    -----
    With ``A``, ``B`` the Fourier transforms of `a` and `b` and ``M`` the region of Fourier
    space that a tilt series over the tilt range measures
    (:func:`deepdewedge.fourier.missing_wedge_mask`)::

        CC_out(a, b) = Σ_{k ∈ M, k ≠ 0} Re(A(k) B(k)*) / sqrt(Σ_{k ∈ M, k ≠ 0} |A(k)|²
                                                          · Σ_{k ∈ M, k ≠ 0} |B(k)|²)

    By Parseval's theorem this equals eq. (6) of the DeepDeWedge paper applied to both volumes
    after a missing-wedge filter (multiplication of their spectra by ``M``): leaving out the
    zero frequency is the subtraction of the means. The paper (section 2.2.3) calls it the
    *CC outside the missing wedge*; as the filter removes what a method adds inside the wedge,
    it measures denoising alone, and lets a method that fills the wedge be compared with one
    that does not (noise2noise-only).
    """
    return _wedge_cc(a, b, mw_angle_deg=mw_angle_deg, tilt_range_deg=tilt_range_deg, inside=False)


def cc_inside_wedge(
    a: ArrayLike,
    b: ArrayLike,
    *,
    mw_angle_deg: float | None = None,
    tilt_range_deg: tuple[float, float] | None = None,
) -> float:
    """Correlation coefficient of two volumes restricted to the missing wedge in Fourier space.

    Parameters
    ----------
    a, b : numpy.ndarray or torch.Tensor
        Volumes of identical shape `(d, h, w)`, e.g. a reconstruction and its ground truth.
    mw_angle_deg : float, optional
        Full opening angle of the missing wedge around kz (symmetric tilt range).
    tilt_range_deg : tuple of float, optional
        ``(min, max)`` tilt angles instead of `mw_angle_deg`, for asymmetric ranges.
        Give exactly one of the two.

    Returns
    -------
    float
        The coefficient in ``[-1, 1]``, computed in float64. Invariant to positive rescaling
        and to adding a constant to either volume.

    Raises
    ------
    ValueError
        If the shapes differ, the wedge is empty (``mw_angle_deg=0``), or either volume has no
        power inside the wedge (less than 1e-10 of its power without the mean), as a
        missing-wedge-filtered volume: there the coefficient is undefined.

    Notes
    -----
    The same sum as :func:`cc_outside_wedge`, over the complementary region ``1 - M`` (the
    zero frequency is measured, so it is never inside). It equals eq. (6) of the DeepDeWedge
    paper applied to both volumes after keeping only their missing wedges, and measures how
    well a method filled in the missing wedge (the paper's section 2.2.3 reports the
    FSC-based counterpart, the *0.143-FSC inside the missing wedge*). Without any filling it
    is near 0.
    """
    return _wedge_cc(a, b, mw_angle_deg=mw_angle_deg, tilt_range_deg=tilt_range_deg, inside=True)


# --- Fourier shell correlation ----------------------------------------------------------


def fsc(
    a: ArrayLike,
    b: ArrayLike,
    *,
    voxel_size_angstrom: float = 1.0,
    mask: ArrayLike | None = None,
    n_shells: int | None = None,
) -> FSCCurve:
    """Fourier shell correlation of two volumes.

    Parameters
    ----------
    a, b : numpy.ndarray or torch.Tensor
        Volumes of identical shape `(..., d, h, w)`; leading dimensions are a batch and give
        one curve each.
    voxel_size_angstrom : float
        Voxel size in Å, for the frequencies.
    mask : numpy.ndarray or torch.Tensor, optional
        Region of Fourier space to correlate, in unshifted rfft layout `(d, h, w // 2 + 1)`
        (e.g. ``1 - missing_wedge_mask(shape, mw_angle_deg=60)`` for inside the missing
        wedge): boolean, or non-negative weights. Default: all of Fourier space.
    n_shells : int, optional
        Number of shells between 0 and the Nyquist frequency. Default ``min(d, h, w) // 2``,
        one voxel of the shortest axis per shell.

    Returns
    -------
    FSCCurve
        Shell frequencies `(n_shells,)` in 1/Å, FSC values `(..., n_shells)` and the number of
        full-spectrum coefficients per shell `(n_shells,)`, all float64.

    Notes
    -----
    For shell ``S_i`` (the frequencies ``k`` with ``|k|`` nearest to its centre
    ``f_i = i / (2 n_shells)`` cycles per voxel, ``i = 1 … n_shells``; the zero frequency is
    in no shell)::

        FSC_i = Σ_{k ∈ S_i} m(k) Re(A(k) B(k)*)
                / sqrt(Σ_{k ∈ S_i} m(k) |A(k)|² · Σ_{k ∈ S_i} m(k) |B(k)|²)

    with ``m`` the region mask. Frequencies are physical (``fftfreq`` per axis), so shells are
    spheres for any box shape; for non-cubic volumes the shells are one voxel of the shortest
    axis wide. The FSC of a shell is invariant to scaling either volume by a positive factor,
    and, without the zero frequency, to adding a constant. A shell in which either volume has
    no power (less than 1e-10 of that volume's mean power per coefficient, as float32
    round-off leaves behind a filter) gets FSC 0: nothing there correlates. A shell with no
    coefficient in the region gets NaN. The rfft holds half of a Hermitian spectrum; every
    stored coefficient counts for itself and its unstored conjugate twin, so the sums equal
    those over the full spectrum.
    """
    x, y = _pair(a, b, min_ndim=3)
    voxel = _positive(voxel_size_angstrom, "voxel_size_angstrom")
    shape = tuple(x.shape[-3:])
    shells_n = _check_n_shells(n_shells, shape)
    hermitian = _hermitian_weights(shape, x.device)
    region = None if mask is None else _check_fourier_mask(mask, shape, x.device)
    shells = _shell_index(shape, shells_n, x.device)
    values, counts = _fsc_curves(_spectrum(x), _spectrum(y), hermitian, region, shells, shells_n)
    return FSCCurve(_frequencies(shells_n, voxel, x.device), values, counts)


def _as_1d_cpu(values: ArrayLike | Sequence[float], name: str) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return _as_float64(values, name).cpu()
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of numbers, got {values!r}") from None
    return torch.from_numpy(array)


def resolution_at(
    fsc_values: ArrayLike | Sequence[float],
    frequencies_per_angstrom: ArrayLike | Sequence[float],
    threshold: float,
) -> float:
    """Resolution in Å at which an FSC curve first drops below a threshold.

    Parameters
    ----------
    fsc_values : array-like
        `(n_shells,)` FSC of each shell, e.g. ``FSCCurve.fsc``. NaN shells are skipped.
    frequencies_per_angstrom : array-like
        `(n_shells,)` positive, increasing shell frequencies in 1/Å.
    threshold : float
        FSC threshold in ``(-1, 1)``: 0.143 for a reconstruction against a ground truth,
        0.5 for a stricter criterion.

    Returns
    -------
    float
        ``1 / f`` in Å, where ``f`` is the frequency at which the curve crosses `threshold`
        between the last shell at or above it and the first shell below it, interpolated
        linearly in frequency. If the first shell is already below, the resolution of the
        first shell; if the curve never drops below, the resolution of the last shell — the
        Nyquist resolution ``2 * voxel_size_angstrom`` for curves from :func:`fsc`.

    Raises
    ------
    ValueError
        If the inputs disagree in length, the frequencies are not positive and increasing,
        the threshold is outside ``(-1, 1)``, or every shell is NaN.
    """
    values = _as_1d_cpu(fsc_values, "fsc_values")
    freqs = _as_1d_cpu(frequencies_per_angstrom, "frequencies_per_angstrom")
    if values.ndim != 1 or values.shape != freqs.shape:
        raise ValueError(
            "fsc_values and frequencies_per_angstrom must be 1D of equal length, got shapes "
            f"{tuple(values.shape)} and {tuple(freqs.shape)}"
        )
    if not isinstance(threshold, numbers.Real) or not -1.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie in (-1, 1), got {threshold!r}")
    if not torch.isfinite(freqs).all() or (freqs <= 0).any() or (freqs.diff() <= 0).any():
        raise ValueError("frequencies_per_angstrom must be positive and increasing")
    defined = ~torch.isnan(values)
    if not defined.any():
        raise ValueError("the FSC curve has no defined shell (all NaN)")
    values, freqs = values[defined], freqs[defined]
    below = torch.nonzero(values < threshold).flatten()
    if below.numel() == 0:
        return float(1.0 / freqs[-1])
    i = int(below[0])
    if i == 0:
        return float(1.0 / freqs[0])
    f0, f1 = freqs[i - 1], freqs[i]
    v0, v1 = values[i - 1], values[i]
    crossing = f0 + (v0 - threshold) / (v0 - v1) * (f1 - f0)
    return float(1.0 / crossing)


# --- particles --------------------------------------------------------------------------


def soft_sphere_mask(
    box_size_px: int,
    *,
    radius_px: float | None = None,
    edge_px: float | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Spherical mask with a raised-cosine edge, centred on voxel ``box_size_px // 2``.

    Parameters
    ----------
    box_size_px : int
        Edge of the cubic box in voxels.
    radius_px : float, optional
        Radius of the flat top (value 1). Default ``box_size_px / 2 - edge_px``.
    edge_px : float, optional
        Width of the cosine fall-off from 1 to 0. Default ``max(1, box_size_px / 8)``.
    device : torch.device or str, optional
        Device of the output.

    Returns
    -------
    torch.Tensor
        `(n, n, n)` float64 with ``n = box_size_px``, in ``[0, 1]``.
    """
    if not isinstance(box_size_px, numbers.Integral) or box_size_px < 2:
        raise ValueError(f"box_size_px must be an integer of at least 2, got {box_size_px!r}")
    n = int(box_size_px)
    edge = max(1.0, n / 8) if edge_px is None else _positive(edge_px, "edge_px")
    radius = n / 2 - edge if radius_px is None else _positive(radius_px, "radius_px")
    if radius <= 0:
        raise ValueError(
            f"the sphere of a {n}-voxel box with a {edge}-voxel edge has no flat top; give a "
            "larger box_size_px or a smaller edge_px"
        )
    coords = torch.arange(n, dtype=torch.float64, device=device) - n // 2
    r = torch.sqrt(
        coords[:, None, None] ** 2 + coords[None, :, None] ** 2 + coords[None, None] ** 2
    )
    ramp = ((r - radius) / edge).clamp(0.0, 1.0)
    return 0.5 * (1.0 + torch.cos(math.pi * ramp))


def particle_box_starts(
    centres_zyx: ArrayLike | Sequence[Sequence[float]],
    *,
    box_size_px: int,
    shape_zyx: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """First voxel of each particle's box, and whether the box lies inside the volume.

    Parameters
    ----------
    centres_zyx : array-like
        `(n, 3)` particle centres ``(z, y, x)`` in voxels (fractional values are rounded).
    box_size_px : int
        Edge of the cubic box in voxels; the centre lands on box voxel ``box_size_px // 2``.
    shape_zyx : sequence of int
        Shape `(d, h, w)` of the volume.

    Returns
    -------
    tuple of torch.Tensor
        `(n, 3)` long start indices and `(n,)` bool, True where the whole box is inside.
    """
    centres = torch.as_tensor(np.asarray(centres_zyx, dtype=np.float64))
    if centres.ndim != 2 or centres.shape[1] != 3:
        raise ValueError(f"centres_zyx must have shape (n, 3), got {tuple(centres.shape)}")
    if not torch.isfinite(centres).all():
        raise ValueError("centres_zyx must contain only finite values")
    if not isinstance(box_size_px, numbers.Integral) or box_size_px < 2:
        raise ValueError(f"box_size_px must be an integer of at least 2, got {box_size_px!r}")
    shape = torch.as_tensor(list(shape_zyx), dtype=torch.long)
    if box_size_px > int(shape.min()):
        raise ValueError(
            f"box_size_px={box_size_px} is larger than the volume of shape {tuple(shape_zyx)}"
        )
    starts = torch.floor(centres + 0.5).to(torch.long) - box_size_px // 2
    inside = ((starts >= 0) & (starts + box_size_px <= shape)).all(dim=1)
    return starts, inside


def _wedge_only(volume: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """`(d, h, w)` volume reduced to its missing wedge; zeros if it holds no power there."""
    spectrum = _spectrum(volume)
    hermitian = _hermitian_weights(volume.shape, volume.device)
    power = hermitian * spectrum.abs().square()
    total = power.sum() - power[0, 0, 0]
    if (inside * power).sum() <= _NEGLIGIBLE_POWER * total:
        return torch.zeros_like(volume)
    return torch.fft.irfftn(spectrum * inside, s=volume.shape, dim=(-3, -2, -1))


def _extract_boxes(volume: torch.Tensor, starts: torch.Tensor, box: int) -> torch.Tensor:
    """`(m, box, box, box)` boxes of `volume` starting at `(m, 3)` `starts`."""
    offsets = torch.arange(box, device=volume.device)
    z = (starts[:, 0, None] + offsets)[:, :, None, None]
    y = (starts[:, 1, None] + offsets)[:, None, :, None]
    x = (starts[:, 2, None] + offsets)[:, None, None, :]
    return volume[z, y, x]


def particle_fsc(
    volume: ArrayLike,
    ground_truth: ArrayLike,
    centres_zyx: ArrayLike | Sequence[Sequence[float]],
    *,
    box_size_px: int,
    voxel_size_angstrom: float = 1.0,
    mw_angle_deg: float | None = None,
    tilt_range_deg: tuple[float, float] | None = None,
    mask_radius_px: float | None = None,
    mask_edge_px: float | None = None,
    n_shells: int | None = None,
) -> ParticleFSC:
    """Mean FSC of particles cut out of a volume against the same particles in a ground truth.

    Parameters
    ----------
    volume, ground_truth : numpy.ndarray or torch.Tensor
        Volumes of identical shape `(d, h, w)`.
    centres_zyx : array-like
        `(n, 3)` particle centres ``(z, y, x)`` in voxels.
    box_size_px : int
        Edge of the cubic box cut out around each particle.
    voxel_size_angstrom : float
        Voxel size in Å.
    mw_angle_deg, tilt_range_deg : optional
        The missing wedge, as in :func:`cc_inside_wedge`; given, the FSC inside the missing
        wedge is computed too.
    mask_radius_px, mask_edge_px : float, optional
        The soft spherical mask applied to every box (see :func:`soft_sphere_mask`).
    n_shells : int, optional
        Shells up to Nyquist; default ``box_size_px // 2``.

    Returns
    -------
    ParticleFSC
        Mean curves over the particles whose box lies inside the volume, and the counts.

    Raises
    ------
    ValueError
        If the box is larger than the volume or no particle's box lies inside it.

    Notes
    -----
    Boxes that leave the volume are skipped, not padded: padding would correlate the padding.
    Each box has its mean under the mask subtracted and is multiplied by the soft spherical
    mask, in both volumes, so that neighbours and the box edges do not enter the FSC. Where
    density crosses the mask's edge, the edge adds high-frequency content common to both
    volumes, which raises the FSC of volumes poor in high frequencies; choose a box that
    leaves the particle well inside the flat top of the mask.

    The FSC inside the missing wedge compares only the missing-wedge data of the two volumes
    (the paper's *0.143-FSC inside the missing wedge*): both whole volumes are first reduced
    to their missing wedge (their spectra multiplied by ``1 - M``), then the boxes are cut
    out, masked, and correlated over the wedge region of the box's spectrum. The wedge is
    fixed in the tomogram's frame, so one region serves every box. Filtering the whole
    volumes first matters: the soft mask is a convolution in Fourier space, and on unfiltered
    boxes it would carry measured data, common to both volumes, into the wedge region.

    The paper (section 2.2.3) reports the average over particles of the 0.143-FSC resolution;
    here the per-particle curves are averaged shell by shell and the resolutions are read off
    the mean curve (:func:`resolution_at`), which stays defined when single particles' curves
    never cross the threshold.
    """
    vol, gt = _pair(volume, ground_truth, exact_ndim=3)
    voxel = _positive(voxel_size_angstrom, "voxel_size_angstrom")
    starts, inside = particle_box_starts(
        centres_zyx, box_size_px=box_size_px, shape_zyx=tuple(vol.shape)
    )
    n_total = int(inside.numel())
    if not inside.any():
        raise ValueError(
            f"none of the {n_total} particles has its {box_size_px}-voxel box inside the volume "
            f"of shape {tuple(vol.shape)}"
        )
    starts = starts[inside].to(vol.device)
    box = int(box_size_px)
    box_shape = (box, box, box)
    shells_n = _check_n_shells(n_shells, box_shape)
    sphere = soft_sphere_mask(
        box, radius_px=mask_radius_px, edge_px=mask_edge_px, device=vol.device
    )
    shells = _shell_index(box_shape, shells_n, vol.device)
    hermitian = _hermitian_weights(box_shape, vol.device)
    regions: dict[str, torch.Tensor | None] = {"overall": None}
    if mw_angle_deg is not None or tilt_range_deg is not None:
        wedge = _wedge_region(
            box_shape,
            mw_angle_deg=mw_angle_deg,
            tilt_range_deg=tilt_range_deg,
            inside=True,
            device=vol.device,
        )
        regions["inside_wedge"] = wedge
    sources = {"overall": (vol, gt)}
    if "inside_wedge" in regions:
        inside = _wedge_region(
            tuple(vol.shape),
            mw_angle_deg=mw_angle_deg,
            tilt_range_deg=tilt_range_deg,
            inside=True,
            device=vol.device,
        )
        sources["inside_wedge"] = tuple(_wedge_only(v, inside) for v in (vol, gt))
    counts: dict[str, torch.Tensor] = {}
    totals = {name: torch.zeros(shells_n, dtype=torch.float64) for name in regions}
    defined = {name: torch.zeros(shells_n, dtype=torch.float64) for name in regions}
    for chunk in torch.split(starts, max(1, _CHUNK_VOXELS // box**3)):
        for name, region in regions.items():
            spectra = []
            for source in sources[name]:
                boxes = _extract_boxes(source, chunk, box)
                mean = (boxes * sphere).sum(dim=(-3, -2, -1), keepdim=True) / sphere.sum()
                spectra.append(_spectrum((boxes - mean) * sphere))
            curves, counts[name] = _fsc_curves(*spectra, hermitian, region, shells, shells_n)
            curves = curves.cpu()
            ok = ~torch.isnan(curves)
            totals[name] += torch.where(ok, curves, torch.zeros_like(curves)).sum(dim=0)
            defined[name] += ok.sum(dim=0)
    frequencies = _frequencies(shells_n, voxel, "cpu")
    mean_curves = {
        name: FSCCurve(
            frequencies,
            torch.where(defined[name] > 0, totals[name] / defined[name].clamp(min=1), math.nan),
            counts[name].cpu(),
        )
        for name in regions
    }
    n_used = int(starts.shape[0])
    return ParticleFSC(
        overall=mean_curves["overall"],
        inside_wedge=mean_curves.get("inside_wedge"),
        n_particles=n_used,
        n_skipped=n_total - n_used,
    )


# --- everything at once -----------------------------------------------------------------


def _resolution_or_nan(curve: FSCCurve, threshold: float) -> float:
    try:
        return resolution_at(curve.fsc, curve.frequencies_per_angstrom, threshold)
    except ValueError:
        return math.nan


def _whole_volume_metrics(
    vol: torch.Tensor,
    gt: torch.Tensor,
    voxel: float,
    wedge: dict[str, Any],
    n_shells: int | None,
) -> tuple[dict[str, float | int], dict[str, FSCCurve]]:
    """CCs and FSC curves of whole volumes (their spectra are freed on return)."""
    shape = tuple(vol.shape)
    spec_v, spec_gt = _spectrum(vol), _spectrum(gt)
    hermitian = _hermitian_weights(shape, vol.device)
    measured = _wedge_region(shape, inside=False, device=vol.device, **wedge)
    metrics: dict[str, float | int] = {
        "cc": _region_cc(spec_v, spec_gt, hermitian, torch.ones_like(measured)),
        "cc_outside_wedge": _region_cc(spec_v, spec_gt, hermitian, measured),
        "cc_inside_wedge": _region_cc(spec_v, spec_gt, hermitian, 1.0 - measured),
    }
    shells_n = _check_n_shells(n_shells, shape)
    shells = _shell_index(shape, shells_n, vol.device)
    frequencies = _frequencies(shells_n, voxel, "cpu")
    curves: dict[str, FSCCurve] = {}
    for name, region in (("fsc", None), ("fsc_inside_wedge", 1.0 - measured)):
        values, counts = _fsc_curves(spec_v, spec_gt, hermitian, region, shells, shells_n)
        curves[name] = FSCCurve(frequencies, values.cpu(), counts.cpu())
    return metrics, curves


def evaluate_volume(
    volume: ArrayLike,
    ground_truth: ArrayLike,
    *,
    voxel_size_angstrom: float,
    mw_angle_deg: float | None = None,
    tilt_range_deg: tuple[float, float] | None = None,
    particles_zyx: ArrayLike | Sequence[Sequence[float]] | None = None,
    box_size_px: int | None = None,
    n_shells: int | None = None,
) -> Evaluation:
    """All metrics of a reconstruction against its ground truth.

    Parameters
    ----------
    volume, ground_truth : numpy.ndarray or torch.Tensor
        Volumes of identical shape `(d, h, w)`.
    voxel_size_angstrom : float
        Voxel size in Å.
    mw_angle_deg, tilt_range_deg : optional
        The missing wedge of the tilt series, as in :func:`cc_outside_wedge`; give one.
    particles_zyx : array-like, optional
        `(n, 3)` particle centres ``(z, y, x)`` in voxels for the per-particle FSC.
    box_size_px : int, optional
        Box edge for the per-particle FSC; required with `particles_zyx`.
    n_shells : int, optional
        Shells of the whole-volume FSC; default ``min(d, h, w) // 2``.

    Returns
    -------
    Evaluation
        ``metrics`` with keys ``cc``, ``cc_outside_wedge``, ``cc_inside_wedge``,
        ``fsc_0143_angstrom``, ``fsc_05_angstrom``, ``fsc_inside_wedge_0143_angstrom``,
        ``fsc_inside_wedge_05_angstrom``, and with particles also
        ``particle_fsc_0143_angstrom``, ``particle_fsc_05_angstrom``,
        ``particle_fsc_inside_wedge_0143_angstrom``, ``particle_fsc_inside_wedge_05_angstrom``,
        ``n_particles`` (used) and ``n_particles_skipped``; and ``curves``, the FSC curves.
        Resolutions are in Å (lower is better); a metric that is undefined for these volumes
        (e.g. the CC inside the wedge of a volume with nothing there) is NaN.
    """
    vol, gt = _pair(volume, ground_truth, exact_ndim=3)
    voxel = _positive(voxel_size_angstrom, "voxel_size_angstrom")
    if mw_angle_deg is None and tilt_range_deg is None:
        raise ValueError("give the missing wedge: mw_angle_deg or tilt_range_deg")
    if particles_zyx is not None and box_size_px is None:
        raise ValueError("box_size_px is required with particles_zyx")
    wedge = {"mw_angle_deg": mw_angle_deg, "tilt_range_deg": tilt_range_deg}
    if particles_zyx is not None:  # fail before the work, not after it
        _, inside = particle_box_starts(
            particles_zyx, box_size_px=box_size_px, shape_zyx=tuple(vol.shape)
        )
        if not inside.any():
            raise ValueError(
                f"none of the {inside.numel()} particles has its {box_size_px}-voxel box "
                f"inside the volume of shape {tuple(vol.shape)}"
            )
    metrics, curves = _whole_volume_metrics(vol, gt, voxel, wedge, n_shells)
    if particles_zyx is not None:
        particles = particle_fsc(
            vol,
            gt,
            particles_zyx,
            box_size_px=int(box_size_px),
            voxel_size_angstrom=voxel,
            **wedge,
        )
        curves["particle_fsc"] = particles.overall
        if particles.inside_wedge is not None:
            curves["particle_fsc_inside_wedge"] = particles.inside_wedge
    for name, curve in curves.items():
        metrics[f"{name}_0143_angstrom"] = _resolution_or_nan(curve, 0.143)
        metrics[f"{name}_05_angstrom"] = _resolution_or_nan(curve, 0.5)
    if particles_zyx is not None:
        metrics["n_particles"] = particles.n_particles
        metrics["n_particles_skipped"] = particles.n_skipped
    for name in ("cc", "cc_outside_wedge", "cc_inside_wedge"):
        if math.isnan(metrics[name]):
            log.warning("%s is undefined: a volume has no power in that region", name)
    return Evaluation(metrics, curves)
