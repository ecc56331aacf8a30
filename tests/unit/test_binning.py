import math

import pytest
import torch

from deepdewedge.reconstruct.binning import bin_images, bin_volume

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
        ],
    ),
]


def _rms(values):
    return float(values.pow(2).mean().sqrt())


def _waves(shape, waves, *, offset=(0.0, 0.0), positions=None):
    """Σ cos(2π (k·p) / n + φ) over `waves` [(ky, kx, φ)], periodic on the `shape` grid.

    Evaluated on the integer grid of `shape`, or at `positions` (a pair of coordinate tensors),
    with coordinates measured from `offset`.
    """
    h, w = shape
    if positions is None:
        positions = torch.meshgrid(
            torch.arange(h, dtype=torch.float64),
            torch.arange(w, dtype=torch.float64),
            indexing="ij",
        )
    y, x = positions[0] - offset[0], positions[1] - offset[1]
    out = torch.zeros_like(y)
    for ky, kx, phase in waves:
        out += torch.cos(2 * math.pi * (ky * y / h + kx * x / w) + phase)
    return out


@pytest.mark.parametrize("method", ["fourier", "average"])
@pytest.mark.parametrize(("shape", "factor"), [((30, 45), 2), ((31, 44), 3), ((16, 16), 4)])
def test_constant_images_stay_constant(method, shape, factor):
    images = torch.full((3, *shape), 2.5)
    binned = bin_images(images, factor, method=method)
    assert binned.shape == (3, shape[0] // factor, shape[1] // factor)
    torch.testing.assert_close(binned, torch.full_like(binned, 2.5), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["fourier", "average"])
def test_factor_one_is_identity(method):
    images = torch.randn(2, 9, 13, generator=torch.Generator().manual_seed(0))
    out = bin_images(images, 1, method=method)
    torch.testing.assert_close(out, images, rtol=0, atol=0)
    assert out.data_ptr() != images.data_ptr()
    volume = torch.randn(5, 6, 7, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(bin_volume(volume, 1, method=method), volume, rtol=0, atol=0)


def test_average_pooling_is_a_reshape_mean():
    images = torch.randn(2, 3, 12, 18, generator=torch.Generator().manual_seed(0))
    expected = images.reshape(2, 3, 4, 3, 6, 3).mean(dim=(3, 5))
    torch.testing.assert_close(bin_images(images, 3, method="average"), expected)
    volume = torch.randn(8, 12, 16, generator=torch.Generator().manual_seed(1))
    expected = volume.reshape(2, 4, 3, 4, 4, 4).mean(dim=(1, 3, 5))
    torch.testing.assert_close(bin_volume(volume, 4, method="average"), expected)


def test_sizes_not_divisible_are_cropped_centrally():
    # 2 and 3 extra pixels: 1 dropped at the start of each axis, the rest at the end.
    images = torch.randn(14, 15, generator=torch.Generator().manual_seed(0))
    expected = images[1:13, 1:13].reshape(3, 4, 3, 4).mean(dim=(1, 3))
    torch.testing.assert_close(bin_images(images, 4, method="average"), expected)


@pytest.mark.parametrize(("shape", "factor"), [((48, 60), 2), ((48, 60), 3), ((50, 61), 4)])
def test_fourier_binning_point_samples_a_band_limited_image(shape, factor):
    # Waves periodic on the cropped grid and strictly below the binned grid's Nyquist frequency
    # come out as the image sampled at the block centres, even between input pixels.
    h, w = shape
    crop = (h // factor * factor, w // factor * factor)
    start = ((h % factor) // 2, (w % factor) // 2)
    m, n = crop[0] // factor, crop[1] // factor
    waves = [(0, 0, 0.0), (1, 2, 0.3), (-(m // 2 - 1), 3, 1.0), (2, n // 2 - 1, 2.0)]
    grid = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    image = _waves(crop, waves, offset=start, positions=grid)
    centres = torch.meshgrid(
        start[0] + factor * torch.arange(m, dtype=torch.float64) + (factor - 1) / 2,
        start[1] + factor * torch.arange(n, dtype=torch.float64) + (factor - 1) / 2,
        indexing="ij",
    )
    expected = _waves(crop, waves, offset=start, positions=centres)
    # Only the cropped region is periodic; fill the dropped margins with something else.
    image[: start[0]] = 7.0
    image[:, : start[1]] = -3.0
    image[start[0] + crop[0] :] = 5.0
    binned = bin_images(image, factor)
    torch.testing.assert_close(binned, expected, rtol=0, atol=1e-10)


def test_fourier_binning_preserves_the_mean():
    images = torch.rand(4, 40, 36, generator=torch.Generator().manual_seed(0)) * 3 + 1
    binned = bin_images(images, 4)
    torch.testing.assert_close(binned.mean(dim=(-2, -1)), images.mean(dim=(-2, -1)))
    volume = torch.rand(24, 20, 28, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(bin_volume(volume, 4).mean(), volume.mean())


def test_fourier_binning_does_not_alias_what_average_pooling_folds_back():
    # A wave at 0.35 cycles/px lies above the Nyquist frequency (0.25) of the 2x-binned grid.
    shape = (40, 40)
    image = _waves(shape, [(0, 14, 0.4), (14, 0, 1.1)])
    fourier = bin_images(image, 2, method="fourier")
    average = bin_images(image, 2, method="average")
    assert float(fourier.abs().max()) < 1e-10
    # Pair averaging keeps cos(π · 0.35) ≈ 0.45 of it, folded to 0.15 cycles per binned pixel.
    assert _rms(average) > 0.4


def test_fourier_binning_keeps_what_average_pooling_attenuates():
    # Just below the new Nyquist frequency pair averaging keeps only cos(π f) = 0.74 of a wave.
    shape = (64, 64)
    image = _waves(shape, [(0, 15, 0.2)])  # 0.234 cycles/px, binned Nyquist 0.25
    fourier = bin_images(image, 2, method="fourier")
    average = bin_images(image, 2, method="average")
    assert abs(_rms(fourier) - _rms(image)) < 1e-10
    assert _rms(average) < 0.8 * _rms(image)


def test_bin_volume_point_samples_a_band_limited_volume():
    shape = (24, 18, 30)
    axes = [torch.arange(n, dtype=torch.float64) for n in shape]
    z, y, x = torch.meshgrid(*axes, indexing="ij")

    def wave(z, y, x):
        return torch.cos(2 * math.pi * (2 * z / 24 - 1 * y / 18 + 3 * x / 30) + 0.7) + 0.5

    factor = 3
    centres = [factor * torch.arange(n // factor, dtype=torch.float64) + 1.0 for n in shape]
    expected = wave(*torch.meshgrid(*centres, indexing="ij"))
    torch.testing.assert_close(bin_volume(wave(z, y, x), factor), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["fourier", "average"])
def test_dtype_device_and_batch_dims_follow_the_input(device, method):
    images = torch.randn(2, 3, 20, 22, dtype=torch.float64, device=device)
    out = bin_images(images, 2, method=method)
    assert out.shape == (2, 3, 10, 11)
    assert out.dtype == torch.float64
    assert out.device.type == device
    for i in range(2):
        torch.testing.assert_close(out[i], bin_images(images[i], 2, method=method))
    assert bin_images(torch.ones(1, 8, 8, dtype=torch.int16), 2, method=method).dtype == (
        torch.float32
    )


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((torch.zeros(8, 8), 0), {}, "factor"),
        ((torch.zeros(8, 8), 2.0), {}, "factor"),
        ((torch.zeros(8, 8), 2), {"method": "bicubic"}, "method"),
        ((torch.zeros(8), 2), {}, "dimensions"),
        ((torch.zeros(4, 16), 5), {}, "larger"),
        ((torch.zeros(8, 8, dtype=torch.complex64), 2), {}, "real"),
    ],
)
def test_bin_images_rejects_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        bin_images(*args, **kwargs)


def test_bin_volume_rejects_images():
    with pytest.raises(ValueError, match="dimensions"):
        bin_volume(torch.zeros(8, 8), 2)
