"""fit-model init_from: a fit that starts from the weights of another fit."""

import mrcfile
import numpy as np
import pytest
import torch

from deepdewedge import fit_model, prepare_data
from deepdewedge.config import step_config
from deepdewedge.io.checkpoint import load_checkpoint
from deepdewedge.io.errors import InputError
from deepdewedge.pipeline import fitting
from tests.messages import assert_one_line

FIT = {
    "unet_params_dict": {"chans": 4, "num_downsample_layers": 1},
    "adam_params_dict": {"lr": 3e-3},
    "batch_size": 4,
    "update_subtomo_missing_wedges_every_n_epochs": 2,
    "check_val_every_n_epochs": 1,
    "interpolation": "linear",
    "precision": "32",
}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Prepared banks and a fit of 4 epochs on them."""
    root = tmp_path_factory.mktemp("init")
    rng = np.random.default_rng(0)
    signal = rng.standard_normal((16, 24, 24)).astype(np.float32)
    files = []
    for half in (0, 1):
        files.append(root / f"tomo{half}.mrc")
        with mrcfile.new(files[-1]) as mrc:
            mrc.set_data(signal + rng.standard_normal(signal.shape).astype(np.float32))
    overrides = {"project_dir": root, "tomo0_files": [files[0]], "tomo1_files": [files[1]]}
    prepare_data(
        step_config(
            "prepare_data",
            overrides={
                **overrides,
                "subtomo_size": 8,
                "subtomo_extraction_strides": [4, 8, 8],
                "val_fraction": 0.2,
            },
        )
    )
    fit_model(_config(root, "first", num_epochs=4))
    return root


def _config(root, logdir, **options):
    return step_config(
        "fit_model", overrides={**FIT, "project_dir": root, "logdir": root / logdir, **options}
    )


def test_fit_starts_from_the_weights_of_init_from(project, monkeypatch):
    earlier = project / "first/checkpoints/latest.ckpt"
    weights = load_checkpoint(earlier)["model_state"]
    started = []
    real_fit = fitting.fit

    def spy(model, *args, **kwargs):
        started.append({k: v.clone() for k, v in model.state_dict().items()})
        return real_fit(model, *args, **kwargs)

    monkeypatch.setattr(fitting, "fit", spy)
    tuned = fit_model(_config(project, "tuned", num_epochs=1, init_from=earlier))
    scratch = fit_model(_config(project, "scratch", num_epochs=1))
    assert started[0].keys() == weights.keys()
    assert all(torch.equal(started[0][k], weights[k]) for k in weights)
    assert not all(torch.equal(started[1][k], weights[k]) for k in weights)
    first = tuned["history"][0]["fitting_loss"]
    assert first < scratch["history"][0]["fitting_loss"]
    state = load_checkpoint(tuned["checkpoint"])
    assert state["init_from"] == str(earlier) and state["epoch"] == 0
    steps = [s["optimizer_state"]["state"][0]["step"] for s in (state, load_checkpoint(earlier))]
    assert steps[1] == 4 * steps[0]  # Adam starts anew
    # Resumed, the fit keeps the record of where it started.
    resumed = fit_model(_config(project, "tuned", num_epochs=2, resume=True))
    assert load_checkpoint(resumed["checkpoint"])["init_from"] == str(earlier)
    assert load_checkpoint(scratch["checkpoint"])["init_from"] is None


def test_init_from_another_architecture_is_a_one_line_error(project):
    earlier = project / "first/checkpoints/latest.ckpt"
    config = _config(project, "wide", num_epochs=1, init_from=earlier)
    config.unet_params_dict.chans = 6
    with pytest.raises(InputError, match="different network architecture") as err:
        fit_model(config)
    message = assert_one_line(err, earlier)
    assert "'chans': 4" in message and "init_from" in message


@pytest.mark.parametrize("switch", ["residual", "affine_equivariant"])
def test_init_from_a_network_that_computes_otherwise_is_a_one_line_error(project, switch):
    # Same weights, another function: the switch must agree (absent in a checkpoint = off).
    earlier = project / "first/checkpoints/latest.ckpt"
    config = _config(project, f"switched_{switch}", num_epochs=1, init_from=earlier)
    fitted_with = getattr(config.unet_params_dict, switch)
    setattr(config.unet_params_dict, switch, not fitted_with)
    with pytest.raises(
        InputError, match=f"fitted with {switch}: {str(fitted_with).lower()}"
    ) as err:
        fit_model(config)
    assert "init_from" in assert_one_line(err, earlier)


def test_init_from_a_missing_file_is_a_one_line_error(project):
    missing = project / "elsewhere/latest.ckpt"
    with pytest.raises(InputError, match="no such checkpoint file; check init_from") as err:
        fit_model(_config(project, "missing", num_epochs=1, init_from=missing))
    assert_one_line(err, missing)
    assert not (project / "missing/checkpoints").exists()  # nothing started
