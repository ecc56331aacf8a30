"""Imaging a simulated sample: tilt schemes, the CTF, noise and dose-fractionated frames.

Geometry as in :mod:`deepdewedge.reconstruct.backproject`: the tilt axis is y, and a tilt by
``θ`` images the voxel at centred ``(z, y, x)`` at detector ``x' = x cos θ + z sin θ``.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from deepdewedge.io.tilts import acquisition_order_from_angles
from deepdewedge.reconstruct.ctf import ctf_2d, electron_wavelength_angstrom

__all__ = [
    "acquisition_positions",
    "apply_ctf",
    "ctf_margin_px",
    "simulate_frames",
    "tilt_angles",
]

# Upper bound on the number of complex elements of the spectra held at once by apply_ctf.
_MAX_BUFFER_ELEMENTS = 2**24


def _finite(name: str, value) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def tilt_angles(min_deg: float, max_deg: float, step_deg: float) -> torch.Tensor:
    """Tilt angles of a scheme, ascending: ``min_deg, min_deg + step_deg, ...`` up to ``max_deg``.

    Parameters
    ----------
    min_deg, max_deg : float
        Smallest and largest angle in degrees, ``-90 < min_deg < max_deg < 90``.
    step_deg : float
        Increment in degrees, positive; the last angle is the largest that does not exceed
        ``max_deg`` (up to a rounding tolerance of 1e-6°).

    Returns
    -------
    torch.Tensor
        `(n,)` float64 angles, ``n >= 2``.
    """
    lo, hi = _finite("min_deg", min_deg), _finite("max_deg", max_deg)
    step = _finite("step_deg", step_deg)
    if not -90.0 < lo < hi < 90.0:
        raise ValueError(f"tilt angles must satisfy -90 < min < max < 90, got {lo:g} and {hi:g}")
    if step <= 0:
        raise ValueError(f"step_deg must be positive, got {step:g}")
    n = int(math.floor((hi - lo) / step + 1e-6)) + 1
    if n < 2:
        raise ValueError(f"a step of {step:g}° from {lo:g}° to {hi:g}° gives fewer than 2 tilts")
    return lo + step * torch.arange(n, dtype=torch.float64)


def acquisition_positions(tilt_angles_deg: torch.Tensor, *, scheme: str) -> torch.Tensor:
    """Position of each tilt in the acquisition sequence.

    Parameters
    ----------
    tilt_angles_deg : torch.Tensor
        `(n,)` angles in stack order.
    scheme : {"sequential", "dose-symmetric"}
        ``"sequential"`` starts at the most negative angle and goes up; ``"dose-symmetric"``
        is the Hagen scheme starting at the tilt nearest 0°, in groups of two, positive side
        first (:func:`deepdewedge.io.tilts.acquisition_order_from_angles`).

    Returns
    -------
    torch.Tensor
        `(n,)` int64 permutation of ``0 .. n - 1``: entry ``i`` is when tilt ``i`` was taken
        (0 = first), the convention of :attr:`deepdewedge.io.tilts.MdocTilts.acquisition_order`.
    """
    angles = np.asarray(torch.as_tensor(tilt_angles_deg).detach().cpu(), dtype=np.float64)
    return torch.from_numpy(acquisition_order_from_angles(angles, scheme=scheme))  # type: ignore[arg-type]


def ctf_margin_px(
    *, pixel_size_angstrom: float, defocus_um: float, voltage_kv: float = 300.0
) -> int:
    """Detector columns to simulate beyond each image edge so the CTF does not wrap around.

    The CTF delocalises a feature's frequency ``k`` by ``λ Δf k``; at the Nyquist frequency
    that is ``λ Δf / (2 p)`` pixels for a pixel size ``p``. The margin is twice that, plus 8.
    """
    wavelength = electron_wavelength_angstrom(voltage_kv)
    spread = wavelength * abs(defocus_um) * 1e4 / (2.0 * pixel_size_angstrom**2)
    return int(math.ceil(2.0 * spread)) + 8


def apply_ctf(
    tilt_series: torch.Tensor,
    tilt_angles_deg: torch.Tensor,
    *,
    pixel_size_angstrom: float,
    defocus_um: float | torch.Tensor,
    voltage_kv: float = 300.0,
    spherical_aberration_mm: float = 2.7,
    amplitude_contrast: float = 0.07,
    defocus_gradient: bool = True,
    defocus_tolerance_nm: float | None = None,
) -> torch.Tensor:
    """Filter projections by the microscope's CTF, with the defocus of the tilted field.

    Parameters
    ----------
    tilt_series : torch.Tensor
        Projections of the sample's density, shape `(n, h, w)`, tilt axis along y through the
        image centre.
    tilt_angles_deg : torch.Tensor
        `(n,)` angles in degrees.
    pixel_size_angstrom : float
        Pixel size in Å.
    defocus_um : float or torch.Tensor
        Defocus at the tilt axis in µm, positive for underfocus; one value or `(n,)`.
    voltage_kv, spherical_aberration_mm, amplitude_contrast : float
        Microscope parameters, as in :func:`deepdewedge.reconstruct.ctf.ctf_2d`.
    defocus_gradient : bool
        If True, a tilted image is filtered in strips parallel to the tilt axis, each with the
        defocus of the sample's mid-plane under it: ``Δf + x' tan θ · pixel_size`` at detector
        column ``x'`` (pixels from the axis), the convention that
        :func:`deepdewedge.reconstruct.ctf.phase_flip_tilt_series` corrects with its default
        ``defocus_handedness=1``. If False, the whole image gets the defocus at the axis.
    defocus_tolerance_nm : float, optional
        Largest defocus change across one strip, in nm. By default the change that moves the
        CTF's phase at the Nyquist frequency by 0.2 rad (``Δχ = π λ ΔΔf k²``), so that no
        frequency is more than 0.1 rad off within a strip: about 130 nm for 10 Å pixels at
        300 kV, 5 nm for 2 Å pixels.

    Returns
    -------
    torch.Tensor
        `(n, h, w)` images ``-CTF ⊛ projection`` (``CTF`` as in
        :func:`~deepdewedge.reconstruct.ctf.ctf_2d`): contrast-inverted micrographs, so matter
        stays bright as in the projections, and the zero frequency keeps the fraction
        ``amplitude_contrast`` of the projected density.

    Notes
    -----
    The filter is applied in Fourier space, which treats each image as periodic: simulate the
    projections :func:`ctf_margin_px` pixels wider on each side and crop afterwards. The
    defocus change through the depth of the sample (``±`` half the ice thickness) is not
    modelled.
    """
    if tilt_series.ndim != 3:
        raise ValueError(f"tilt_series must have shape (n, h, w), got {tuple(tilt_series.shape)}")
    n, h, w = tilt_series.shape
    angles = torch.as_tensor(tilt_angles_deg).detach().to("cpu", torch.float64).reshape(-1)
    if angles.numel() != n:
        raise ValueError(f"tilt_angles_deg has {angles.numel()} angles for {n} images")
    defoci = torch.as_tensor(defocus_um, dtype=torch.float64).reshape(-1).expand(n)
    if not torch.isfinite(defoci).all():
        raise ValueError("defocus_um must be finite")
    pixel = _finite("pixel_size_angstrom", pixel_size_angstrom)
    if pixel <= 0:
        raise ValueError(f"pixel_size_angstrom must be positive, got {pixel_size_angstrom!r}")
    if defocus_tolerance_nm is None:
        nyquist = 0.5 / pixel
        wavelength = electron_wavelength_angstrom(voltage_kv)
        tolerance_angstrom = 0.2 / (math.pi * wavelength * nyquist**2)
    else:
        tolerance_angstrom = _finite("defocus_tolerance_nm", defocus_tolerance_nm) * 10.0
        if tolerance_angstrom <= 0:
            raise ValueError("defocus_tolerance_nm must be positive")

    device = tilt_series.device
    images = tilt_series.to(torch.float32)
    x_det = torch.arange(w, dtype=torch.float64) - (w - 1) / 2
    out = torch.empty_like(images)
    per_chunk = max(1, _MAX_BUFFER_ELEMENTS // (h * (w // 2 + 1)))
    for i in range(n):
        tan_theta = math.tan(math.radians(float(angles[i])))
        if defocus_gradient and tan_theta != 0.0:
            strip = max(1, math.floor(tolerance_angstrom / (pixel * abs(tan_theta))))
        else:
            strip = w
        # Strips of `strip` columns, one centred on the tilt axis.
        labels = torch.floor(x_det / strip + 0.5).long()
        labels -= labels[0].clone()
        n_strips = int(labels[-1]) + 1
        centres = torch.zeros(n_strips, dtype=torch.float64).index_add_(0, labels, x_det)
        centres /= torch.bincount(labels, minlength=n_strips)
        gradient = tan_theta * pixel * 1e-4 if defocus_gradient else 0.0
        strip_defocus = float(defoci[i]) + centres * gradient  # µm
        spectrum = torch.fft.rfft2(images[i])
        for start in range(0, n_strips, per_chunk):
            stop = min(n_strips, start + per_chunk)
            ctf = ctf_2d(
                (h, w),
                pixel_size_angstrom=pixel,
                defocus_um=strip_defocus[start:stop].to(torch.float32),
                voltage_kv=voltage_kv,
                spherical_aberration_mm=spherical_aberration_mm,
                amplitude_contrast=amplitude_contrast,
                device=device,
            )
            filtered = torch.fft.irfft2(spectrum * -ctf, s=(h, w))  # (stop - start, h, w)
            keep = (labels >= start) & (labels < stop)
            columns = torch.nonzero(keep).reshape(-1).to(device)
            rows = (labels[keep] - start).to(device)
            out[i][:, columns] = filtered[rows, :, columns].transpose(0, 1)
    return out.to(tilt_series.dtype if tilt_series.is_floating_point() else torch.float32)


def simulate_frames(
    tilt_series: torch.Tensor,
    *,
    n_frames: int,
    snr: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Split noise-free images into dose-fractionated noisy frames.

    Parameters
    ----------
    tilt_series : torch.Tensor
        Noise-free images, shape `(n, h, w)`.
    n_frames : int
        Frames per image, at least 2.
    snr : float
        Signal-to-noise ratio of the *sum* of the frames, defined as in
        :func:`~deepdewedge.simulate.phantom.add_noise`: ``var(signal) / var(noise)`` with
        the variances taken over the whole tilt series (population variances).
    generator : torch.Generator
        Source of the noise.

    Returns
    -------
    torch.Tensor
        `(n, n_frames, h, w)` frames: each holds ``1 / n_frames`` of the image plus independent
        Gaussian noise of variance ``var(tilt_series) / (snr n_frames)``, so the frames of an
        image sum to the image plus noise at the requested SNR, and the sums of the even and
        of the odd frames have independent noise.
    """
    if not isinstance(n_frames, numbers.Integral) or isinstance(n_frames, bool) or n_frames < 2:
        raise ValueError(f"n_frames must be an integer of at least 2, got {n_frames!r}")
    if tilt_series.ndim != 3:
        raise ValueError(f"tilt_series must have shape (n, h, w), got {tuple(tilt_series.shape)}")
    if (
        not isinstance(snr, numbers.Real)
        or isinstance(snr, bool)
        or not (math.isfinite(snr) and snr > 0)
    ):
        raise ValueError(f"snr must be a finite positive number, got {snr!r}")
    signal = tilt_series.to(torch.float32)
    signal_var = float(signal.to(torch.float64).var(correction=0))
    if signal_var == 0.0:
        raise ValueError("tilt_series is constant, so its SNR is undefined")
    n_frames = int(n_frames)
    noise = torch.randn(
        (signal.shape[0], n_frames, *signal.shape[1:]),
        generator=generator,
        device=generator.device,
        dtype=torch.float32,
    ).to(signal.device)
    return signal[:, None] / n_frames + noise * math.sqrt(signal_var / (snr * n_frames))
