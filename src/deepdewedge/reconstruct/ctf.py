"""Contrast transfer function (CTF) of the microscope, phase flipping and Wiener deconvolution.

Sign convention (the physical one, as in CTFFIND4): defocus is positive for underfocus and

    CTF(k) = -sin(χ(k)),   χ(k) = π λ Δf k² - (π/2) Cs λ³ k⁴ + arcsin(A) + φ,

with ``k`` the spatial frequency in 1/Å, ``λ`` the relativistic electron wavelength, ``Δf`` the
defocus, ``Cs`` the spherical aberration, ``A`` the amplitude contrast and ``φ`` an extra
phase shift (phase plate). The CTF is ``-A`` at ``k = 0`` and negative up to its first zero in
underfocus: a positive projected potential (protein) is recorded dark on a bright background,
as in raw micrographs. RELION, Warp and teamtomo ``torch-ctf`` use the opposite overall sign.

The corrections below keep the polarity of the recorded data. Phase flipping multiplies every
frequency by ``-sign(CTF)``, which leaves the frequencies inside the first zero untouched and
flips the others (like IMOD ``ctfphaseflip``); the Wiener filter uses ``-CTF`` (like Warp's
``tom_deconv`` and IsoNet's ``deconv``). Corrected data therefore still show dark protein.

Tilt geometry (shared with :mod:`deepdewedge.reconstruct.backproject`): the tilt axis is y, and
a tilt by ``θ`` images the voxel at centred ``(z, y, x)`` at detector ``x' = x cos θ + z sin θ``.
"""

from __future__ import annotations

import math
import numbers

import torch

from deepdewedge.fourier import frequency_grid

__all__ = [
    "electron_wavelength_angstrom",
    "ctf_1d",
    "ctf_2d",
    "phase_flip_tilt_series",
    "wiener_filter",
    "wiener_deconvolve_volume",
]

# Planck constant times the speed of light (eV Å) and the electron rest energy (eV), CODATA 2018.
_HC_EV_ANGSTROM = 12398.419843320026
_ELECTRON_REST_ENERGY_EV = 510998.95000
# Upper bound on the number of complex elements of the per-chunk spectra in phase flipping.
_MAX_BUFFER_ELEMENTS = 2**24


def _is_int(value) -> bool:
    """Whether ``value`` is an integer (Python or NumPy), excluding booleans."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _real(
    name: str,
    value,
    *,
    above: float | None = None,
    at_least: float | None = None,
    at_most: float | None = None,
) -> float:
    """Validate a finite real scalar, optionally bounded; return it as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    if above is not None and not value > above:
        raise ValueError(f"{name} must be greater than {above}, got {value!r}")
    if at_least is not None and not value >= at_least:
        raise ValueError(f"{name} must be at least {at_least}, got {value!r}")
    if at_most is not None and not value <= at_most:
        raise ValueError(f"{name} must be at most {at_most}, got {value!r}")
    return float(value)


def _tensor_or_real(name: str, value) -> torch.Tensor | float:
    """Validate a finite real scalar or a finite real tensor."""
    if isinstance(value, torch.Tensor):
        if value.is_complex() or not torch.isfinite(value.detach().double()).all():
            raise ValueError(f"{name} must hold finite real values")
        return value
    return _real(name, value)


def _microscope(voltage_kv, spherical_aberration_mm, amplitude_contrast) -> tuple[float, ...]:
    """Validate the microscope constants; return ``(λ, Cs, arcsin(A))`` in Å and radians."""
    wavelength = electron_wavelength_angstrom(voltage_kv)
    cs_angstrom = _real("spherical_aberration_mm", spherical_aberration_mm, at_least=0.0) * 1e7
    amplitude = _real("amplitude_contrast", amplitude_contrast, at_least=0.0, at_most=1.0)
    return wavelength, cs_angstrom, math.asin(amplitude)


