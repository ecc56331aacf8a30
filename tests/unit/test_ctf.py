import math

import pytest
import scipy.ndimage as ndi
import torch

from deepdewedge.evaluate.metrics import correlation_coefficient
from deepdewedge.fourier import frequency_grid
from deepdewedge.reconstruct.ctf import (
    _strip_labels,
    ctf_1d,
    ctf_2d,
    electron_wavelength_angstrom,
    phase_flip_tilt_series,
    wiener_deconvolve_volume,
    wiener_filter,
)

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"),
        ],
    ),
]
MICROSCOPE = {"voltage_kv": 300.0, "spherical_aberration_mm": 2.7, "amplitude_contrast": 0.07}


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _modulate(image: torch.Tensor, ctf: torch.Tensor) -> torch.Tensor:
    """Multiply the spectrum of `(..., h, w)` images by an rfft-grid CTF."""
    return torch.fft.irfft2(torch.fft.rfft2(image) * ctf, s=image.shape[-2:])


def _tilted_image(image, *, tilt_deg, defocus_um, pixel_size_angstrom, handedness=1):
    """Image of a tilted specimen: every column imaged with the defocus at its own height.

    The image is the sum of its single columns, each convolved with the CTF of that column's
    defocus `Δf + s · x' · tan θ · pixel_size` (a thin slab: the point imaged at x' lies at one
    height). This is the fine reference that strip-wise flipping approximates.
    """
    h, w = image.shape
    x_det = torch.arange(w, dtype=torch.float32) - (w - 1) / 2
    tan_theta = math.tan(math.radians(tilt_deg))
    defocus = defocus_um + handedness * x_det * tan_theta * pixel_size_angstrom * 1e-4
    ctf = ctf_2d((h, w), pixel_size_angstrom=pixel_size_angstrom, defocus_um=defocus, **MICROSCOPE)
    columns = torch.zeros(w, h, w)  # columns[j] holds column j of the image alone
    columns[torch.arange(w), :, torch.arange(w)] = image.T
    return _modulate(columns, ctf).sum(dim=0)


# --- CTF -------------------------------------------------------------------------------------


def test_wavelength_is_relativistic():
    assert electron_wavelength_angstrom(300) == pytest.approx(0.019687, abs=2e-6)
    assert electron_wavelength_angstrom(200) == pytest.approx(0.025079, abs=2e-6)
    assert electron_wavelength_angstrom(100) == pytest.approx(0.037014, abs=2e-6)


@pytest.mark.parametrize("amplitude_contrast", [0.0, 0.07, 0.1])
def test_ctf_at_zero_frequency_is_minus_the_amplitude_contrast(amplitude_contrast):
    # CTF(0) = -sin(arcsin(A)) = -A: dark contrast for a positive potential.
    ctf = ctf_2d(
        (64, 64),
        pixel_size_angstrom=10.0,
        defocus_um=3.0,
        amplitude_contrast=amplitude_contrast,
    )
    assert float(ctf[0, 0]) == pytest.approx(-amplitude_contrast, abs=1e-7)
    # Inside the first zero (k ≈ 1/24 Å⁻¹, sample 26) the CTF stays negative in underfocus.
    assert (ctf[0, 1:20] < 0).all() and (ctf[1:20, 0] < 0).all()


def test_first_zero_at_analytic_position_without_cs():
    # With Cs = 0 and A = 0, χ = π λ Δf k² reaches π at k1 = 1 / sqrt(λ Δf). Choose the pixel
    # size so that k1 falls exactly on the 10th sample of a 64-pixel grid.
    defocus_um, n, m = 2.0, 64, 10
    k1 = 1.0 / math.sqrt(electron_wavelength_angstrom(300) * defocus_um * 1e4)
    pixel_size = m / (n * k1)
    ctf = ctf_2d(
        (n, n),
        pixel_size_angstrom=pixel_size,
        defocus_um=torch.tensor(defocus_um, dtype=torch.float64),
        spherical_aberration_mm=0.0,
        amplitude_contrast=0.0,
    )
    profile = ctf[0]
    assert float(profile[m]) == pytest.approx(0.0, abs=1e-9)
    assert (profile[1:m] < 0).all() and float(profile[m + 1]) > 0
    # The first zero also lies at radius k1 along the ky axis.
    assert float(ctf[m, 0]) == pytest.approx(0.0, abs=1e-9)


