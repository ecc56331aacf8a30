import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepdewedge.fourier import apply_fourier_mask, missing_wedge_mask
from deepdewedge.io.errors import InputError
from deepdewedge.io.particles import read_particles
from deepdewedge.metrics import (
    FSCCurve,
    cc_inside_wedge,
    cc_outside_wedge,
    correlation_coefficient,
    evaluate_volume,
    fsc,
    particle_box_starts,
    particle_fsc,
    resolution_at,
    soft_sphere_mask,
)


@pytest.fixture(scope="module")
def volume():
    return torch.randn((32, 32, 32), generator=torch.Generator().manual_seed(0))


def _randn(*shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _radius(n):
    """|k| in cycles per voxel on the rfft grid of an n³ volume."""
    k = torch.fft.fftfreq(n, dtype=torch.float64)
    kx = torch.fft.rfftfreq(n, dtype=torch.float64)
    return torch.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None] ** 2)


def _filter(volumes, transfer):
    shape = volumes.shape[-3:]
    spectrum = torch.fft.rfftn(volumes, dim=(-3, -2, -1)) * transfer
    return torch.fft.irfftn(spectrum, s=shape, dim=(-3, -2, -1))


# --- correlation coefficient (eq. 6) ----------------------------------------------------


def test_self_correlation_is_one(volume):
    assert correlation_coefficient(volume, volume) == pytest.approx(1.0, abs=1e-12)


def test_negative_correlation_is_minus_one(volume):
    assert correlation_coefficient(volume, -volume) == pytest.approx(-1.0, abs=1e-12)


def test_independent_noise_is_uncorrelated():
    a, b = _randn(64, 64, 64, seed=0), _randn(64, 64, 64, seed=1)
    assert abs(correlation_coefficient(a, b)) < 0.02
    assert abs(cc_outside_wedge(a, b, mw_angle_deg=60)) < 0.02
    assert abs(cc_inside_wedge(a, b, mw_angle_deg=60)) < 0.02


@settings(max_examples=25, deadline=None)
@given(
    scale=st.floats(min_value=1e-3, max_value=1e3),
    offset=st.floats(min_value=-1e3, max_value=1e3),
)
def test_invariant_to_affine_rescaling(scale, offset):
    # float64 inputs, so that the rescaling itself loses no precision.
    a = _randn(8, 8, 8, seed=2)
    b = a + 0.5 * _randn(8, 8, 8, seed=3)
    for metric in (
        correlation_coefficient,
        lambda x, y: cc_outside_wedge(x, y, mw_angle_deg=60),
        lambda x, y: cc_inside_wedge(x, y, mw_angle_deg=60),
    ):
        reference = metric(a, b)
        assert metric(scale * a + offset, b) == pytest.approx(reference, abs=1e-9)
        assert metric(a, scale * b + offset) == pytest.approx(reference, abs=1e-9)


def test_matches_numpy_and_accepts_mixed_inputs():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 5, 6))
    b = a + rng.normal(size=(4, 5, 6))
    expected = np.corrcoef(a.ravel(), b.ravel())[0, 1]
    assert correlation_coefficient(a, b) == pytest.approx(expected, abs=1e-12)
    assert correlation_coefficient(torch.from_numpy(a).float(), b) == pytest.approx(
        expected, abs=1e-6
    )
    assert isinstance(correlation_coefficient(a, b), float)


