import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepdewedge.reconstruct.gold import (
    erase_gold_beads,
    find_gold_beads,
    find_gold_beads_in_tilt_series,
)
from tests.conftest import DEVICES

MEAN_COUNTS = 40.0


def _positions(rng, shape, diameter, count, *, avoid=None):
    """Random bead centres at least 3 diameters apart and 2 diameters inside the border."""
    h, w = shape
    margin = 2 * diameter
    found = []
    for _ in range(5000):
        if len(found) == count:
            break
        y, x = rng.uniform(margin, h - margin), rng.uniform(margin, w - margin)
        if avoid is not None and avoid(y, x):
            continue
        if all(math.hypot(y - y2, x - x2) >= 3 * diameter for y2, x2 in found):
            found.append((y, x))
    return np.array(found, dtype=np.float64).reshape(-1, 2)


def _tilt_image(
    shape=(192, 192),
    *,
    diameter=8.0,
    beads=10,
    line_width=None,
    transmission=0.5,
    mean_counts=MEAN_COUNTS,
    seed=0,
):
    """Poisson counts over a smooth background, with soft dark disks (and a dark line).

    Returns the image `(h, w)` (float32 counts), the true centres `(k, 2)`, the noise-free
    background, and the distance of every pixel from the line (inf without one).
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    phase = rng.uniform(0, 2 * np.pi, 3)
    background = mean_counts * (
        1.0
        + 0.15 * np.sin(2 * np.pi * yy / h + phase[0])
        + 0.1 * np.cos(2 * np.pi * 1.5 * xx / w + phase[1])
        + 0.05 * np.sin(2 * np.pi * (xx + yy) / (0.7 * w) + phase[2])
    )
    line_distance = np.full(shape, np.inf)
    darkening = np.zeros(shape)
    if line_width is not None:
        # A straight dark line across the whole image, at 60° to the x axis.
        angle = np.deg2rad(60.0)
        line_distance = np.abs((yy - 0.45 * h) * np.cos(angle) - (xx - 0.5 * w) * np.sin(angle))
        darkening = np.maximum(
            darkening, 0.5 * (1 - np.tanh((line_distance - line_width / 2) / 0.7))
        )

    def near_line(y, x):
        if line_width is None:
            return False
        return line_distance[int(y), int(x)] < 2 * diameter + line_width

    centres = _positions(rng, shape, diameter, beads, avoid=near_line)
    for y, x in centres:
        rho = np.hypot(yy - y, xx - x)
        darkening = np.maximum(darkening, 0.5 * (1 - np.tanh((rho - diameter / 2) / 0.7)))
    mean = background * (1 - (1 - transmission) * darkening)
    image = rng.poisson(mean).astype(np.float32)
    return torch.from_numpy(image), centres, background, line_distance


def _match(found, truth, tolerance=2.0):
    """Recall of the true centres and the largest distance of a detection from any of them."""
    found = found.double().cpu().numpy().reshape(-1, 2)
    if len(truth) == 0 or len(found) == 0:
        return 0.0, (np.inf if len(found) else 0.0)
    distance = np.hypot(*(found[:, None, :] - truth[None, :, :]).transpose(2, 0, 1))
    recall = float((distance.min(axis=0) <= tolerance).mean())
    return recall, float(distance.min(axis=1).max())


@pytest.mark.parametrize("device", DEVICES)
def test_finds_beads_at_a_known_diameter(device):
    recalls, worst = [], 0.0
    for seed in range(3):
        image, truth, _, _ = _tilt_image(seed=seed, beads=12)
        centres, diameter = find_gold_beads(image.to(device), diameter_px=8.0)
        assert diameter == 8.0
        assert centres.device.type == torch.device(device).type
        assert centres.dtype == torch.float32 and centres.shape[1] == 2
        recall, farthest = _match(centres, truth)
        recalls.append(recall)
        worst = max(worst, farthest)
    assert np.mean(recalls) >= 0.95
    assert worst <= 2.0


def test_finds_beads_in_normalised_images():
    image, truth, _, _ = _tilt_image(seed=4)
    normalised = (image - image.mean()) / image.std()
    recall, farthest = _match(find_gold_beads(normalised, diameter_px=8.0)[0], truth)
    assert recall >= 0.95 and farthest <= 2.0


def test_pure_noise_gives_no_beads():
    for seed in range(3):
        image, _, _, _ = _tilt_image(beads=0, seed=seed)
        assert len(find_gold_beads(image, diameter_px=8.0)[0]) == 0
        centres, diameter = find_gold_beads(image)
        assert len(centres) == 0 and diameter is None
    white = torch.randn((160, 160), generator=torch.Generator().manual_seed(0))
    assert len(find_gold_beads(white, diameter_px=6.0)[0]) == 0


@pytest.mark.parametrize("line_width", [4.0, 8.0])
def test_a_dark_line_is_not_taken_for_beads(line_width):
    image, _, _, _ = _tilt_image(beads=0, line_width=line_width, seed=1)
    assert len(find_gold_beads(image, diameter_px=8.0)[0]) == 0

    image, truth, _, distance = _tilt_image(beads=8, line_width=line_width, seed=2)
    centres, _ = find_gold_beads(image, diameter_px=8.0)
    recall, farthest = _match(centres, truth)
    assert recall >= 0.95 and farthest <= 2.0
    on_line = distance[centres[:, 0].long(), centres[:, 1].long()] < 8.0
    assert not on_line.any()


def test_ignores_the_dark_border_of_the_field():
    image, truth, _, _ = _tilt_image(seed=3)
    # Outside the recorded field (e.g. after alignment) the counts drop to a dark band.
    image[:, :20] = 0.2 * image[:, :20]
    image[:14, :] = 0.2 * image[:14, :]
    centres, _ = find_gold_beads(image, diameter_px=8.0)
    _, farthest = _match(centres, truth)
    assert farthest <= 2.0
    clear = (truth[:, 1] > 20 + 8) & (truth[:, 0] > 14 + 8)
    recall, _ = _match(centres, truth[clear])
    assert recall >= 0.95


@pytest.mark.parametrize(
    "truth",
    [
        [[50.0, 50.0], [50.0, 60.0], [60.0, 50.0], [60.0, 60.0], [95.0, 90.0]],
        [[50.0, 45.0], [50.0, 55.0], [50.0, 65.0], [95.0, 90.0]],
        [[50.0, 50.0], [50.0, 60.0], [59.0, 55.0], [95.0, 90.0]],
    ],
    ids=["square", "row", "triangle"],
)
def test_finds_every_bead_of_a_cluster(truth):
    truth = np.array(truth)
    yy, xx = np.mgrid[0:128, 0:128].astype(np.float64)
    darkening = np.zeros((128, 128))
    for y, x in truth:
        rho = np.hypot(yy - y, xx - x)
        darkening = np.maximum(darkening, 0.5 * (1 - np.tanh((rho - 4.0) / 0.7)))
    for seed in range(3):
        counts = np.random.default_rng(seed).poisson(MEAN_COUNTS * (1 - 0.5 * darkening))
        image = torch.from_numpy(counts.astype(np.float32))
        recall, farthest = _match(find_gold_beads(image, diameter_px=8.0)[0], truth)
        assert recall == 1.0 and farthest <= 2.0


@settings(max_examples=8, deadline=None)
@given(diameter=st.floats(4.0, 16.0), seed=st.integers(0, 2**16))
def test_estimates_the_diameter(diameter, seed):
    # Smaller beads in pixels mean larger pixels: the counts per pixel grow with the area of
    # a pixel, as when binning, so that each bead collects the same dose.
    size = 160 if diameter < 10 else 256
    image, truth, _, _ = _tilt_image(
        (size, size),
        diameter=diameter,
        beads=8,
        mean_counts=MEAN_COUNTS * (8.0 / diameter) ** 2,
        seed=seed,
    )
    centres, estimate = find_gold_beads(image)
    assert estimate is not None
    assert abs(estimate - diameter) <= 0.2 * diameter
    recall, farthest = _match(centres, truth)
    assert recall >= 0.85 and farthest <= 2.0


def _series(views=7, *, with_beads=range(7), diameter=6.0, seed=0):
    images, truths = [], []
    for view in range(views):
        beads = 8 if view in with_beads else 0
        image, truth, _, _ = _tilt_image(
            (128, 128), diameter=diameter, beads=beads, seed=seed + 17 * view
        )
        images.append(image)
        truths.append(truth)
    return torch.stack(images), truths


def test_tilt_series_shares_one_diameter():
    stack, truths = _series()
    centres, diameter = find_gold_beads_in_tilt_series(stack)
    assert diameter is not None and abs(diameter - 6.0) <= 0.2 * 6.0
    assert len(centres) == len(truths)
    for found, truth in zip(centres, truths, strict=True):
        recall, farthest = _match(found, truth)
        assert recall >= 0.85 and farthest <= 2.0
    angles = torch.linspace(-60.0, 60.0, 7)
    given_angles, _ = find_gold_beads_in_tilt_series(stack, tilt_angles_deg=angles)
    assert [len(c) for c in given_angles] == [len(c) for c in centres]


def test_tilt_series_without_gold_is_left_alone():
    stack, _ = _series(with_beads=())
    centres, diameter = find_gold_beads_in_tilt_series(stack)
    assert diameter is None and all(len(c) == 0 for c in centres)
    # A few beads in a single view are not evidence enough.
    stack, _ = _series(with_beads=(3,))
    centres, diameter = find_gold_beads_in_tilt_series(stack, diameter_px=6.0)
    assert diameter == 6.0 and all(len(c) == 0 for c in centres)


@pytest.mark.parametrize("device", DEVICES)
def test_erasure_matches_the_background(device):
    image, truth, background, _ = _tilt_image(seed=5, beads=12, transmission=0.3)
    original = image.clone()
    centres = torch.from_numpy(truth).to(device, torch.float32)
    generator = torch.Generator(device=device).manual_seed(0)
    erased = erase_gold_beads(image.to(device), centres, diameter_px=8.0, generator=generator)
    assert torch.equal(image, original)
    assert erased.shape == image.shape and erased.dtype == torch.float32
    erased = erased.cpu().numpy()

    h, w = image.shape
    yy, xx = np.mgrid[0:h, 0:w]
    distance = np.min([np.hypot(yy - y, xx - x) for y, x in truth], axis=0)
    inside = distance <= 5.0
    # The beads are gone: inside them the counts follow the background, Poisson noise and all.
    residual = (erased - background)[inside]
    noise = np.sqrt(background[inside])
    assert abs(residual.mean()) < 0.1 * MEAN_COUNTS**0.5
    assert 0.85 < residual.std() / noise.mean() < 1.15
    before = (image.numpy() - background)[inside]
    assert before.mean() < -2 * MEAN_COUNTS**0.5
    # The seam leaves no rim: the blended band is as noisy as the background too.
    band = (distance > 5.5) & (distance <= 7.5)
    assert abs((erased - background)[band].mean()) < 0.1 * MEAN_COUNTS**0.5
    # Away from the beads nothing changes, bit for bit.
    away = distance > 0.6 * 8.0 + 2.5
    np.testing.assert_array_equal(erased[away], image.numpy()[away])


def test_erasure_is_reproducible():
    image, truth, _, _ = _tilt_image(seed=6)
    centres = torch.from_numpy(truth).float()
    runs = [
        erase_gold_beads(
            image, centres, diameter_px=8.0, generator=torch.Generator().manual_seed(seed)
        )
        for seed in (1, 1, 2)
    ]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_erasure_of_touching_beads_and_beads_at_the_edge():
    rng = np.random.default_rng(0)
    h, w = 64, 80
    yy, xx = np.mgrid[0:h, 0:w]
    centres = np.array([[30.0, 30.0], [30.0, 38.0], [2.0, 3.0], [60.0, 78.0]])
    dark = np.zeros((h, w))
    for y, x in centres:
        dark = np.maximum(dark, np.hypot(yy - y, xx - x) <= 4.0)
    image = torch.from_numpy(rng.poisson(MEAN_COUNTS * (1 - 0.7 * dark)).astype(np.float64))
    erased = erase_gold_beads(
        image,
        torch.from_numpy(centres),
        diameter_px=8.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert erased.dtype == torch.float64
    assert torch.isfinite(erased).all()
    covered = torch.from_numpy(dark > 0)
    assert abs(float(erased[covered].mean()) - MEAN_COUNTS) < 2.0
    unchanged = erase_gold_beads(image, torch.zeros((0, 2)), diameter_px=8.0)
    assert torch.equal(unchanged, image) and unchanged is not image


def test_integer_images_are_erased_in_float32():
    image, truth, _, _ = _tilt_image(seed=7, beads=3)
    erased = erase_gold_beads(image.to(torch.int32), torch.from_numpy(truth), diameter_px=8.0)
    assert erased.dtype == torch.float32


def test_rejects_bad_input():
    image = torch.rand(64, 64)
    with pytest.raises(ValueError, match="image"):
        find_gold_beads(torch.rand(2, 64, 64))
    with pytest.raises(ValueError, match="image"):
        find_gold_beads(torch.rand(8, 8))
    with pytest.raises(ValueError, match="diameter_px"):
        find_gold_beads(image, diameter_px=0.0)
    with pytest.raises(ValueError, match="diameter_px"):
        find_gold_beads(image, diameter_px=float("nan"))
    with pytest.raises(ValueError, match="diameter_px"):
        find_gold_beads(image, diameter_px=40.0)
    with pytest.raises(ValueError, match="threshold"):
        find_gold_beads(image, threshold=-1.0)
    with pytest.raises(ValueError, match="diameter_range_px"):
        find_gold_beads(image, diameter_range_px=(8.0, 4.0))
    with pytest.raises(ValueError, match="border_px"):
        find_gold_beads(image, diameter_px=4.0, border_px=-1)
    with pytest.raises(ValueError, match="stack"):
        find_gold_beads_in_tilt_series(image)
    with pytest.raises(ValueError, match="tilt_angles_deg"):
        find_gold_beads_in_tilt_series(torch.rand(3, 64, 64), tilt_angles_deg=torch.zeros(2))
    with pytest.raises(ValueError, match="min_beads"):
        find_gold_beads_in_tilt_series(torch.rand(3, 64, 64), min_beads=0)
    with pytest.raises(ValueError, match="min_view_fraction"):
        find_gold_beads_in_tilt_series(torch.rand(3, 64, 64), min_view_fraction=1.5)
    with pytest.raises(ValueError, match="centres"):
        erase_gold_beads(image, torch.zeros(3, 3), diameter_px=4.0)
    with pytest.raises(ValueError, match="centres"):
        erase_gold_beads(image, torch.full((1, 2), float("nan")), diameter_px=4.0)
    with pytest.raises(ValueError, match="image"):
        erase_gold_beads(torch.rand(64), torch.zeros(1, 2), diameter_px=4.0)
    with pytest.raises(ValueError, match="diameter_px"):
        erase_gold_beads(image, torch.zeros(1, 2), diameter_px=-2.0)