def test_astigmatism_rotates_with_the_angle():
    kwargs = {
        "pixel_size_angstrom": 2.0,
        "defocus_um": torch.tensor(2.0, dtype=torch.float64),
        "astigmatism_um": 0.6,
        "rfft": False,
        **MICROSCOPE,
    }
    along_x = ctf_2d((32, 32), astigmatism_angle_deg=0.0, **kwargs)
    along_y = ctf_2d((32, 32), astigmatism_angle_deg=90.0, **kwargs)
    torch.testing.assert_close(along_y, along_x.T, atol=1e-12, rtol=0)
    # At angle 0 the kx axis sees Δf_u = Δf + 0.3 µm and the ky axis Δf_v = Δf - 0.3 µm.
    k = torch.fft.fftfreq(32, dtype=torch.float64) / 2.0
    torch.testing.assert_close(along_x[0], ctf_1d(k, defocus_um=2.3, **MICROSCOPE))
    torch.testing.assert_close(along_x[:, 0], ctf_1d(k, defocus_um=1.7, **MICROSCOPE))
    # At 45° the diagonal ky = kx sees Δf_u.
    diagonal = ctf_2d((32, 32), astigmatism_angle_deg=45.0, **kwargs).diagonal()
    k_diag = torch.fft.fftfreq(32, dtype=torch.float64).abs() * math.sqrt(2.0) / 2.0
    torch.testing.assert_close(diagonal, ctf_1d(k_diag, defocus_um=2.3, **MICROSCOPE))


def test_ctf_batches_and_grid_flags():
    defocus = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    half = ctf_2d((10, 9), pixel_size_angstrom=3.0, defocus_um=defocus)
    assert half.shape == (2, 3, 10, 5) and half.dtype == torch.float32
    full = ctf_2d((10, 9), pixel_size_angstrom=3.0, defocus_um=defocus, rfft=False)
    assert full.shape == (2, 3, 10, 9)
    torch.testing.assert_close(full[..., :5], half)
    single = ctf_2d((10, 9), pixel_size_angstrom=3.0, defocus_um=5.0)
    torch.testing.assert_close(half[1, 1], single)
    shifted = ctf_2d((10, 9), pixel_size_angstrom=3.0, defocus_um=5.0, rfft=False, fftshift=True)
    torch.testing.assert_close(shifted, torch.fft.fftshift(full[1, 1]))
    shifted_half = ctf_2d((10, 9), pixel_size_angstrom=3.0, defocus_um=5.0, fftshift=True)
    torch.testing.assert_close(shifted_half, torch.fft.fftshift(single, dim=0))


@pytest.mark.parametrize("device", DEVICES)
def test_ctf_follows_the_device_of_its_tensors(device):
    ctf = ctf_2d((8, 8), pixel_size_angstrom=2.0, defocus_um=torch.ones(2, device=device))
    assert ctf.device.type == device
    torch.testing.assert_close(
        ctf.cpu(), ctf_2d((8, 8), pixel_size_angstrom=2.0, defocus_um=1.0)[None].expand(2, -1, -1)
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pixel_size_angstrom": 0.0}, "pixel_size_angstrom"),
        ({"voltage_kv": -300.0}, "voltage_kv"),
        ({"amplitude_contrast": 1.5}, "amplitude_contrast"),
        ({"spherical_aberration_mm": -1.0}, "spherical_aberration_mm"),
        ({"defocus_um": float("nan")}, "defocus_um"),
        ({"defocus_um": torch.tensor([1.0, float("inf")])}, "defocus_um"),
        ({"shape_hw": (8, 0)}, "shape_hw"),
    ],
)
def test_ctf_rejects_bad_arguments(kwargs, match):
    arguments = {"shape_hw": (8, 8), "pixel_size_angstrom": 2.0, "defocus_um": 1.0, **kwargs}
    shape = arguments.pop("shape_hw")
    with pytest.raises(ValueError, match=match):
        ctf_2d(shape, **arguments)