def _chi_terms(k2, *, wavelength, cs_angstrom, amplitude_phase):
    """Split ``χ = a · Δf + b`` for squared frequencies ``k2`` (1/Å²), ``Δf`` in µm.

    Returns ``a = π λ k² · 10⁴`` and ``b = -(π/2) Cs λ³ k⁴ + arcsin(A)``, shaped like ``k2``.
    """
    per_um = (math.pi * wavelength * 1e4) * k2
    rest = (-0.5 * math.pi * cs_angstrom * wavelength**3) * (k2 * k2) + amplitude_phase
    return per_um, rest


def electron_wavelength_angstrom(voltage_kv: float) -> float:
    """Relativistic wavelength of electrons accelerated through ``voltage_kv`` kilovolts.

    Parameters
    ----------
    voltage_kv : float
        Acceleration voltage in kV, positive.

    Returns
    -------
    float
        The wavelength in Å: 0.02508 at 200 kV, 0.01969 at 300 kV.

    Notes
    -----
    With the kinetic energy ``E = e U`` and the rest energy ``m c²``, relativistic momentum gives
    ``λ = h c / sqrt(E (2 m c² + E))``.
    """
    energy_ev = _real("voltage_kv", voltage_kv, above=0.0) * 1e3
    return _HC_EV_ANGSTROM / math.sqrt(energy_ev * (2.0 * _ELECTRON_REST_ENERGY_EV + energy_ev))


