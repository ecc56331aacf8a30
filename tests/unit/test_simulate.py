import math

import pytest
import torch

from deepdewedge.evaluate.metrics import correlation_coefficient
from deepdewedge.io.tilts import read_mdoc
from deepdewedge.pipeline.simulation import SimulateConfig, mdoc_text
from deepdewedge.reconstruct.backproject import weighted_backprojection
from deepdewedge.reconstruct.ctf import phase_flip_tilt_series
from deepdewedge.rotation import rotate_and_crop, sample_rotations
from deepdewedge.simulate import (
    acquisition_positions,
    add_noise,
    apply_ctf,
    euler_zyz_to_matrix,
    lateral_padding_px,
    load_templates,
    matrix_to_euler_zyz,
    project,
    simulate_dataset,
    simulate_frames,
    simulate_phantom,
    simulate_sample,
    simulate_tomogram,
    split_even_odd,
    template_names,
    tilt_angles,
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


def test_simulate_tomogram_full_filter_changes_only_the_full_tomogram(simulated):
    sirt = simulate_tomogram(
        (32, 48, 48),
        tilt_step_deg=3.0,
        snr=0.5,
        full_filter="sirt",
        generator=torch.Generator().manual_seed(0),
    )
    for key in ("ground_truth", "tomo0", "tomo1"):
        torch.testing.assert_close(sirt[key], simulated[key], rtol=0, atol=0)
    assert not torch.allclose(sirt["tomo_full"], simulated["tomo_full"], atol=1e-2)
    assert abs(float(sirt["tomo_full"].mean())) < 1e-4
    assert float(sirt["tomo_full"].std()) == pytest.approx(1.0, rel=1e-4)


def test_simulate_tomogram_rejects_bad_tilts():
    with pytest.raises(ValueError, match="tilt_range_deg"):
        simulate_tomogram((8, 8, 8), tilt_range_deg=(-90.0, 60.0))
    with pytest.raises(ValueError, match="tilt_step_deg"):
        simulate_tomogram((8, 8, 8), tilt_step_deg=0.0)
    with pytest.raises(ValueError, match="snr"):
        simulate_tomogram((8, 8, 8), snr=-1.0)
    with pytest.raises(ValueError, match="filter"):
        simulate_tomogram((8, 8, 8), filter="shepp")
    with pytest.raises(ValueError, match="full_filter"):
        simulate_tomogram((8, 8, 8), full_filter="shepp")


# --- templates -----------------------------------------------------------------------------


def _centred_axes(n):
    axis = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
    return torch.meshgrid(axis, axis, axis, indexing="ij")


def test_templates_are_shipped_and_on_the_documented_scale():
    names = template_names()
    assert len(names) == 5
    templates = load_templates(10.0)
    assert list(templates) == names
    for t in templates.values():
        density = t.density.double()
        assert t.box_px % 2 == 1 and density.shape == (t.box_px,) * 3
        assert 0.8 < float(density.max()) < 1.2  # a protein's interior reads about 1
        assert float(density.min()) >= 0.0
        # The centre of mass sits on the central voxel and the molecule fits in any orientation.
        z, y, x = _centred_axes(t.box_px)
        com = [float((density * c).sum() / density.sum()) for c in (z, y, x)]
        assert max(abs(c) for c in com) < 0.5
        assert 2 * t.radius_px + 1 <= t.box_px
        assert 3.0 < t.radius_px * t.voxel_size_angstrom / 10 < 11.0  # 3-11 nm radius


def test_templates_resample_to_other_voxel_sizes_keeping_mass_and_size():
    base = load_templates(10.0, names=["cftr", "cxcr4_nb"])
    for voxel in (5.0, 14.0):
        other = load_templates(voxel, names=["cftr", "cxcr4_nb"])
        for name, t in other.items():
            ref = base[name]
            mass = float(t.density.double().sum()) * voxel**3
            ref_mass = float(ref.density.double().sum()) * 10.0**3
            assert mass == pytest.approx(ref_mass, rel=0.03)
            radius = t.radius_px * voxel
            assert radius == pytest.approx(ref.radius_px * 10.0, rel=0.25)
            assert t.box_px % 2 == 1 and 2 * t.radius_px + 1 <= t.box_px


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"voxel_size_angstrom": 0.0}, "voxel_size_angstrom"),
        ({"voxel_size_angstrom": math.nan}, "voxel_size_angstrom"),
        ({"voxel_size_angstrom": 10.0, "names": ["ribosome"]}, "ribosome"),
    ],
)
def test_templates_reject_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_templates(**kwargs)


# --- orientations --------------------------------------------------------------------------