# --- phase flipping ---------------------------------------------------------------------------


def test_phase_flip_of_untilted_image_makes_the_transfer_non_negative():
    # Relative to the ideal image of the raw data's polarity (-x, protein dark), the flipped
    # image's transfer is |CTF| >= 0, whereas the raw image's is the oscillating CTF.
    x = torch.randn(1, 64, 64, generator=_generator(0))
    ctf = ctf_2d((64, 64), pixel_size_angstrom=2.0, defocus_um=2.0, **MICROSCOPE)
    raw = _modulate(x, ctf)
    flipped = phase_flip_tilt_series(
        raw, torch.tensor([0.0]), torch.tensor([2.0]), pixel_size_angstrom=2.0, **MICROSCOPE
    )
    ideal = torch.fft.rfft2(-x)
    transfer = (torch.fft.rfft2(flipped) / ideal).real[0]
    valid = ideal[0].abs() > 1e-3 * ideal.abs().max()
    assert (transfer[valid] >= -1e-5).all()
    torch.testing.assert_close(transfer[valid], ctf.abs()[valid], atol=1e-4, rtol=1e-4)
    # Measured: CC with -x 0.893 flipped, 0.021 raw.
    assert correlation_coefficient(flipped, -x) > 0.85
    assert abs(correlation_coefficient(raw, -x)) < 0.1


def test_strip_flipping_follows_the_defocus_gradient_of_tilted_images():
    # 64 x 256 images at 2 Å, 0.5 µm at the axis, ±60°: the defocus changes by 89 nm from the
    # axis to the edge. Measured CC with -x at +60°: strips (auto, 43 px) 0.861, one strip at
    # the central defocus 0.672, strips with the wrong handedness 0.352, raw 0.05.
    angles = torch.tensor([-60.0, 0.0, 60.0])
    defocus = torch.tensor([0.5, 0.6, 0.5])
    truth = torch.randn(3, 64, 256, generator=_generator(1))
    series = torch.stack(
        [
            _tilted_image(t, tilt_deg=float(a), defocus_um=float(d), pixel_size_angstrom=2.0)
            for t, a, d in zip(truth, angles, defocus, strict=True)
        ]
    )
    kwargs = {"pixel_size_angstrom": 2.0, **MICROSCOPE}
    strips = phase_flip_tilt_series(series, angles, defocus, **kwargs)
    central = phase_flip_tilt_series(series, angles, defocus, strip_width_px=256, **kwargs)
    wrong = phase_flip_tilt_series(series, angles, defocus, defocus_handedness=-1, **kwargs)
    fine = phase_flip_tilt_series(series, angles, defocus, strip_width_px=4, **kwargs)
    for i in (0, 2):
        cc_strips = correlation_coefficient(strips[i], -truth[i])
        assert cc_strips > 0.8
        assert cc_strips > correlation_coefficient(central[i], -truth[i]) + 0.1
        assert cc_strips > correlation_coefficient(wrong[i], -truth[i]) + 0.3
        assert correlation_coefficient(fine[i], -truth[i]) > 0.8
    # The untilted image needs one strip: all variants agree there.
    torch.testing.assert_close(strips[1], central[1])
    torch.testing.assert_close(strips[1], wrong[1])