def ctf_1d(
    frequency_inv_angstrom: torch.Tensor,
    *,
    defocus_um: float | torch.Tensor,
    voltage_kv: float = 300.0,
    spherical_aberration_mm: float = 2.7,
    amplitude_contrast: float = 0.07,
    phase_shift_deg: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """The CTF as a function of the spatial frequency's magnitude (no astigmatism).

    Parameters
    ----------
    frequency_inv_angstrom : torch.Tensor
        Spatial frequencies ``|k|`` in 1/Å, shape `(...)`.
    defocus_um : float or torch.Tensor
        Defocus in µm, positive for underfocus; a tensor must broadcast against
        ``frequency_inv_angstrom``.
    voltage_kv : float
        Acceleration voltage in kV.
    spherical_aberration_mm : float
        Spherical aberration ``Cs`` in mm, non-negative.
    amplitude_contrast : float
        Fraction ``A`` of amplitude contrast in ``[0, 1]``, typically 0.07–0.1 for cryo samples.
    phase_shift_deg : float or torch.Tensor
        Extra phase shift in degrees, e.g. from a phase plate; broadcasts like ``defocus_um``.

    Returns
    -------
    torch.Tensor
        ``-sin(χ)``, shape `(...)` broadcast over the inputs, on the device of
        ``frequency_inv_angstrom`` and in its floating dtype (float32 for integer input).

    Notes
    -----
    ``χ = π λ Δf k² - (π/2) Cs λ³ k⁴ + arcsin(A) + φ`` (see the module docstring). The first
    term is the defocus phase, the second the spherical aberration, and ``arcsin(A)`` turns the
    weak-phase transfer ``-sin(χ)`` into ``-(√(1 - A²) sin χ + A cos χ)``, the mix of phase and
    amplitude contrast. With ``Cs = 0`` and ``A = 0`` the first zero lies at
    ``k = 1 / sqrt(λ Δf)``.
    """
    if not isinstance(frequency_inv_angstrom, torch.Tensor) or frequency_inv_angstrom.is_complex():
        raise ValueError("frequency_inv_angstrom must be a real torch.Tensor")
    wavelength, cs_angstrom, amplitude_phase = _microscope(
        voltage_kv, spherical_aberration_mm, amplitude_contrast
    )
    defocus = _tensor_or_real("defocus_um", defocus_um)
    phase = _tensor_or_real("phase_shift_deg", phase_shift_deg)
    frequency = frequency_inv_angstrom
    if not frequency.is_floating_point():
        frequency = frequency.to(torch.float32)
    if isinstance(defocus, torch.Tensor):
        defocus = defocus.to(device=frequency.device, dtype=frequency.dtype)
    if isinstance(phase, torch.Tensor):
        phase = phase.to(device=frequency.device, dtype=frequency.dtype)
    per_um, rest = _chi_terms(
        frequency * frequency,
        wavelength=wavelength,
        cs_angstrom=cs_angstrom,
        amplitude_phase=amplitude_phase,
    )
    return -torch.sin(per_um * defocus + rest + phase * (math.pi / 180.0))


def ctf_2d(
    shape_hw: tuple[int, int],
    *,
    pixel_size_angstrom: float,
    defocus_um: float | torch.Tensor,
    voltage_kv: float = 300.0,
    spherical_aberration_mm: float = 2.7,
    amplitude_contrast: float = 0.07,
    astigmatism_um: float | torch.Tensor = 0.0,
    astigmatism_angle_deg: float | torch.Tensor = 0.0,
    phase_shift_deg: float | torch.Tensor = 0.0,
    rfft: bool = True,
    fftshift: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The CTF of a micrograph on the DFT grid of an image of shape ``shape_hw``.

    Parameters
    ----------
    shape_hw : tuple of int
        Real-space image shape `(h, w)`.
    pixel_size_angstrom : float
        Pixel size in Å; the grid's Nyquist frequency is ``1 / (2 pixel_size_angstrom)``.
    defocus_um : float or torch.Tensor
        Mean defocus ``(Δf_u + Δf_v) / 2`` in µm, positive for underfocus. A tensor of shape
        `(...)` gives one CTF per element.
    voltage_kv : float
        Acceleration voltage in kV, typically 200 or 300.
    spherical_aberration_mm : float
        Spherical aberration ``Cs`` in mm, typically 2.7 (0.01 with a Cs corrector).
    amplitude_contrast : float
        Fraction of amplitude contrast in ``[0, 1]``, typically 0.07–0.1.
    astigmatism_um : float or torch.Tensor
        Difference ``Δf_u - Δf_v`` of the two principal defoci in µm; broadcasts with
        ``defocus_um``.
    astigmatism_angle_deg : float or torch.Tensor
        Angle of the ``Δf_u`` direction in degrees, measured from the kx (last, w) axis towards
        the ky (h) axis; broadcasts with ``defocus_um``.
    phase_shift_deg : float or torch.Tensor
        Extra phase shift in degrees (phase plate); broadcasts with ``defocus_um``.
    rfft : bool
        If True, the last axis holds only the ``w // 2 + 1`` frequencies ``kx >= 0``.
    fftshift : bool
        If True, the zero frequency is moved to the centre (of the ky axis only if ``rfft``).
    device : torch.device or str, optional
        Device of the output; defaults to that of a tensor argument, else the CPU.

    Returns
    -------
    torch.Tensor
        The CTF, shape `(..., h, w')` with ``w' = w // 2 + 1`` if ``rfft`` else ``w``; float64
        if a tensor argument is float64, else float32.

    Notes
    -----
    The frequency at grid point ``(ky, kx)`` (``torch.fft.fftfreq`` order, cycles per pixel
    divided by the pixel size) has magnitude ``k`` and azimuth ``α = atan2(ky, kx)``. With
    astigmatism the defocus seen along that azimuth is
    ``Δf(α) = Δf + (Δf_u - Δf_v) / 2 · cos(2 (α - α_u))`` (as in CTFFIND), so the rings become
    ellipses that turn with ``astigmatism_angle_deg``; for ``Δf_u > Δf_v`` the zeros lie closest
    to the origin along the ``Δf_u`` direction.
    The value is :func:`ctf_1d` at ``k`` with that defocus, ``-A`` at ``k = 0``.
    """
    if (
        not isinstance(shape_hw, (tuple, list))
        or len(shape_hw) != 2
        or not all(_is_int(n) and n >= 1 for n in shape_hw)
    ):
        raise ValueError(f"shape_hw must be two positive integers (h, w), got {shape_hw!r}")
    h, w = int(shape_hw[0]), int(shape_hw[1])
    pixel_size = _real("pixel_size_angstrom", pixel_size_angstrom, above=0.0)
    params = {
        "defocus_um": _tensor_or_real("defocus_um", defocus_um),
        "astigmatism_um": _tensor_or_real("astigmatism_um", astigmatism_um),
        "astigmatism_angle_deg": _tensor_or_real("astigmatism_angle_deg", astigmatism_angle_deg),
        "phase_shift_deg": _tensor_or_real("phase_shift_deg", phase_shift_deg),
    }
    tensors = [v for v in params.values() if isinstance(v, torch.Tensor)]
    if device is None:
        device = tensors[0].device if tensors else torch.device("cpu")
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    batch = torch.broadcast_shapes(*(t.shape for t in tensors)) if tensors else torch.Size()
    p = {
        name: torch.as_tensor(value, dtype=dtype, device=device).expand(batch)[..., None, None]
        for name, value in params.items()
    }

    ky = torch.fft.fftfreq(h, d=pixel_size, dtype=dtype, device=device)
    kx_fn = torch.fft.rfftfreq if rfft else torch.fft.fftfreq
    kx = kx_fn(w, d=pixel_size, dtype=dtype, device=device)
    if fftshift:
        ky = torch.fft.fftshift(ky)
        kx = kx if rfft else torch.fft.fftshift(kx)
    ky, kx = torch.meshgrid(ky, kx, indexing="ij")
    k2 = ky * ky + kx * kx
    azimuth = torch.atan2(ky, kx)
    local_defocus = p["defocus_um"] + 0.5 * p["astigmatism_um"] * torch.cos(
        2.0 * (azimuth - torch.deg2rad(p["astigmatism_angle_deg"]))
    )
    return ctf_1d(
        torch.sqrt(k2),
        defocus_um=local_defocus,
        voltage_kv=voltage_kv,
        spherical_aberration_mm=spherical_aberration_mm,
        amplitude_contrast=amplitude_contrast,
        phase_shift_deg=p["phase_shift_deg"],
    )


def _strip_labels(width: int, strip_width_px: int, *, device=None) -> tuple[torch.Tensor, int]:
    """Assign each of ``width`` columns to a strip of ``strip_width_px`` columns.

    Strips tile the columns without gaps or overlaps; one strip is centred on the tilt axis (the
    image centre, column ``(width - 1) / 2``) and the outermost ones may be narrower.

    Returns
    -------
    tuple of (torch.Tensor, int)
        Strip index of every column, shape `(width,)`, int64, non-decreasing from 0; and the
        number of strips.
    """
    # Column j sits at x = j - (width - 1) / 2; its strip is floor(x / s + 1/2), computed exactly
    # in integers as floor((2x + s) / (2s)).
    twice_x = 2 * torch.arange(width, device=device) - (width - 1)
    labels = torch.div(twice_x + strip_width_px, 2 * strip_width_px, rounding_mode="floor")
    labels = labels - labels[0]
    return labels, int(labels[-1]) + 1


def phase_flip_tilt_series(
    tilt_series: torch.Tensor,
    tilt_angles_deg: torch.Tensor,
    defocus_um: torch.Tensor,
    *,
    pixel_size_angstrom: float,
    voltage_kv: float,
    spherical_aberration_mm: float,
    amplitude_contrast: float,
    strip_width_px: int | None = None,
    defocus_tolerance_nm: float = 15.0,
    defocus_handedness: int = 1,
) -> torch.Tensor:
    """Correct the CTF of every tilt image by phase flipping, in strips along the tilt axis.

    Parameters
    ----------
    tilt_series : torch.Tensor
        Tilt images, shape `(n, h, w)`, tilt axis along y (h) through the image centre.
    tilt_angles_deg : torch.Tensor
        Tilt angle of each image in degrees, shape `(n,)`, each in ``(-90, 90)``.
    defocus_um : torch.Tensor
        Defocus at the tilt axis of each image in µm, positive for underfocus, shape `(n,)`.
    pixel_size_angstrom : float
        Pixel size in Å.
    voltage_kv : float
        Acceleration voltage in kV.
    spherical_aberration_mm : float
        Spherical aberration in mm.
    amplitude_contrast : float
        Fraction of amplitude contrast in ``[0, 1]``.
    strip_width_px : int, optional
        Width of the strips in pixels, the same for all tilts. By default each tilt gets the
        widest strips across which the defocus changes by at most ``defocus_tolerance_nm``.
    defocus_tolerance_nm : float
        Largest defocus change across one automatic strip, in nm. The defocus error within a
        strip is at most half of it, a phase error of ``π λ (tol / 2) k²``: 0.29 rad at
        Nyquist for 2 Å pixels at 300 kV with the default 15 nm, 0.07 rad for 4 Å pixels.
    defocus_handedness : {1, -1}
        Sign ``s`` of the defocus gradient: the strip centred at detector ``x'`` (pixels from
        the tilt axis) gets defocus ``Δf + s · x' · tan θ · pixel_size``. ``+1`` holds when the
        tomogram's +z points towards the electron source (see Notes).

    Returns
    -------
    torch.Tensor
        The phase-flipped tilt series, shape `(n, h, w)`, on the device of ``tilt_series`` and
        in its floating dtype (float32 for integer input).

    Notes
    -----
    Phase flipping multiplies each image's spectrum by ``-sign(CTF)`` (``CTF`` as in
    :func:`ctf_2d`): frequencies inside the first zero keep their sign, those in lobes of the
    opposite sign are flipped, so the data's transfer becomes ``-|CTF|`` relative to the
    object, everywhere of the sign that the raw image has at low frequency (protein stays dark,
    as after IMOD ``ctfphaseflip``). Amplitudes are left alone; zeros stay zeros.

    A tilted specimen is not at one defocus. The slab's mid-plane (``z = 0``) point imaged at
    detector ``x'`` lies at height ``z' = -x' tan θ`` along the beam axis of the rotated frame
    (``z' = z cos θ - x sin θ`` completes ``x' = x cos θ + z sin θ``). In underfocus the
    in-focus plane lies above the specimen, on the electron source side, so points further
    down the column are more underfocused. If +z points towards the source, a point with
    ``x' > 0`` at ``θ > 0`` lies lower and its defocus is ``Δf + x' tan θ · pixel_size``
    (``s = +1``); if +z points along the beam, ``s = -1``. Which one holds depends on how the
    tilt angles were defined; try both if unsure, or check the sign of the defocus gradient
    fitted per tilt by CTF estimation.

    Each image is cut into strips parallel to the tilt axis (one centred on the axis); the
    spectrum of the whole image is multiplied by the flip of each strip's CTF, evaluated at the
    mean defocus of the strip's columns, transformed back, and only the strip's own columns are
    kept, as in IMOD's ``ctfphaseflip`` (without its interpolation between strips). The strips
    of a tilt are processed in batches of bounded memory; at ``θ = 0`` one strip covers all.

    References
    ----------
    Q. Xiong, M. K. Morphew, J. R. McIntosh and D. A. Agard, "CTF determination and correction
    in electron cryotomography", *Ultramicroscopy* 109, 1335–1345 (2009).
    """
    if not isinstance(tilt_series, torch.Tensor) or tilt_series.ndim != 3:
        shape = tuple(tilt_series.shape) if isinstance(tilt_series, torch.Tensor) else None
        raise ValueError(f"tilt_series must be a tensor of shape (n, h, w), got {shape}")
    if tilt_series.is_complex():
        raise ValueError("tilt_series must be real-valued")
    n, h, w = tilt_series.shape
    if h < 1 or w < 1:
        raise ValueError(f"tilt_series images must not be empty, got shape {(n, h, w)}")
    angles = torch.as_tensor(tilt_angles_deg).detach().to("cpu", torch.float64).reshape(-1)
    defoci = torch.as_tensor(defocus_um).detach().to("cpu", torch.float64).reshape(-1)
    if angles.numel() != n:
        raise ValueError(f"tilt_angles_deg has {angles.numel()} angles for {n} tilt images")
    if defoci.numel() != n:
        raise ValueError(f"defocus_um has {defoci.numel()} values for {n} tilt images")
    if not torch.isfinite(angles).all() or not (angles.abs() < 90.0).all():
        raise ValueError(f"tilt_angles_deg must be finite and within (-90, 90), got {angles}")
    if not torch.isfinite(defoci).all():
        raise ValueError("defocus_um must be finite")
    pixel_size = _real("pixel_size_angstrom", pixel_size_angstrom, above=0.0)
    if strip_width_px is not None and (not _is_int(strip_width_px) or strip_width_px < 1):
        raise ValueError(f"strip_width_px must be a positive integer, got {strip_width_px!r}")
    tolerance_angstrom = _real("defocus_tolerance_nm", defocus_tolerance_nm, above=0.0) * 10.0
    if defocus_handedness not in (1, -1) or isinstance(defocus_handedness, bool):
        raise ValueError(f"defocus_handedness must be 1 or -1, got {defocus_handedness!r}")

    wavelength, cs_angstrom, amplitude_phase = _microscope(
        voltage_kv, spherical_aberration_mm, amplitude_contrast
    )
    device = tilt_series.device
    dtype = tilt_series.dtype if tilt_series.is_floating_point() else torch.float32
    images = tilt_series.to(dtype)
    # χ = per_um · Δf + rest on the rfft grid (see ctf_1d); CTF = -sin(χ) > 0 where sin(χ) < 0.
    ky = torch.fft.fftfreq(h, d=pixel_size, device=device)
    kx = torch.fft.rfftfreq(w, d=pixel_size, device=device)
    per_um, rest = _chi_terms(
        ky[:, None] ** 2 + kx[None, :] ** 2,
        wavelength=wavelength,
        cs_angstrom=cs_angstrom,
        amplitude_phase=amplitude_phase,
    )
    x_det = torch.arange(w, dtype=torch.float32, device=device) - (w - 1) / 2
    columns = torch.arange(w, device=device)
    chunk = max(1, _MAX_BUFFER_ELEMENTS // (h * (w // 2 + 1)))
    out = torch.empty_like(images)
    for i in range(n):
        tan_theta = math.tan(math.radians(float(angles[i])))
        if strip_width_px is not None:
            width = min(int(strip_width_px), w)
        elif tan_theta == 0.0:
            width = w
        else:
            width = min(w, max(1, math.floor(tolerance_angstrom / (pixel_size * abs(tan_theta)))))
        labels, n_strips = _strip_labels(w, width, device=device)
        centres = torch.zeros(n_strips, dtype=torch.float32, device=device).index_add_(
            0, labels, x_det
        ) / torch.bincount(labels, minlength=n_strips)
        strip_defocus_um = (
            float(defoci[i]) + defocus_handedness * centres * tan_theta * pixel_size * 1e-4
        )
        spectrum = torch.fft.rfft2(images[i])
        for start in range(0, n_strips, chunk):
            stop = min(n_strips, start + chunk)
            chi = per_um * strip_defocus_um[start:stop, None, None] + rest
            flip = torch.where(torch.sin(chi) < 0, -1.0, 1.0).to(spectrum.real.dtype)
            flipped = torch.fft.irfft2(spectrum * flip, s=(h, w))  # (stop - start, h, w)
            keep = (labels >= start) & (labels < stop)
            cols = columns[keep]
            out[i][:, cols] = flipped[labels[keep] - start, :, cols].transpose(0, 1)
    return out


def wiener_filter(
    shape_dhw: tuple[int, int, int],
    *,
    pixel_size_angstrom: float,
    defocus_um: float,
    voltage_kv: float = 300.0,
    spherical_aberration_mm: float = 2.7,
    amplitude_contrast: float = 0.07,
    phase_shift_deg: float = 0.0,
    snr_falloff: float = 1.0,
    deconv_strength: float = 1.0,
    highpass_nyquist: float = 0.02,
    phase_flipped: bool = False,
    rfft: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The isotropic Wiener-like CTF deconvolution filter of Warp and IsoNet on a 3D DFT grid.

    Parameters
    ----------
    shape_dhw : tuple of int
        Real-space volume shape `(d, h, w)`.
    pixel_size_angstrom, defocus_um, voltage_kv, spherical_aberration_mm, amplitude_contrast
        As in :func:`wiener_deconvolve_volume`.
    phase_shift_deg, snr_falloff, deconv_strength, highpass_nyquist, phase_flipped
        As in :func:`wiener_deconvolve_volume`.
    rfft : bool
        If True, the last axis holds only the ``w // 2 + 1`` frequencies ``kx >= 0``.
    device : torch.device or str, optional
        Device of the output.

    Returns
    -------
    torch.Tensor
        The filter, shape `(d, h, w')`, float32, unshifted; its largest absolute value is 1
        (unless the grid holds only the zero frequency, where it is 0).
    """
    if (
        not isinstance(shape_dhw, (tuple, list))
        or len(shape_dhw) != 3
        or not all(_is_int(n) and n >= 1 for n in shape_dhw)
    ):
        raise ValueError(f"shape_dhw must be three positive integers (d, h, w), got {shape_dhw!r}")
    pixel_size = _real("pixel_size_angstrom", pixel_size_angstrom, above=0.0)
    defocus = _real("defocus_um", defocus_um)
    falloff = _real("snr_falloff", snr_falloff, at_least=0.0)
    strength = _real("deconv_strength", deconv_strength)
    highpass_fraction = _real("highpass_nyquist", highpass_nyquist, above=0.0, at_most=1.0)
    shape = tuple(int(n) for n in shape_dhw)

    frequency = frequency_grid(shape, rfft=rfft, device=device).norm(dim=-1)  # cycles/voxel
    nyquist_fraction = 2.0 * frequency
    highpass = 1.0 - torch.cos(math.pi * torch.clamp(nyquist_fraction / highpass_fraction, max=1))
    snr = 10.0 ** (3.0 * strength) * torch.exp(-100.0 * falloff * nyquist_fraction / pixel_size)
    snr = snr * highpass
    ctf = ctf_1d(
        frequency / pixel_size,
        defocus_um=defocus,
        voltage_kv=voltage_kv,
        spherical_aberration_mm=spherical_aberration_mm,
        amplitude_contrast=amplitude_contrast,
        phase_shift_deg=phase_shift_deg,
    )
    transfer = ctf.abs() if phase_flipped else -ctf
    # transfer / (ctf² + 1/snr), written so that snr = 0 (the zero frequency) gives 0.
    response = transfer * snr / (ctf * ctf * snr + 1.0)
    peak = response.abs().max()
    return response / peak if peak > 0 else response


