"""The held-out-view score: choice of views and agreement of reprojections with them."""

import numpy as np
import pytest
import torch

from deepdewedge.evaluate.reprojection import heldout_views, reprojection_score
from deepdewedge.reconstruct.backproject import weighted_backprojection
from deepdewedge.simulate import add_noise, project, simulate_phantom

ANGLES = np.arange(-60.0, 60.1, 3.0)  # 41 views


def test_every_nth_view_keeps_both_ends_of_the_range():
    chosen = heldout_views(ANGLES, "every:4")
    assert len(chosen) == 10 and 0 not in chosen and 40 not in chosen
    assert np.all(np.diff(ANGLES[chosen]) == 12.0)
    shuffled = np.random.default_rng(0).permutation(len(ANGLES))
    # Stack order does not matter: the same angles are chosen.
    assert sorted(ANGLES[shuffled][heldout_views(ANGLES[shuffled], "every:4")]) == sorted(
        ANGLES[chosen]
    )


def test_highest_tilts():
    assert sorted(ANGLES[heldout_views(ANGLES, "highest:4")]) == [-60.0, -57.0, 57.0, 60.0]


@pytest.mark.parametrize("scheme", ["every:1", "every4", "lowest:3", "highest:0", "highest:40"])
def test_bad_schemes(scheme):
    with pytest.raises(ValueError, match="holdout scheme"):
        heldout_views(ANGLES, scheme)


@pytest.fixture(scope="module")
def phantom():
    return simulate_phantom((24, 32, 48), generator=torch.Generator().manual_seed(0))


def test_the_projected_volume_scores_perfectly(phantom):
    angles = torch.tensor([-45.0, -9.0, 30.0])
    score = reprojection_score(phantom, project(phantom, angles), angles)
    assert np.all(score.cc > 0.999)
    assert np.nanmin(score.frc[:, :8]) > 0.99
    # Scale and offset of the measured images do not matter.
    shifted = reprojection_score(phantom, 3 * project(phantom, angles) + 7, angles)
    np.testing.assert_allclose(shifted.cc, score.cc, atol=1e-6)


def test_score_ranks_the_truth_above_a_reconstruction_above_noise(phantom):
    g = torch.Generator().manual_seed(1)
    angles = torch.tensor(ANGLES, dtype=torch.float32)
    noisy = add_noise(project(phantom, angles), snr=0.5, generator=g)
    out = heldout_views(ANGLES, "every:4")
    kept = [i for i in range(len(ANGLES)) if i not in out]
    wbp = weighted_backprojection(noisy[kept], angles[kept], thickness=24, filter="hamming")
    scores = {
        name: reprojection_score(volume, noisy[out], angles[out])
        for name, volume in {
            "truth": phantom,
            "wbp": wbp,
            "noise": torch.randn(phantom.shape, generator=g),
        }.items()
    }
    assert scores["truth"].mean_cc > scores["wbp"].mean_cc > scores["noise"].mean_cc + 0.1
    assert scores["truth"].mean_frc > scores["wbp"].mean_frc > scores["noise"].mean_frc
    assert abs(scores["noise"].mean_cc) < 0.1


def test_mismatched_views_are_refused(phantom):
    with pytest.raises(ValueError, match="rows along the tilt axis"):
        reprojection_score(phantom, torch.zeros(2, 31, 48), torch.tensor([0.0, 3.0]))
    with pytest.raises(ValueError, match="n angles"):
        reprojection_score(phantom, torch.zeros(2, 32, 48), torch.tensor([0.0]))