@pytest.mark.parametrize(("width", "strip"), [(10, 3), (9, 3), (8, 2), (8, 3), (7, 1), (5, 9)])
def test_strips_cover_every_column_exactly_once(width, strip):
    labels, n_strips = _strip_labels(width, strip)
    assert labels.shape == (width,) and labels[0] == 0 and labels[-1] == n_strips - 1
    steps = torch.diff(labels)
    assert ((steps == 0) | (steps == 1)).all()  # contiguous, each column in one strip
    counts = torch.bincount(labels, minlength=n_strips)
    assert int(counts.sum()) == width and (counts >= 1).all() and (counts <= strip).all()
    assert (counts[1:-1] == strip).all()
    if (width - strip) % 2 == 0 and strip <= width:
        # One strip sits symmetrically on the tilt axis.
        centre = labels[(width - 1) // 2]
        columns = torch.nonzero(labels == centre).flatten().double()
        assert float(columns.mean()) == pytest.approx((width - 1) / 2)


@pytest.mark.parametrize("device", DEVICES)
def test_phase_flip_keeps_shape_dtype_and_device(device):
    series = torch.randn(2, 12, 20, generator=_generator(2)).to(device)
    flipped = phase_flip_tilt_series(
        series,
        torch.tensor([-45.0, 30.0]),
        torch.tensor([3.0, 3.0]),
        pixel_size_angstrom=4.0,
        strip_width_px=3,
        **MICROSCOPE,
    )
    assert flipped.shape == series.shape and flipped.dtype == series.dtype
    assert flipped.device == series.device


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tilt_series": torch.zeros(4, 4)}, "tilt_series"),
        ({"tilt_angles_deg": torch.tensor([0.0, 10.0, 20.0])}, "tilt_angles_deg"),
        ({"tilt_angles_deg": torch.tensor([0.0, 90.0])}, "tilt_angles_deg"),
        ({"defocus_um": torch.tensor([1.0])}, "defocus_um"),
        ({"strip_width_px": 0}, "strip_width_px"),
        ({"strip_width_px": 2.5}, "strip_width_px"),
        ({"defocus_tolerance_nm": 0.0}, "defocus_tolerance_nm"),
        ({"defocus_handedness": 0}, "defocus_handedness"),
        ({"pixel_size_angstrom": -1.0}, "pixel_size_angstrom"),
        ({"amplitude_contrast": -0.1}, "amplitude_contrast"),
        ({"tilt_series": torch.zeros(2, 8, 0)}, "tilt_series"),
    ],
)
def test_phase_flip_rejects_bad_arguments(kwargs, match):
    arguments = {
        "tilt_series": torch.zeros(2, 8, 8),
        "tilt_angles_deg": torch.tensor([0.0, 10.0]),
        "defocus_um": torch.tensor([1.0, 1.0]),
        "pixel_size_angstrom": 2.0,
        **MICROSCOPE,
        **kwargs,
    }
    series = arguments.pop("tilt_series")
    angles = arguments.pop("tilt_angles_deg")
    defocus = arguments.pop("defocus_um")
    with pytest.raises(ValueError, match=match):
        phase_flip_tilt_series(series, angles, defocus, **arguments)


# --- Wiener deconvolution ---------------------------------------------------------------------


def _smooth_volume(seed: int, shape=(32, 32, 32), sigma=1.0) -> torch.Tensor:
    noise = torch.randn(shape, generator=_generator(seed)).numpy()
    return torch.from_numpy(ndi.gaussian_filter(noise, sigma, mode="wrap"))


def _modulated_volume(volume, *, pixel_size_angstrom, defocus_um):
    frequency = frequency_grid(tuple(volume.shape)).norm(dim=-1) / pixel_size_angstrom
    ctf = ctf_1d(frequency, defocus_um=defocus_um, **MICROSCOPE)
    spectrum = torch.fft.rfftn(volume)
    raw = torch.fft.irfftn(spectrum * ctf, s=volume.shape)
    flipped = torch.fft.irfftn(spectrum * -ctf.abs(), s=volume.shape)
    return raw, flipped