def wiener_deconvolve_volume(
    volume: torch.Tensor,
    *,
    pixel_size_angstrom: float,
    defocus_um: float,
    voltage_kv: float = 300.0,
    spherical_aberration_mm: float = 2.7,
    amplitude_contrast: float = 0.07,
    phase_shift_deg: float = 0.0,
    snr_falloff: float = 1.0,
    deconv_strength: float = 1.0,
    highpass_nyquist: float = 0.02,
    phase_flipped: bool = False,
) -> torch.Tensor:
    """Deconvolve the CTF of a whole tomogram with an isotropic Wiener-like filter.

    Parameters
    ----------
    volume : torch.Tensor
        Tomogram(s), shape `(..., d, h, w)`.
    pixel_size_angstrom : float
        Voxel size in Å.
    defocus_um : float
        Defocus in µm (positive for underfocus), usually that of the zero-tilt image.
    voltage_kv : float
        Acceleration voltage in kV.
    spherical_aberration_mm : float
        Spherical aberration in mm.
    amplitude_contrast : float
        Fraction of amplitude contrast in ``[0, 1]``; Warp and IsoNet use 0.07.
    phase_shift_deg : float
        Extra phase shift in degrees (phase plate).
    snr_falloff : float
        How fast the modelled SNR falls with frequency; IsoNet's ``snrfalloff``, usually 1.0 to
        1.2. Larger values deconvolve less at high frequency (a smoother result).
    deconv_strength : float
        IsoNet's ``deconvstrength``: the SNR at low frequency is ``10^(3 · deconv_strength)``,
        so 1 models SNR 1000 and 0.67 SNR 100. Usually 0.5 to 1; larger values boost the low
        frequencies more strongly relative to the high ones.
    highpass_nyquist : float
        Fraction of Nyquist in ``(0, 1]`` below which a smooth high pass attenuates the lowest
        frequencies (which the deconvolution would boost most); IsoNet's ``hpnyquist``,
        usually 0.02.
    phase_flipped : bool
        Whether the tilt series was phase flipped before reconstruction (e.g. with
        :func:`phase_flip_tilt_series`); the filter then uses ``|CTF|``.

    Returns
    -------
    torch.Tensor
        The deconvolved tomogram, shape `(..., d, h, w)`, on the device of ``volume`` and in its
        floating dtype (float32 for integer input). Its mean is zero.

    Notes
    -----
    The filter is Warp's ``tom_deconv`` as used by IsoNet, evaluated at the exact radial
    frequency of every voxel instead of interpolating a sampled 1D profile. With ``f`` the
    radial frequency as a fraction of Nyquist (``2 |k|`` in cycles per voxel) and ``p`` the
    voxel size in Å, the modelled spectral SNR is

        snr(f) = 10^(3 · deconv_strength) · exp(-100 · snr_falloff · f / p) · hp(f),
        hp(f) = 1 - cos(π · min(1, f / highpass_nyquist)),

    which falls by ``e`` per ``1 / (200 · snr_falloff)`` 1/Å whatever the voxel size; ``hp``
    rises from 0 at ``f = 0`` to 2 at ``highpass_nyquist``, as in Warp, and removes the mean.
    The filter is the Wiener filter ``T / (CTF² + 1 / snr)`` with ``T = -CTF`` (``T = |CTF|``
    if ``phase_flipped``), normalised to a largest gain of 1. Where the SNR is high it inverts
    the CTF, flipping the lobes of reversed contrast and boosting the attenuated low
    frequencies; where the SNR is low it tends to ``T · snr`` and suppresses noise. ``T = -CTF``
    keeps the tomogram's polarity (the sign at low frequency) as in Warp, whose CTF has the
    opposite overall sign to :func:`ctf_2d`.

    References
    ----------
    D. Tegunov and P. Cramer, "Real-time cryo-electron microscopy data preprocessing with
    Warp", *Nature Methods* 16, 1146–1152 (2019); ``tom_deconv``,
    https://github.com/dtegunov/tom_deconv.

    Y.-T. Liu et al., "Isotropic reconstruction for electron tomography with deep learning",
    *Nature Communications* 13, 6482 (2022).
    """
    if not isinstance(volume, torch.Tensor) or volume.ndim < 3 or volume.is_complex():
        shape = tuple(volume.shape) if isinstance(volume, torch.Tensor) else None
        raise ValueError(f"volume must be a real tensor of shape (..., d, h, w), got {shape}")
    shape = tuple(volume.shape[-3:])
    if min(shape) < 1:
        raise ValueError(f"volume must not be empty, got shape {tuple(volume.shape)}")
    response = wiener_filter(
        shape,
        pixel_size_angstrom=pixel_size_angstrom,
        defocus_um=defocus_um,
        voltage_kv=voltage_kv,
        spherical_aberration_mm=spherical_aberration_mm,
        amplitude_contrast=amplitude_contrast,
        phase_shift_deg=phase_shift_deg,
        snr_falloff=snr_falloff,
        deconv_strength=deconv_strength,
        highpass_nyquist=highpass_nyquist,
        phase_flipped=phase_flipped,
        device=volume.device,
    )
    dtype = volume.dtype if volume.is_floating_point() else torch.float32
    spectrum = torch.fft.rfftn(volume.to(dtype), dim=(-3, -2, -1))
    return torch.fft.irfftn(spectrum * response.to(dtype), s=shape, dim=(-3, -2, -1))
