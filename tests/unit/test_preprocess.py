"""Real-data preprocessing: normalisation, border fade, exposure filter, alignment, x tilt."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepdewedge.io.geometry import TiltSeriesGeometry
from deepdewedge.reconstruct.preprocess import (
    align_tilts,
    critical_exposure,
    exposure_filter,
    normalize_tilts,
    rotate_about_x,
    taper_borders,
)


def _blob(h, w, centre_yx, sigma=2.0):
    y = torch.arange(h, dtype=torch.float64)[:, None] - (h - 1) / 2
    x = torch.arange(w, dtype=torch.float64)[None, :] - (w - 1) / 2
    return torch.exp(-((y - centre_yx[0]) ** 2 + (x - centre_yx[1]) ** 2) / (2 * sigma**2))


def _centroid(image):
    h, w = image.shape
    y = torch.arange(h, dtype=torch.float64)[:, None] - (h - 1) / 2
    x = torch.arange(w, dtype=torch.float64)[None, :] - (w - 1) / 2
    weight = image.to(torch.float64).clamp_min(0)
    return float((weight * y).sum() / weight.sum()), float((weight * x).sum() / weight.sum())


def test_normalize_gives_zero_mean_unit_std_per_view():
    g = torch.Generator().manual_seed(0)
    counts = (
        30 + 5 * torch.rand(3, 20, 24, generator=g) * torch.tensor([1.0, 2.0, 4.0])[:, None, None]
    )
    out, std = normalize_tilts(counts)
    assert torch.allclose(out.mean(dim=(1, 2)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(out.std(dim=(1, 2)), torch.ones(3), atol=1e-5)
    assert torch.allclose(std, counts.std(dim=(1, 2)))
    # Halves scaled by the whole view's std add up to the normalised whole.
    half = counts / 2
    h0, _ = normalize_tilts(half + 1.0, std=std)
    h1, _ = normalize_tilts(half - 1.0, std=std)
    assert torch.allclose(h0 + h1, out, atol=1e-5)
    logged, _ = normalize_tilts(counts, log=True)
    # log is monotone: the order of the pixels is kept.
    assert torch.equal(torch.argsort(logged[0].flatten()), torch.argsort(out[0].flatten()))


def test_taper_keeps_the_inside_and_fades_the_border_to_zero():
    images = torch.randn(2, 40, 50, generator=torch.Generator().manual_seed(1))
    out = taper_borders(images, width_px=8)
    assert torch.equal(out[:, 8:-8, 8:-8], images[:, 8:-8, 8:-8])
    assert out[:, 0].abs().max() < 0.05 * images.abs().max()
    assert out[:, :, -1].abs().max() < 0.05 * images.abs().max()
    assert taper_borders(images, width_px=0) is images
    with pytest.raises(ValueError, match="width_px"):
        taper_borders(images, width_px=-1)


def test_critical_exposure_matches_grant_and_grigorieff():
    k = torch.tensor([0.1, 0.25])
    expected = 0.245 * k**-1.665 + 2.81
    assert torch.allclose(critical_exposure(k), expected)
    assert torch.allclose(critical_exposure(k, voltage_kv=200), 0.8 * expected)
    assert (
        math.isinf(float(critical_exposure(torch.tensor([0.0]))[0]))
        or float(critical_exposure(torch.tensor([0.0]))[0]) > 1e10
    )


def test_exposure_filter_attenuates_a_plane_wave_by_the_expected_factor():
    h, w, pixel = 32, 64, 2.0
    cycles = 16  # along x: k = 16 / (64 * 2 Å)
    x = torch.arange(w, dtype=torch.float64)
    wave = torch.cos(2 * math.pi * cycles * x / w).expand(h, w)
    images = torch.stack([wave, wave, wave]).to(torch.float32) + 3.0
    dose = torch.tensor([0.0, 20.0, 80.0])
    out = exposure_filter(images, dose, pixel_size_angstrom=pixel)
    k = torch.tensor(cycles / (w * pixel))
    for i in range(3):
        expected = math.exp(-float(dose[i]) / (2 * float(critical_exposure(k))))
        amplitude = (out[i] - out[i].mean()).abs().max()
        assert float(amplitude) == pytest.approx(expected, rel=1e-3)
        assert float(out[i].mean()) == pytest.approx(3.0, rel=1e-5)  # the mean is kept


@settings(max_examples=15, deadline=None)
@given(
    phi=st.floats(-180, 180),
    mag=st.floats(0.9, 1.1),
    sx=st.floats(-6, 6),
    sy=st.floats(-6, 6),
    u=st.floats(-6, 6),
    v=st.floats(-6, 6),
)
def test_alignment_moves_the_raw_position_onto_the_aligned_frame(phi, mag, sx, sy, u, v):
    # A blob at aligned position (u, v) is at raw position m R(φ) (u, v) + s.
    geometry = TiltSeriesGeometry(
        tilt_angle_deg=[0.0],
        tilt_axis_angle_deg=[phi],
        magnification=[mag],
        shift_x_px=[sx],
        shift_y_px=[sy],
    )
    matrix = geometry.raw_position_matrix()
    raw_x, raw_y = matrix[0] @ np.array([u, v, 1.0])
    raw = _blob(48, 52, (raw_y, raw_x), sigma=2.5 * mag)[None].to(torch.float32)
    aligned = align_tilts(raw, torch.from_numpy(matrix))
    cy, cx = _centroid(aligned[0])
    assert cy == pytest.approx(v, abs=0.05)
    assert cx == pytest.approx(u, abs=0.05)


def test_identity_alignment_reproduces_the_image():
    images = torch.randn(2, 30, 34, generator=torch.Generator().manual_seed(2))
    identity = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]]).expand(2, 2, 3)
    assert torch.allclose(align_tilts(images, identity), images, atol=1e-5)


def test_rotate_about_x_moves_a_point_as_the_model_says_and_round_trips():
    d, h, w = 33, 41, 5
    z = torch.arange(d, dtype=torch.float64)[:, None] - (d - 1) / 2
    y = torch.arange(h, dtype=torch.float64)[None, :] - (h - 1) / 2
    point_yz = (8.0, 3.0)
    alpha = 20.0
    # The tilted specimen holds the point at R_x(α) p.
    a = math.radians(alpha)
    ty = math.cos(a) * point_yz[0] - math.sin(a) * point_yz[1]
    tz = math.sin(a) * point_yz[0] + math.cos(a) * point_yz[1]
    tilted = torch.exp(-((y - ty) ** 2 + (z - tz) ** 2) / (2 * 2.0**2))
    volume = tilted[:, :, None].expand(d, h, w).to(torch.float32).contiguous()
    out = rotate_about_x(volume, alpha)[:, :, 2]
    weight = out.to(torch.float64).clamp_min(0)
    cz = float((weight * z).sum() / weight.sum())
    cy = float((weight * y).sum() / weight.sum())
    assert (cy, cz) == pytest.approx(point_yz, abs=0.1)
    back = rotate_about_x(rotate_about_x(volume, alpha), -alpha)
    inner = (slice(10, -10), slice(10, -10))
    assert (
        np.corrcoef(back[:, :, 2][inner].flatten(), volume[:, :, 2][inner].flatten())[0, 1] > 0.99
    )
    assert torch.allclose(rotate_about_x(volume, 0.0), volume, atol=1e-6)


def test_geometry_fills_neutral_values_and_orders_by_dose():
    geometry = TiltSeriesGeometry(
        tilt_angle_deg=[0.0, 3.0, -3.0], pre_exposure_e_per_a2=[0.0, 3.0, 6.0]
    )
    assert geometry.n_views == 3
    assert np.all(geometry.magnification == 1) and not geometry.excluded.any()
    assert geometry.has_dose and not geometry.has_defocus
    assert geometry.acquisition_order().tolist() == [0, 1, 2]
    assert TiltSeriesGeometry(tilt_angle_deg=[0.0, 1.0]).acquisition_order() is None
    with pytest.raises(ValueError, match="shift_x_px"):
        TiltSeriesGeometry(tilt_angle_deg=[0.0, 1.0], shift_x_px=[0.0])
    with pytest.raises(ValueError):
        geometry.tilt_angle_deg[0] = 1.0