def test_wiener_deconvolution_restores_the_ctf_modulated_volume():
    # Measured over seeds 0-2 (6 Å voxels, 6 µm): CC with -x 0.27-0.32 raw, 0.84 deconvolved.
    truth = _smooth_volume(0)
    raw, flipped = _modulated_volume(truth, pixel_size_angstrom=6.0, defocus_um=6.0)
    restored = wiener_deconvolve_volume(raw, pixel_size_angstrom=6.0, defocus_um=6.0)
    assert correlation_coefficient(raw, -truth) < 0.4
    assert correlation_coefficient(restored, -truth) > 0.8
    # Phase-flipped data (transfer -|CTF|) deconvolve to the same result with |CTF|.
    restored_flipped = wiener_deconvolve_volume(
        flipped, pixel_size_angstrom=6.0, defocus_um=6.0, phase_flipped=True
    )
    torch.testing.assert_close(restored_flipped, restored, atol=1e-5, rtol=1e-4)


def test_wiener_filter_peaks_at_one_and_removes_the_mean():
    response = wiener_filter((16, 20, 24), pixel_size_angstrom=5.0, defocus_um=4.0)
    assert response.shape == (16, 20, 13)
    assert float(response.max()) == pytest.approx(1.0)
    assert float(response.abs().max()) == pytest.approx(1.0)
    assert float(response[0, 0, 0]) == 0.0
    flipped = wiener_filter(
        (16, 20, 24), pixel_size_angstrom=5.0, defocus_um=4.0, phase_flipped=True
    )
    assert (flipped >= 0).all() and float(flipped.max()) == pytest.approx(1.0)
    volume = _smooth_volume(1, shape=(16, 20, 24)) + 3.0
    restored = wiener_deconvolve_volume(volume, pixel_size_angstrom=5.0, defocus_um=4.0)
    assert abs(float(restored.mean())) < 1e-5
    constant = wiener_deconvolve_volume(
        torch.full((8, 8, 8), 2.0), pixel_size_angstrom=5.0, defocus_um=4.0
    )
    assert float(constant.abs().max()) < 1e-5


def test_wiener_filter_is_isotropic_and_batches():
    response = wiener_filter((16, 16, 16), pixel_size_angstrom=5.0, defocus_um=4.0, rfft=False)
    torch.testing.assert_close(response, response.permute(2, 1, 0))
    torch.testing.assert_close(response, response.permute(1, 0, 2))
    volumes = torch.randn(2, 8, 8, 8, generator=_generator(3))
    batched = wiener_deconvolve_volume(volumes, pixel_size_angstrom=5.0, defocus_um=4.0)
    single = wiener_deconvolve_volume(volumes[1], pixel_size_angstrom=5.0, defocus_um=4.0)
    torch.testing.assert_close(batched[1], single)


@pytest.mark.parametrize("device", DEVICES)
def test_wiener_deconvolution_keeps_device_and_dtype(device):
    volume = torch.randn(8, 10, 12, generator=_generator(4)).to(device)
    restored = wiener_deconvolve_volume(volume, pixel_size_angstrom=5.0, defocus_um=3.0)
    assert restored.shape == volume.shape and restored.dtype == volume.dtype
    assert restored.device == volume.device


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"highpass_nyquist": 0.0}, "highpass_nyquist"),
        ({"highpass_nyquist": 1.5}, "highpass_nyquist"),
        ({"snr_falloff": -1.0}, "snr_falloff"),
        ({"deconv_strength": float("inf")}, "deconv_strength"),
        ({"pixel_size_angstrom": 0.0}, "pixel_size_angstrom"),
        ({"volume": torch.zeros(8, 8)}, "volume"),
        ({"volume": torch.zeros(8, 0, 8)}, "volume"),
    ],
)
def test_wiener_rejects_bad_arguments(kwargs, match):
    arguments = {"pixel_size_angstrom": 5.0, "defocus_um": 3.0, **kwargs}
    volume = arguments.pop("volume", torch.zeros(8, 8, 8))
    with pytest.raises(ValueError, match=match):
        wiener_deconvolve_volume(volume, **arguments)