def test_is_computed_in_float64():
    # A large offset destroys float32 precision of the mean-free signal, not float64's.
    base = torch.randn(1000, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    shifted = base + 1e6
    assert correlation_coefficient(shifted, base) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize(
    ("a", "b", "match"),
    [
        (torch.zeros(3, 3), torch.zeros(3, 4), "shape"),
        (torch.ones(3, 3), torch.rand(3, 3), "constant"),
        (torch.zeros(0), torch.zeros(0), "empty"),
        ([1.0, 2.0], [1.0, 3.0], "numpy array or a torch tensor"),
    ],
)
def test_rejects_bad_input(a, b, match):
    with pytest.raises(ValueError, match=match):
        correlation_coefficient(a, b)


# --- CC outside / inside the missing wedge ----------------------------------------------


@pytest.mark.parametrize("shape", [(16, 18, 20), (15, 17, 19), (12, 16, 9)])
@pytest.mark.parametrize("inside", [False, True])
def test_wedge_cc_is_the_cc_of_wedge_filtered_volumes(shape, inside):
    # The paper's definition: eq. (6) after a missing-wedge filter on both volumes. Odd and
    # even widths check the Hermitian weights of the rfft.
    a = _randn(*shape, seed=5)
    b = 0.7 * a + _randn(*shape, seed=6)
    measured = missing_wedge_mask(shape, mw_angle_deg=60).double()
    region = 1 - measured if inside else measured
    expected = correlation_coefficient(_filter(a, region), _filter(b, region))
    metric = cc_inside_wedge if inside else cc_outside_wedge
    assert metric(a, b, mw_angle_deg=60) == pytest.approx(expected, abs=1e-10)


def test_wedge_filtered_copy_is_perfect_outside_and_uncorrelated_inside(volume):
    measured = missing_wedge_mask(volume.shape, mw_angle_deg=60)
    filtered = apply_fourier_mask(volume.double(), measured)
    assert cc_outside_wedge(volume, filtered, mw_angle_deg=60) == pytest.approx(1.0, abs=1e-12)
    # Nothing inside the wedge: undefined, and said so.
    with pytest.raises(ValueError, match="undefined.*no power inside"):
        cc_inside_wedge(volume, filtered, mw_angle_deg=60)
    # The filtered copy plus a faint independent volume: nothing correlates inside.
    faint = filtered + 1e-3 * _randn(*volume.shape, seed=7)
    assert abs(cc_inside_wedge(volume, faint, mw_angle_deg=60)) < 0.05
    assert cc_outside_wedge(volume, faint, mw_angle_deg=60) > 0.999


def test_asymmetric_tilt_range_is_accepted(volume):
    tilts = (-50.0, 65.0)
    measured = missing_wedge_mask(volume.shape, tilt_range_deg=tilts)
    filtered = apply_fourier_mask(volume.double(), measured)
    assert cc_outside_wedge(volume, filtered, tilt_range_deg=tilts) == pytest.approx(1.0)
    # The symmetric ±57.5° wedge of the same size does not match this one.
    assert cc_outside_wedge(volume, filtered, mw_angle_deg=65.0) < 0.999


def test_empty_wedge_is_an_error(volume):
    with pytest.raises(ValueError, match="no Fourier coefficient.*inside"):
        cc_inside_wedge(volume, volume, mw_angle_deg=0)


def test_wedge_cc_needs_exactly_one_wedge(volume):
    with pytest.raises(ValueError, match="exactly one"):
        cc_outside_wedge(volume, volume)
    with pytest.raises(ValueError, match=r"\(d, h, w\)"):
        cc_outside_wedge(volume[None], volume[None], mw_angle_deg=60)


# --- FSC --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(32, 32, 32), (21, 24, 27)])
def test_fsc_of_a_volume_with_itself_is_one(shape):
    v = _randn(*shape, seed=8)
    curve = fsc(v, v, voxel_size_angstrom=4.0)
    assert isinstance(curve, FSCCurve)
    assert curve.fsc.shape == (min(shape) // 2,)
    torch.testing.assert_close(curve.fsc, torch.ones_like(curve.fsc), atol=1e-12, rtol=0)
    assert curve.frequencies_per_angstrom[-1] == pytest.approx(1 / 8.0)  # Nyquist
    assert torch.all(curve.frequencies_per_angstrom.diff() > 0)


def test_fsc_matches_a_full_spectrum_reference():
    # Straight from the definition, on the full (not half) spectrum with numpy.
    shape = (10, 12, 11)
    a, b = _randn(*shape, seed=9).numpy(), _randn(*shape, seed=10).numpy()
    b = b + 0.8 * a
    fa, fb = np.fft.fftn(a), np.fft.fftn(b)
    k = np.meshgrid(*(np.fft.fftfreq(n) for n in shape), indexing="ij")
    radius = np.sqrt(sum(c**2 for c in k))
    n_shells = 5
    shell = np.floor(radius / (0.5 / n_shells) + 0.5).astype(int)
    expected, counts = [], []
    for i in range(1, n_shells + 1):
        sel = shell == i
        num = np.real(fa[sel] * np.conj(fb[sel])).sum()
        den = np.sqrt((np.abs(fa[sel]) ** 2).sum() * (np.abs(fb[sel]) ** 2).sum())
        expected.append(num / den)
        counts.append(sel.sum())
    curve = fsc(a, b)
    np.testing.assert_allclose(curve.fsc.numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(curve.n_coefficients.numpy(), counts)


def test_fsc_is_blind_to_a_filter_constant_on_shells():
    # FSC(s, h * s) = 1 when H > 0 is constant on each shell: FSC compares phases shell by shell.
    n = 32
    s = _randn(n, n, n, seed=11)
    shell_centre = torch.floor(_radius(n) * n + 0.5) / n
    transfer = torch.exp(-(shell_centre**2) / (2 * 0.1**2))
    curve = fsc(s, _filter(s, transfer))
    torch.testing.assert_close(curve.fsc, torch.ones_like(curve.fsc), atol=1e-9, rtol=0)


def test_fsc_matches_the_analytic_curve_of_a_known_snr():
    # a = h * s with H(k) = exp(-k² / (2 σ²)), s white with unit variance; b = a + white noise
    # of unit variance. Then SNR(k) = H(k)² and FSC(k) = 1 / sqrt(1 + 1 / SNR(k)), which
    # crosses t at k_t = σ sqrt(ln((1 - t²) / t²)). The mean of 8 realisations is compared;
    # over 15 seeds its crossings stayed within 2.5% (0.5) and 1.6% (0.143) of k_t, while a
    # frequency axis off by one shell would be 10% and 4% off.
    n, sigma, voxel = 64, 0.15, 2.0
    s = _randn(8, n, n, n, seed=12)
    a = _filter(s, torch.exp(-(_radius(n) ** 2) / (2 * sigma**2)))
    b = a + _randn(8, n, n, n, seed=13)
    curve = fsc(a, b, voxel_size_angstrom=voxel)
    assert curve.fsc.shape == (8, n // 2)
    mean = curve.fsc.mean(dim=0)
    k = curve.frequencies_per_angstrom * voxel  # cycles per voxel
    analytic = 1 / torch.sqrt(1 + torch.exp(k**2 / sigma**2))
    assert (mean - analytic)[3:].abs().max() < 0.04  # the first shells hold few coefficients
    for t, tolerance in ((0.5, 0.04), (0.143, 0.025)):
        k_t = sigma * math.sqrt(math.log((1 - t**2) / t**2))
        expected = voxel / k_t
        assert resolution_at(mean, curve.frequencies_per_angstrom, t) == pytest.approx(
            expected, rel=tolerance
        )


def test_fsc_inside_the_wedge_uses_only_the_wedge():
    n = 32
    a = _randn(n, n, n, seed=14)
    measured = missing_wedge_mask((n, n, n), mw_angle_deg=60).double()
    inside = 1 - measured
    # b equals a inside the wedge and is unrelated noise outside it.
    b = _filter(a, inside) + _filter(_randn(n, n, n, seed=15), measured)
    within = fsc(a, b, mask=inside > 0)
    torch.testing.assert_close(within.fsc, torch.ones_like(within.fsc), atol=1e-12, rtol=0)
    outside = fsc(a, b, mask=measured)
    assert (outside.fsc * outside.n_coefficients.sqrt()).abs().max() < 4.5
    full = fsc(a, b)
    assert torch.all(within.n_coefficients < full.n_coefficients)
    # A 60° wedge holds a third of each shell (more or less, on a grid).
    share = (within.n_coefficients / full.n_coefficients)[4:]
    assert share.min() > 0.25 and share.max() < 0.42


def test_fsc_of_independent_noise_is_near_zero():
    curve = fsc(_randn(48, 48, 48, seed=16), _randn(48, 48, 48, seed=17))
    # Each shell's FSC has a standard deviation of about 1 / sqrt(n_coefficients).
    z = curve.fsc * torch.sqrt(curve.n_coefficients)
    assert z.abs().max() < 4.5


def test_fsc_empty_shells_are_nan_and_zero_power_is_zero():
    n = 16
    a = _randn(n, n, n, seed=18)
    region = torch.zeros(n, n, n // 2 + 1, dtype=torch.bool)
    region[1:, :, :] = True  # leaves the kz = 0 plane out; no shell is empty
    assert not torch.isnan(fsc(a, a, mask=region).fsc).any()
    region = torch.zeros(n, n, n // 2 + 1)
    region[0, 0, 1] = 1.0  # a single frequency: only the first shell holds anything
    curve = fsc(a, a, mask=region)
    assert curve.fsc[0] == pytest.approx(1.0) and torch.isnan(curve.fsc[1:]).all()
    assert curve.n_coefficients[0] == 2  # the stored coefficient and its conjugate twin
    low = _filter(a, (_radius(n) < 0.2).double())  # no power at the high shells
    high = fsc(a, low).fsc[-3:]
    torch.testing.assert_close(high, torch.zeros_like(high))


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    scale=st.floats(min_value=1e-3, max_value=1e3),
    offset=st.floats(min_value=-1e3, max_value=1e3),
    shape=st.tuples(st.integers(4, 11), st.integers(4, 11), st.integers(4, 11)),
)
def test_fsc_is_symmetric_and_invariant_to_scale_and_offset(seed, scale, offset, shape):
    a = _randn(*shape, seed=seed)
    b = a + _randn(*shape, seed=seed + 1)
    reference = fsc(a, b).fsc
    torch.testing.assert_close(fsc(b, a).fsc, reference, atol=1e-12, rtol=0)
    torch.testing.assert_close(fsc(scale * a + offset, b).fsc, reference, atol=1e-9, rtol=0)
    torch.testing.assert_close(fsc(a, scale * b - offset).fsc, reference, atol=1e-9, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"voxel_size_angstrom": 0.0}, "voxel_size_angstrom"),
        ({"voxel_size_angstrom": float("nan")}, "voxel_size_angstrom"),
        ({"n_shells": 0}, "n_shells"),
        ({"mask": torch.ones(8, 8, 8)}, r"rfft shape"),
        ({"mask": -torch.ones(8, 8, 5)}, "non-negative"),
    ],
)
def test_fsc_rejects_bad_options(kwargs, match):
    v = _randn(8, 8, 8, seed=19)
    with pytest.raises(ValueError, match=match):
        fsc(v, v, **kwargs)


def test_fsc_rejects_bad_volumes():
    with pytest.raises(ValueError, match="same shape"):
        fsc(torch.zeros(8, 8, 8), torch.zeros(8, 8, 9))
    with pytest.raises(ValueError, match=r"\(\.\.\., d, h, w\)"):
        fsc(torch.zeros(8, 8), torch.zeros(8, 8))
    with pytest.raises(ValueError, match="too small"):
        fsc(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="finite"):
        fsc(torch.full((4, 4, 4), math.nan), torch.zeros(4, 4, 4))


# --- resolution_at ----------------------------------------------------------------------


def test_resolution_is_interpolated_between_shells():
    values = [1.0, 0.8, 0.4, 0.1]
    freqs = [0.1, 0.2, 0.3, 0.4]
    # 0.5 lies 3/4 of the way from 0.8 to 0.4: f = 0.2 + 0.75 * 0.1.
    assert resolution_at(values, freqs, 0.5) == pytest.approx(1 / 0.275)
    assert resolution_at(values, freqs, 0.143) == pytest.approx(1 / (0.3 + 0.257 / 0.3 * 0.1))
    # Exactly on a shell's value: the crossing is at that shell.
    assert resolution_at(values, freqs, 0.4 + 1e-15) == pytest.approx(1 / 0.3)


def test_resolution_edge_cases():
    freqs = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    never = torch.tensor([1.0, 0.9, 0.8, 0.7], dtype=torch.float64)
    assert resolution_at(never, freqs, 0.143) == pytest.approx(2.5)  # the last shell
    first = torch.tensor([0.1, 0.9, 0.8, 0.7], dtype=torch.float64)
    assert resolution_at(first, freqs, 0.143) == pytest.approx(10.0)  # the first shell
    # NaN shells (empty) are skipped: the crossing is between 0.1 and 0.3.
    gaps = torch.tensor([1.0, math.nan, 0.0, 0.0], dtype=torch.float64)
    assert resolution_at(gaps, freqs, 0.5) == pytest.approx(1 / 0.2)
    # Only the first drop counts, not a later rise above the threshold.
    bounce = [1.0, 0.0, 1.0, 1.0]
    assert resolution_at(bounce, [0.1, 0.2, 0.3, 0.4], 0.5) == pytest.approx(1 / 0.15)


def test_nyquist_when_the_curve_never_drops():
    v = _randn(16, 16, 16, seed=20)
    curve = fsc(v, v, voxel_size_angstrom=7.0)
    assert resolution_at(curve.fsc, curve.frequencies_per_angstrom, 0.143) == pytest.approx(14.0)


@pytest.mark.parametrize(
    ("values", "freqs", "threshold", "match"),
    [
        ([1.0, 0.5], [0.1], 0.5, "equal length"),
        ([1.0, 0.5], [0.2, 0.1], 0.5, "increasing"),
        ([1.0, 0.5], [0.0, 0.1], 0.5, "positive"),
        ([1.0, 0.5], [0.1, 0.2], 1.5, "threshold"),
        ([math.nan, math.nan], [0.1, 0.2], 0.5, "no defined shell"),
    ],
)
def test_resolution_rejects_bad_input(values, freqs, threshold, match):
    with pytest.raises(ValueError, match=match):
        resolution_at(values, freqs, threshold)


# --- particles --------------------------------------------------------------------------


def test_soft_sphere_mask():
    mask = soft_sphere_mask(16, radius_px=4, edge_px=2)
    assert mask.shape == (16, 16, 16)
    assert mask[8, 8, 8] == 1.0 and mask[8, 8, 12] == 1.0  # flat top to the radius
    assert mask[8, 8, 13] == pytest.approx(0.5)  # half-way down the cosine edge
    assert mask[8, 8, 14] == 0.0 and mask[0, 0, 0] == 0.0
    assert soft_sphere_mask(32).max() == 1.0
    with pytest.raises(ValueError, match="no flat top"):
        soft_sphere_mask(4, edge_px=3)


def test_particle_box_starts():
    starts, inside = particle_box_starts(
        [[8, 8, 8], [3.6, 10, 10], [3.4, 10, 10], [8, 8, 13]], box_size_px=8, shape_zyx=(16, 16, 16)
    )
    assert starts.tolist() == [[4, 4, 4], [0, 6, 6], [-1, 6, 6], [4, 4, 9]]
    assert inside.tolist() == [True, True, False, False]
    with pytest.raises(ValueError, match="larger than the volume"):
        particle_box_starts([[8, 8, 8]], box_size_px=17, shape_zyx=(16, 32, 32))
    with pytest.raises(ValueError, match=r"shape \(n, 3\)"):
        particle_box_starts([8, 8, 8], box_size_px=4, shape_zyx=(16, 16, 16))


def _particles_and_volume(seed=21):
    gt = torch.zeros(40, 48, 48, dtype=torch.float64)
    centres = [[12, 12, 12], [20, 30, 20], [28, 16, 34], [3, 3, 3]]  # the last one is cut off
    blob = _randn(16, 16, 16, seed=seed) * soft_sphere_mask(16)
    for z, y, x in centres[:3]:
        gt[z - 8 : z + 8, y - 8 : y + 8, x - 8 : x + 8] += blob
    return gt, centres


def test_particle_fsc_of_the_ground_truth_is_one():
    gt, centres = _particles_and_volume()
    result = particle_fsc(gt, gt, centres, box_size_px=16, voxel_size_angstrom=5, mw_angle_deg=60)
    assert (result.n_particles, result.n_skipped) == (3, 1)
    for curve in (result.overall, result.inside_wedge):
        torch.testing.assert_close(curve.fsc, torch.ones_like(curve.fsc), atol=1e-12, rtol=0)
        assert curve.frequencies_per_angstrom[-1] == pytest.approx(0.1)


def test_particle_fsc_sees_noise_and_a_missing_wedge():
    gt, centres = _particles_and_volume()
    options = {"box_size_px": 16, "mw_angle_deg": 60}
    less = particle_fsc(gt + 0.3 * _randn(*gt.shape, seed=22), gt, centres, **options)
    more = particle_fsc(gt + 1.0 * _randn(*gt.shape, seed=22), gt, centres, **options)
    assert torch.all(less.overall.fsc < 0.99) and torch.all(more.overall.fsc < less.overall.fsc)
    assert torch.all(more.inside_wedge.fsc < less.inside_wedge.fsc)
    # A missing-wedge filter keeps the particles outside the wedge but nothing inside it.
    wedged = _filter(gt, missing_wedge_mask(gt.shape, mw_angle_deg=60).double())
    lost = particle_fsc(wedged, gt, centres, **options)
    assert torch.all(lost.overall.fsc > 0.7)
    torch.testing.assert_close(lost.inside_wedge.fsc, torch.zeros_like(lost.inside_wedge.fsc))
    # Filtered in float32, the wedge holds round-off only: still nothing.
    wedged32 = apply_fourier_mask(gt.float(), missing_wedge_mask(gt.shape, mw_angle_deg=60))
    lost32 = particle_fsc(wedged32, gt, centres, **options)
    assert torch.all(lost32.inside_wedge.fsc == 0)
    assert particle_fsc(gt, gt, centres, box_size_px=16).inside_wedge is None


def test_particle_fsc_rejects_particles_outside():
    gt, _ = _particles_and_volume()
    with pytest.raises(ValueError, match="none of the 2 particles"):
        particle_fsc(gt, gt, [[0, 0, 0], [39, 47, 47]], box_size_px=16)


# --- evaluate_volume --------------------------------------------------------------------


def test_evaluate_volume_keys_and_values():
    gt, centres = _particles_and_volume()
    noisy = gt + 0.1 * _randn(*gt.shape, seed=23)
    result = evaluate_volume(
        noisy,
        gt,
        mw_angle_deg=60,
        voxel_size_angstrom=10.0,
        particles_zyx=centres,
        box_size_px=16,
    )
    expected = {
        "cc",
        "cc_outside_wedge",
        "cc_inside_wedge",
        "fsc_0143_angstrom",
        "fsc_05_angstrom",
        "fsc_inside_wedge_0143_angstrom",
        "particle_fsc_0143_angstrom",
        "particle_fsc_05_angstrom",
        "particle_fsc_inside_wedge_0143_angstrom",
        "n_particles",
    }
    assert expected <= set(result.metrics)
    m = result.metrics
    assert m["cc"] == pytest.approx(correlation_coefficient(noisy, gt))
    assert m["cc_outside_wedge"] == pytest.approx(cc_outside_wedge(noisy, gt, mw_angle_deg=60))
    assert m["cc_inside_wedge"] == pytest.approx(cc_inside_wedge(noisy, gt, mw_angle_deg=60))
    assert m["n_particles"] == 3 and m["n_particles_skipped"] == 1
    for key in expected - {"cc", "cc_outside_wedge", "cc_inside_wedge", "n_particles"}:
        assert 20.0 <= m[key] <= 40 * 10.0  # between Nyquist and the box
    assert m["fsc_0143_angstrom"] <= m["fsc_05_angstrom"]
    assert set(result.curves) == {
        "fsc",
        "fsc_inside_wedge",
        "particle_fsc",
        "particle_fsc_inside_wedge",
    }
    whole = fsc(noisy, gt, voxel_size_angstrom=10.0)
    torch.testing.assert_close(result.curves["fsc"].fsc, whole.fsc)


def test_evaluate_volume_reports_undefined_metrics_as_nan():
    gt, _ = _particles_and_volume()
    wedged = apply_fourier_mask(gt, missing_wedge_mask(gt.shape, mw_angle_deg=60))
    m = evaluate_volume(wedged, gt, mw_angle_deg=60, voxel_size_angstrom=1.0).metrics
    assert math.isnan(m["cc_inside_wedge"])
    assert m["cc_outside_wedge"] == pytest.approx(1.0)
    # No power inside the wedge: its FSC is 0 everywhere, the coarsest resolution.
    assert m["fsc_inside_wedge_0143_angstrom"] == pytest.approx(40.0)
    assert math.isnan(
        evaluate_volume(0 * gt, gt, mw_angle_deg=60, voxel_size_angstrom=1).metrics["cc"]
    )
    with pytest.raises(ValueError, match="box_size_px is required"):
        evaluate_volume(gt, gt, mw_angle_deg=60, voxel_size_angstrom=1.0, particles_zyx=[[8] * 3])
    with pytest.raises(ValueError, match="missing wedge"):
        evaluate_volume(gt, gt, voxel_size_angstrom=1.0)


# --- particle lists ---------------------------------------------------------------------


def test_read_particles_from_the_simulator_table(tmp_path):
    path = tmp_path / "particles.csv"
    path.write_text(
        "particle,template,z_px,y_px,x_px,phi_deg,theta_deg,psi_deg,box_px\n"
        "0,ribosome,10.5,20,30,0,90,180,24\n"
        "1,proteasome,11,21,31.25,10,20,30,16\n"
    )
    listed = read_particles(path)
    np.testing.assert_array_equal(listed.centres_zyx, [[10.5, 20, 30], [11, 21, 31.25]])
    np.testing.assert_array_equal(listed.box_px, [24, 16])


@pytest.mark.parametrize(
    "text",
    [
        "# z y x\n1 2 3\n\n4.5 5 6\n",
        "1,2,3\n4.5,5,6\n",
        "z_px x_px y_px\n1 3 2\n4.5 6 5\n",
    ],
)
def test_read_plain_particle_lists(tmp_path, text):
    path = tmp_path / "particles.txt"
    path.write_text(text)
    listed = read_particles(path)
    np.testing.assert_array_equal(listed.centres_zyx, [[1, 2, 3], [4.5, 5, 6]])
    assert listed.box_px is None


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "no particles"),
        ("particle,z,y,x\n0,1,2,3\n", "no column z_px, y_px, x_px"),
        ("z_px,y_px,x_px\n", "no particles"),
        ("z_px,y_px,x_px\n1,2\n", "line 2 has 2 fields"),
        ("z_px,y_px,x_px\n1,two,3\n", "line 2, column y_px: 'two' is not a number"),
        ("z_px,y_px,x_px,box_px\n1,2,3,7.5\n", "box_px.*whole number"),
        ("1 2 3\n4 5\n", "line 2 has 2 values"),
        ("1 2 3\n4 5 nan\n", "line 2, column x"),
    ],
)
def test_read_particles_rejects_bad_files(tmp_path, text, match):
    path = tmp_path / "particles.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=match) as err:
        read_particles(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_read_particles_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_particles(tmp_path / "absent.csv")


# --- FSC figure -------------------------------------------------------------------------


def test_fsc_curve_figure_draws_one_panel_per_kind_and_one_line_per_volume(tmp_path):
    from deepdewedge.evaluate.figures import fsc_curve_figure

    freqs = np.linspace(0.01, 0.05, 5)
    values = np.array([1.0, 0.8, math.nan, 0.3, 0.1])
    fig = fsc_curve_figure(
        {
            "tomogram": {"FBP": (freqs, values), "DDW": (torch.from_numpy(freqs), values)},
            "particles": {"FBP": (freqs, values)},
        }
    )
    assert [ax.get_title() for ax in fig.axes] == ["tomogram", "particles"]
    lines = [line for line in fig.axes[0].get_lines() if line.get_label() in ("FBP", "DDW")]
    assert len(lines) == 2 and len(lines[0].get_xdata()) == 4  # the NaN shell is skipped
    fig.savefig(tmp_path / "fsc.png")
    assert (tmp_path / "fsc.png").read_bytes().startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="4 frequencies but 5"):
        fsc_curve_figure({"t": {"a": (freqs[:4], values)}})
    with pytest.raises(ValueError, match="non-empty"):
        fsc_curve_figure({})