def test_euler_angles_round_trip():
    rotations = sample_rotations(
        500, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    angles = matrix_to_euler_zyz(rotations)
    assert float(angles[:, 1].min()) >= 0.0 and float(angles[:, 1].max()) <= 180.0
    assert float(angles[:, [0, 2]].abs().max()) <= 180.0
    torch.testing.assert_close(euler_zyz_to_matrix(angles), rotations, rtol=0, atol=1e-10)


def test_euler_angles_follow_the_documented_convention():
    # phi = 90° alone turns the x axis onto y (right-handed about z); zyx vectors.
    x_axis, y_axis, z_axis = (
        torch.tensor(v, dtype=torch.float64) for v in ([0, 0, 1], [0, 1, 0], [1, 0, 0])
    )
    r = euler_zyz_to_matrix(torch.tensor([90.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(r @ x_axis, y_axis)
    # theta = 90° alone turns z onto x (right-handed about y).
    r = euler_zyz_to_matrix(torch.tensor([0.0, 90.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(r @ z_axis, x_axis)
    # psi acts first: psi = 90°, theta = 90° takes x to y (psi) then keeps y (theta about y).
    r = euler_zyz_to_matrix(torch.tensor([0.0, 90.0, 90.0], dtype=torch.float64))
    torch.testing.assert_close(r @ x_axis, y_axis)


# --- sample --------------------------------------------------------------------------------

SAMPLE_SHAPE = (40, 96, 96)


@pytest.fixture(scope="module")
def templates10():
    return load_templates(10.0)


@pytest.fixture(scope="module")
def sample(templates10):
    return simulate_sample(
        SAMPLE_SHAPE,
        templates10,
        n_particles=8,
        ice_thickness_px=32,
        n_vesicles=1,
        n_sheets=1,
        n_beads=2,
        lateral_padding_px=24,
        generator=torch.Generator().manual_seed(5),
    )


def _cut(volume, centre, n):
    # Zero-padded, so that boxes reaching past the borders can be cut out whole.
    half = (n - 1) // 2
    padded = torch.nn.functional.pad(volume, (half,) * 6)
    z, y, x = centre
    return padded[z : z + n, y : y + n, x : x + n]


def _masked_cc(a, b, mask):
    a, b = a[mask].double(), b[mask].double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_sample_records_particles_where_and_how_they_are(sample, templates10):
    gt = sample.ground_truth
    assert gt.shape == SAMPLE_SHAPE
    assert len(sample.particles) == 8 and sample.n_particles_outside > 0
    right, wrong = [], []
    generator = torch.Generator().manual_seed(1)
    for p in sample.particles:
        t = templates10[p.template]
        assert p.box_px == t.box_px
        z, y, x = p.centre_zyx_px
        half = max(u.box_px for u in templates10.values()) // 2  # the largest box fits
        assert all(half <= c < n - half for c, n in zip((z, y, x), SAMPLE_SHAPE, strict=True))
        cut = _cut(gt, p.centre_zyx_px, t.box_px)
        zz, yy, xx = _centred_axes(t.box_px)
        ball = zz**2 + yy**2 + xx**2 <= t.radius_px**2
        # The density's centre of mass is the recorded centre.
        weights = cut.double() * ball
        com = [float((weights * c).sum() / weights.sum()) for c in (zz, yy, xx)]
        assert max(abs(c) for c in com) < 0.35, (p, com)
        # The template turned by the recorded angles matches the cut-out; another turn does not.
        rotation = euler_zyz_to_matrix(torch.tensor(p.euler_zyz_deg))[None].float()
        expected = rotate_and_crop(t.density[None], rotation, t.box_px)[0]
        right.append(_masked_cc(cut, expected, ball))
        other = sample_rotations(1, generator=generator)
        wrong.append(_masked_cc(cut, rotate_and_crop(t.density[None], other, t.box_px)[0], ball))
    assert min(right) > 0.99
    # Blobs at 10 Å still overlap in a random orientation, but far less well.
    assert max(wrong) < 0.9 and sum(wrong) / len(wrong) < 0.75


def test_sample_objects_do_not_overlap(sample):
    z0, z1 = sample.ice_z_range_px
    centres = torch.tensor([p.centre_zyx_px for p in sample.particles], dtype=torch.float64)
    radii = torch.tensor([p.radius_px for p in sample.particles], dtype=torch.float64)
    distance = torch.cdist(centres, centres)
    needed = radii[:, None] + radii[None, :]
    off_diagonal = ~torch.eye(len(radii), dtype=torch.bool)
    assert bool((distance[off_diagonal] >= needed[off_diagonal]).all())
    # Every particle lies in the ice.
    assert bool(((centres[:, 0] - radii >= z0) & (centres[:, 0] + radii <= z1 - 1)).all())


def test_sample_has_ice_membranes_and_gold(sample):
    volume = sample.volume
    z0, z1 = sample.ice_z_range_px
    assert volume.shape == (40, 96, 96 + 2 * 24)
    assert torch.all(volume[:z0] == 0) and torch.all(volume[z1:] == 0)
    assert float(volume[z0:z1].min()) >= 0.15 - 1e-3  # ice everywhere in the slab
    assert float(volume.max()) == pytest.approx(5.0)  # gold


def test_ground_truth_is_the_field_of_view_above_the_ice(sample):
    z0, z1 = sample.ice_z_range_px
    gt = sample.ground_truth
    field = sample.volume[..., 24:-24]
    torch.testing.assert_close(gt[z0:z1] + 0.15, field[z0:z1])
    assert torch.equal(gt[:z0], field[:z0]) and torch.equal(gt[z1:], field[z1:])
    assert float(gt.min()) >= -1e-6 and float(gt.median()) == pytest.approx(0.0, abs=1e-6)


def test_sample_is_reproducible(templates10):
    kwargs = {"n_particles": 4, "n_vesicles": 1, "n_sheets": 0, "n_beads": 1}
    a = simulate_sample(
        (32, 48, 48), templates10, generator=torch.Generator().manual_seed(2), **kwargs
    )
    b = simulate_sample(
        (32, 48, 48), templates10, generator=torch.Generator().manual_seed(2), **kwargs
    )
    assert torch.equal(a.volume, b.volume)
    assert [p.euler_zyz_deg for p in a.particles] == [p.euler_zyz_deg for p in b.particles]


def test_sample_rejects_ice_thinner_than_a_particle(templates10):
    with pytest.raises(ValueError, match="ice_thickness_px"):
        simulate_sample((16, 48, 48), templates10, n_particles=1, generator=torch.Generator())


# --- acquisition ---------------------------------------------------------------------------


def test_tilt_angles_and_acquisition_order():
    angles = tilt_angles(-6.0, 6.0, 3.0)
    torch.testing.assert_close(
        angles, torch.tensor([-6.0, -3.0, 0.0, 3.0, 6.0], dtype=torch.float64)
    )
    # Dose-symmetric, groups of two, positive side first: 0, 3, 6, -3, -6.
    assert acquisition_positions(angles, scheme="dose-symmetric").tolist() == [4, 3, 0, 1, 2]
    assert acquisition_positions(angles, scheme="sequential").tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="90"):
        tilt_angles(-90.0, 60.0, 3.0)
    with pytest.raises(ValueError, match="step"):
        tilt_angles(-60.0, 60.0, 0.0)


def test_frames_sum_to_the_requested_snr():
    clean = project(
        simulate_phantom((16, 32, 32), generator=torch.Generator().manual_seed(0)),
        torch.arange(-60.0, 60.1, 6.0),
    )
    frames = simulate_frames(clean, n_frames=6, snr=0.5, generator=torch.Generator().manual_seed(1))
    assert frames.shape == (clean.shape[0], 6, 32, 32)
    noise = frames.sum(1).double() - clean.double()
    assert float(clean.double().var() / noise.var()) == pytest.approx(0.5, rel=0.05)
    # Even and odd frame sums carry independent noise.
    even = frames[:, 0::2].sum(1).double() - clean.double() / 2
    odd = frames[:, 1::2].sum(1).double() - clean.double() / 2
    assert abs(float(torch.corrcoef(torch.stack([even.ravel(), odd.ravel()]))[0, 1])) < 0.03
    with pytest.raises(ValueError, match="n_frames"):
        simulate_frames(clean, n_frames=1, snr=1.0, generator=torch.Generator())


def test_ctf_keeps_matter_bright():
    angles = torch.tensor([0.0, 60.0])
    clean = project(
        simulate_phantom((16, 24, 160), n_beads=0, generator=torch.Generator().manual_seed(0)),
        angles,
    )
    images = apply_ctf(clean, angles, pixel_size_angstrom=10.0, defocus_um=4.0)
    # -CTF keeps the sign of the low frequencies, where most of the density's power is.
    assert correlation_coefficient(images, clean) > 0.5


def test_ctf_defocus_gradient_matches_the_phase_flip_convention():
    # White images carry all frequencies, so a wrong CTF phase shows.
    angles = torch.tensor([0.0, 60.0])
    white = torch.randn(2, 64, 256, generator=torch.Generator().manual_seed(0))
    microscope = {"pixel_size_angstrom": 2.0, "voltage_kv": 300.0}
    defocus = torch.full((2,), 2.0)
    images = apply_ctf(white, angles, defocus_um=defocus, **microscope)
    right = phase_flip_tilt_series(
        images, angles, defocus, spherical_aberration_mm=2.7, amplitude_contrast=0.07, **microscope
    )
    wrong = phase_flip_tilt_series(
        images,
        angles,
        defocus,
        spherical_aberration_mm=2.7,
        amplitude_contrast=0.07,
        defocus_handedness=-1,
        **microscope,
    )
    assert correlation_coefficient(images[0], white[0]) < 0.05  # the CTF scrambles the signs
    assert correlation_coefficient(right[0], white[0]) > 0.85  # phase flipping restores them
    # At 60° the defocus changes across the image; only the matching gradient undoes it.
    cc_right = correlation_coefficient(right[1], white[1])
    cc_wrong = correlation_coefficient(wrong[1], white[1])
    assert cc_right > 0.6 and cc_right > cc_wrong + 0.15


# --- a whole data set ----------------------------------------------------------------------


def _small_dataset(**kwargs):
    options = {
        "voxel_size_angstrom": 20.0,
        "n_particles": 8,
        "n_vesicles": 1,
        "n_sheets": 1,
        "n_beads": 1,
        "tilt_step_deg": 4.0,
        "generator": torch.Generator().manual_seed(0),
    }
    return simulate_dataset((32, 48, 48), **{**options, **kwargs})


@pytest.mark.parametrize(
    "kwargs", [{"snr": 0.3}, {"snr": 2.0, "ctf": True}, {"snr": 0.5, "n_frames": 4}]
)
def test_dataset_reaches_the_requested_snr(kwargs):
    ds = _small_dataset(**kwargs)
    clean = ds.clean_tilt_series.double()
    noise = ds.tilt_series.double() - clean
    assert float(clean.var() / noise.var()) == pytest.approx(kwargs["snr"], rel=0.05)
    if "n_frames" in kwargs:
        torch.testing.assert_close(ds.even_frames + ds.odd_frames, ds.tilt_series)
    else:
        assert ds.even_frames is None and ds.odd_frames is None
    assert (ds.defocus_um is not None) == bool(kwargs.get("ctf"))


def test_dataset_ground_truth_has_the_geometry_of_its_reconstruction():
    ds = _small_dataset(snr=1e4, tilt_step_deg=2.0)
    d = ds.ground_truth.shape[0]
    tomogram = weighted_backprojection(
        ds.tilt_series, ds.tilt_angles_deg, thickness=d, filter="ramp"
    )
    assert tomogram.shape == ds.ground_truth.shape
    inner = (slice(2, -2), slice(None), slice(2, -2))
    scores = {}
    for dz in (-1, 0, 1):
        for dx in (-1, 0, 1):
            shifted = torch.roll(tomogram, (dz, dx), (0, 2))
            scores[dz, dx] = correlation_coefficient(shifted[inner], ds.ground_truth[inner])
    assert scores[0, 0] > 0.55
    assert max(scores, key=scores.get) == (0, 0)


def test_lateral_padding_covers_the_tilted_rays():
    # Reach of the edge ray at 60° through 24 px of ice (+1 px each side), 48 px wide field:
    # (23.5 + 13 sin 60°) / cos 60° = 69.5 from the axis, i.e. 46.0 beyond the field, + 2.
    assert lateral_padding_px((32, 48, 48), ice_thickness_px=24, max_tilt_deg=60.0) == 49
    assert lateral_padding_px((32, 48, 48), ice_thickness_px=24, max_tilt_deg=89.9) == 4 * 80


def test_mdoc_round_trips_the_acquisition_order(tmp_path):
    for scheme in ("dose-symmetric", "sequential"):
        for ctf in (False, True):
            ds = _small_dataset(acquisition_scheme=scheme, ctf=ctf, snr=1.0, n_particles=0)
            config = SimulateConfig(acquisition_scheme=scheme, ctf=ctf, voxel_size_angstrom=20.0)
            path = tmp_path / f"{scheme}-{ctf}.mdoc"
            path.write_text(mdoc_text(ds, config, image_file="ts.mrc"))
            mdoc = read_mdoc(path)
            assert mdoc.angles_deg.tolist() == pytest.approx(ds.tilt_angles_deg.tolist())
            assert mdoc.acquisition_order.tolist() == ds.acquisition_positions.tolist()
            first = [float(ds.tilt_angles_deg[i]) for i in mdoc.acquisition_order.argsort()[:5]]
            expected = (
                [0.0, 4.0, 8.0, -4.0, -8.0]
                if scheme == "dose-symmetric"
                else [-60.0, -56.0, -52.0, -48.0, -44.0]
            )
            assert first == pytest.approx(expected)
            assert mdoc.pixel_size_angstrom == 20.0
            assert mdoc.dose_e_per_a2.tolist() == pytest.approx([3.0] * len(mdoc.angles_deg))
            if ctf:
                assert mdoc.defocus_um.tolist() == pytest.approx([3.0] * len(mdoc.angles_deg))
            else:
                assert mdoc.defocus_um is None
