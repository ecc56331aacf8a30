import math

import pytest
import torch

from deepdewedge.evaluate.metrics import correlation_coefficient
from deepdewedge.simulate import (
    add_noise,
    project,
    simulate_phantom,
    simulate_tomogram,
    split_even_odd,
)


def _gaussian(shape, centre_zyx, sigma):
    axes = [torch.arange(n, dtype=torch.float64) - (n - 1) / 2 for n in shape]
    z, y, x = torch.meshgrid(*axes, indexing="ij")
    cz, cy, cx = centre_zyx
    return torch.exp(-((z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma**2))


# --- project -------------------------------------------------------------------------------


@pytest.mark.parametrize("angle_deg", [-60.0, -35.0, 0.0, 20.0, 45.0, 60.0])
def test_projection_moves_with_the_documented_handedness(angle_deg):
    # x' = x cos θ + z sin θ: a blob above the centre moves to larger x for positive angles.
    shape = (32, 8, 64)
    z0, x0 = 6.0, 4.0
    blob = _gaussian(shape, (z0, 0.0, x0), 1.5)
    profile = project(blob, torch.tensor([angle_deg]))[0].sum(0)
    x = torch.arange(64, dtype=torch.float64) - 31.5
    centroid = float((profile * x).sum() / profile.sum())
    theta = math.radians(angle_deg)
    assert centroid == pytest.approx(x0 * math.cos(theta) + z0 * math.sin(theta), abs=0.02)


def test_projection_conserves_mass():
    blob = _gaussian((32, 8, 64), (3.0, 0.0, -5.0), 1.5)
    angles = torch.arange(-60.0, 60.1, 5.0)
    mass = project(blob, angles).sum((1, 2))
    torch.testing.assert_close(mass, torch.full_like(mass, float(blob.sum())), rtol=5e-3, atol=0)


def test_projection_at_zero_tilt_sums_along_z():
    volume = torch.rand((10, 6, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        project(volume, torch.zeros(1))[0], volume.sum(0), rtol=1e-5, atol=1e-5
    )


def test_projection_width_is_a_central_crop():
    volume = torch.rand((16, 4, 40), generator=torch.Generator().manual_seed(0))
    angles = torch.tensor([-50.0, 10.0, 30.0])
    full = project(volume, angles)
    narrow = project(volume, angles, width=20)
    wide = project(volume, angles, width=60)
    assert narrow.shape == (3, 4, 20) and wide.shape == (3, 4, 60)
    torch.testing.assert_close(narrow, full[..., 10:30])
    torch.testing.assert_close(wide[..., 10:50], full)


def test_projection_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        project(torch.zeros(4, 4), torch.zeros(1))
    with pytest.raises(ValueError, match="90"):
        project(torch.zeros(4, 4, 4), torch.tensor([90.0]))
    with pytest.raises(ValueError, match="width"):
        project(torch.zeros(4, 4, 4), torch.zeros(1), width=0)


# --- add_noise -----------------------------------------------------------------------------


@pytest.mark.parametrize("snr", [0.25, 1.0, 4.0])
def test_add_noise_reaches_the_requested_snr(snr):
    signal = project(
        simulate_phantom((16, 32, 32), generator=torch.Generator().manual_seed(0)),
        torch.arange(-60.0, 60.1, 6.0),
    )
    noisy = add_noise(signal, snr=snr, generator=torch.Generator().manual_seed(1))
    measured = float(signal.double().var() / (noisy - signal).double().var())
    assert measured == pytest.approx(snr, rel=0.05)
    assert noisy.shape == signal.shape and noisy.dtype == signal.dtype


def test_add_noise_is_reproducible_and_independent_across_seeds():
    signal = torch.rand((4, 8, 8), generator=torch.Generator().manual_seed(0))
    a = add_noise(signal, snr=1.0, generator=torch.Generator().manual_seed(5))
    b = add_noise(signal, snr=1.0, generator=torch.Generator().manual_seed(5))
    c = add_noise(signal, snr=1.0, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("snr", [0.0, -1.0, math.inf, math.nan])
def test_add_noise_rejects_bad_snr(snr):
    with pytest.raises(ValueError, match="snr"):
        add_noise(torch.rand(2, 3, 3), snr=snr, generator=torch.Generator())


def test_add_noise_rejects_constant_signal():
    with pytest.raises(ValueError, match="constant"):
        add_noise(torch.ones(2, 3, 3), snr=1.0, generator=torch.Generator())


# --- split_even_odd ------------------------------------------------------------------------


def _tagged_series(angles):
    # Projection i is filled with the value i, so the split can be traced.
    return torch.arange(len(angles), dtype=torch.float32)[:, None, None].expand(-1, 2, 3)


def test_split_sequential_alternates_tilts():
    angles = torch.arange(-60.0, 60.1, 2.0)
    series = _tagged_series(angles)
    ts0, a0, ts1, a1 = split_even_odd(series, angles)
    torch.testing.assert_close(a0, angles[0::2])
    torch.testing.assert_close(a1, angles[1::2])
    torch.testing.assert_close(ts0[:, 0, 0], torch.arange(0, 61, 2, dtype=torch.float32))
    torch.testing.assert_close(ts1[:, 0, 0], torch.arange(1, 61, 2, dtype=torch.float32))


def test_split_default_order_sorts_by_angle():
    angles = torch.tensor([0.0, -20.0, 20.0, -40.0, 40.0])  # stored in dose-symmetric order
    series = _tagged_series(angles)
    _, a0, _, a1 = split_even_odd(series, angles)
    assert sorted(a0.tolist()) == [-40.0, 0.0, 40.0]
    assert sorted(a1.tolist()) == [-20.0, 20.0]


def test_split_respects_the_acquisition_order():
    angles = torch.arange(-30.0, 30.1, 10.0)  # indices 0..6, 0° is index 3
    series = _tagged_series(angles)
    dose_symmetric = torch.tensor([3, 4, 2, 1, 5, 6, 0])  # 0, +10, -10, -20, +20, +30, -30
    ts0, a0, ts1, a1 = split_even_odd(series, angles, acquisition_order=dose_symmetric)
    index0, index1 = ts0[:, 0, 0].long().tolist(), ts1[:, 0, 0].long().tolist()
    assert index0 == [0, 2, 3, 5]  # acquired 1st, 3rd, 5th, 7th
    assert index1 == [1, 4, 6]
    assert set(index0).isdisjoint(index1) and sorted(index0 + index1) == list(range(7))
    torch.testing.assert_close(a0, angles[index0])
    torch.testing.assert_close(a1, angles[index1])


@pytest.mark.parametrize(
    "order", [torch.tensor([0, 1, 1]), torch.tensor([0, 1]), torch.tensor([0.0, 1.0, 2.0])]
)
def test_split_rejects_bad_acquisition_order(order):
    with pytest.raises(ValueError, match="acquisition_order"):
        split_even_odd(torch.zeros(3, 2, 2), torch.zeros(3), acquisition_order=order)


def test_split_rejects_mismatched_angles():
    with pytest.raises(ValueError, match="angles"):
        split_even_odd(torch.zeros(3, 2, 2), torch.zeros(4))


# --- simulate_phantom ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom():
    return simulate_phantom((32, 48, 48), generator=torch.Generator().manual_seed(7))


def test_phantom_is_reproducible(phantom):
    again = simulate_phantom((32, 48, 48), generator=torch.Generator().manual_seed(7))
    other = simulate_phantom((32, 48, 48), generator=torch.Generator().manual_seed(8))
    assert phantom.shape == (32, 48, 48) and phantom.dtype == torch.float32
    torch.testing.assert_close(phantom, again, rtol=0, atol=0)
    assert not torch.equal(phantom, other)


def test_phantom_matter_stays_in_the_slab():
    volume = simulate_phantom(
        (32, 48, 48), slab_thickness_px=20, generator=torch.Generator().manual_seed(3)
    )
    assert torch.all(volume[:6] == 0) and torch.all(volume[26:] == 0)
    assert torch.all(volume[6:26] > 0)  # ice everywhere in the slab
    assert torch.all(volume >= 0)


def test_phantom_has_structure_beyond_ice(phantom):
    matter = phantom[phantom > 0]
    assert float(matter.min()) == pytest.approx(0.15, abs=1e-6)  # bare ice
    assert (matter > 0.5).float().mean() > 0.01


def test_beads_are_the_densest():
    def make(**counts):
        return simulate_phantom((32, 64, 64), generator=torch.Generator().manual_seed(0), **counts)

    beads_only = make(n_blobs=0, n_membranes=0)
    without_beads = make(n_beads=0)
    assert float(beads_only.max()) > 1.5 * float(without_beads.max())
    assert float(make().max()) == pytest.approx(float(beads_only.max()))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shape_zyx": (8, 8)}, "shape_zyx"),
        ({"shape_zyx": (8, 8, 0)}, "shape_zyx"),
        ({"shape_zyx": (8, 8, 8), "slab_thickness_px": 9}, "slab_thickness_px"),
        ({"shape_zyx": (8, 8, 8), "n_blobs": -1}, "n_blobs"),
    ],
)
def test_phantom_rejects_bad_arguments(kwargs, match):
    shape = kwargs.pop("shape_zyx")
    with pytest.raises(ValueError, match=match):
        simulate_phantom(shape, **kwargs)


# --- simulate_tomogram ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def simulated():
    return simulate_tomogram(
        (32, 48, 48), tilt_step_deg=3.0, snr=0.5, generator=torch.Generator().manual_seed(0)
    )


def test_simulate_tomogram_shapes(simulated):
    assert set(simulated) == {"ground_truth", "tomo0", "tomo1", "tomo_full", "tilt_angles_deg"}
    for key in ("ground_truth", "tomo0", "tomo1", "tomo_full"):
        assert simulated[key].shape == (32, 48, 48)
        assert simulated[key].dtype == torch.float32
    torch.testing.assert_close(simulated["tilt_angles_deg"], torch.arange(-60.0, 60.1, 3.0))


def test_simulate_tomogram_halves_are_consistent(simulated):
    tomo0, tomo1, full = simulated["tomo0"], simulated["tomo1"], simulated["tomo_full"]
    assert not torch.allclose(tomo0, tomo1)
    torch.testing.assert_close(full, 0.5 * (tomo0 + tomo1), rtol=1e-4, atol=1e-4)
    ratio = float(tomo0.std() / tomo1.std())
    assert 0.8 < ratio < 1.25


def test_simulate_tomogram_full_beats_halves(simulated):
    truth = simulated["ground_truth"]
    cc0 = correlation_coefficient(simulated["tomo0"], truth)
    cc1 = correlation_coefficient(simulated["tomo1"], truth)
    cc_full = correlation_coefficient(simulated["tomo_full"], truth)
    assert cc0 > 0.05 and cc1 > 0.05
    assert cc_full > max(cc0, cc1)


def test_simulate_tomogram_rejects_bad_tilts():
    with pytest.raises(ValueError, match="tilt_range_deg"):
        simulate_tomogram((8, 8, 8), tilt_range_deg=(-90.0, 60.0))
    with pytest.raises(ValueError, match="tilt_step_deg"):
        simulate_tomogram((8, 8, 8), tilt_step_deg=0.0)
    with pytest.raises(ValueError, match="snr"):
        simulate_tomogram((8, 8, 8), snr=-1.0)
    with pytest.raises(ValueError, match="filter"):
        simulate_tomogram((8, 8, 8), filter="shepp")
