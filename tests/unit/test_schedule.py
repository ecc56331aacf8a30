"""Learning-rate schedule, weight averaging and early stopping, alone and in the fit."""

import logging
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from deepdewedge.fit.loop import Banks, Callbacks, FitSettings, fit
from deepdewedge.fit.schedule import (
    FINAL_LR_FACTOR,
    WeightAverage,
    lr_factor,
    patience_exhausted,
    warmup_epochs,
)
from deepdewedge.io.checkpoint import load_checkpoint
from deepdewedge.model.unet import DeWedgeModel

SETTINGS = {
    "subtomo_size": 8,
    "mw_angle": 60.0,
    "num_epochs": 4,
    "batch_size": 3,
    "adam_params": {"lr": 1e-3},
    "seed": 3,
    "update_every": 2,
    "check_val_every": 1,
    "interpolation": "linear",
}


def _banks(n_fit=7, n_val=2):
    g = torch.Generator().manual_seed(0)
    fit0 = torch.randn(n_fit + n_val, 14, 14, 14, generator=g)
    fit1 = fit0 + torch.randn(fit0.shape, generator=g)
    return Banks(fit0[:n_fit], fit1[:n_fit], fit0[n_fit:], fit1[n_fit:])


def _fit(directory, resume_from=None, callbacks=None, **options):
    torch.manual_seed(1)
    model = DeWedgeModel(chans=4, num_downsample_layers=1)
    directory.mkdir(exist_ok=True)
    history = fit(
        model,
        _banks(),
        FitSettings(**{**SETTINGS, **options}),
        checkpoint_dir=directory,
        resume_from=resume_from,
        callbacks=callbacks,
    )
    return history, model


@given(
    total=st.integers(2, 5000),
    warmup_fraction=st.floats(0, 0.5),
)
def test_cosine_schedule_warms_up_peaks_at_one_and_decays_to_its_floor(total, warmup_fraction):
    warmup = int(warmup_fraction * total)
    factors = [
        lr_factor(s, total_steps=total, warmup_steps=warmup, schedule="cosine")
        for s in range(total)
    ]
    lowest = min(FINAL_LR_FACTOR, 1 / max(warmup, 1))
    assert all(lowest - 1e-12 <= f <= 1 + 1e-12 for f in factors)
    rising, falling = factors[:warmup], factors[warmup:]
    assert all(a < b for a, b in zip(rising, rising[1:], strict=False))
    assert all(a >= b - 1e-12 for a, b in zip(falling, falling[1:], strict=False))
    if warmup:
        assert rising[-1] == pytest.approx(1.0)
    assert falling[0] == pytest.approx(1.0)
    if len(falling) > 1:
        assert falling[-1] == pytest.approx(FINAL_LR_FACTOR)


def test_constant_schedule_and_unknown_names():
    assert lr_factor(17, total_steps=20, warmup_steps=5, schedule="constant") == 1.0
    with pytest.raises(ValueError, match="unknown learning-rate schedule"):
        lr_factor(0, total_steps=2, warmup_steps=0, schedule="linear")
    assert warmup_epochs(None, 40) == 2 and warmup_epochs(None, 3) == 1
    assert warmup_epochs(0, 40) == 0


def test_weight_average_follows_its_half_life_and_restores_the_weights():
    model = torch.nn.Linear(1, 1, bias=False)
    average = WeightAverage(model, half_life_steps=10.0)
    average.updates = 10**6  # past the start-up cap: the decay alone applies
    with torch.no_grad():
        model.weight.fill_(1.0)
    start = average.average["weight"].item()
    for _ in range(10):
        average.update(model)
    # After one half-life, half of the distance to the constant weights is left.
    assert average.average["weight"].item() == pytest.approx(1 - (1 - start) / 2)
    with torch.no_grad():
        model.weight.fill_(5.0)
    with average.applied(model):
        assert model.weight.item() == pytest.approx(average.average["weight"].item())
    assert model.weight.item() == 5.0


def test_weight_average_forgets_the_initialisation_early():
    model = torch.nn.Linear(1, 1, bias=False)
    average = WeightAverage(model, half_life_steps=1e6)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(50):
        average.update(model)
    # A half-life of 1e6 steps alone would keep the initial weight; the cap does not.
    assert average.average["weight"].item() == pytest.approx(1.0, abs=0.05)


def test_patience_counts_epochs_since_the_lowest_validation_loss():
    history = [
        {"epoch": 0, "val_loss": 3.0},
        {"epoch": 1, "val_loss": None},
        {"epoch": 2, "val_loss": 2.0},
        {"epoch": 3, "val_loss": 2.5},
        {"epoch": 4, "val_loss": 2.0},  # equal is no improvement
    ]
    assert not patience_exhausted(history, None)
    assert not patience_exhausted(history[:2], 1)
    assert patience_exhausted(history, 2) and not patience_exhausted(history, 3)
    assert not patience_exhausted([{"epoch": 0, "val_loss": None}], 1)


def test_early_stopping_ends_the_fit_after_its_patience(tmp_path, caplog):
    options = {"num_epochs": 12, "adam_params": {"lr": 3e-2}}  # a bumpy validation loss
    full, _ = _fit(tmp_path / "full", **options)
    stops = [e for e in range(len(full)) if patience_exhausted(full[: e + 1], 1)]
    assert stops and stops[0] < 11, "the fixture's validation loss must rise early on"
    expected = stops[0]
    with caplog.at_level(logging.INFO, logger="deepdewedge.fit.loop"):
        stopped, _ = _fit(tmp_path / "stopped", early_stopping_patience=1, **options)
    assert stopped == full[: expected + 1]  # stopping changes nothing before the stop
    assert stopped[-1]["val_loss"] > min(r["val_loss"] for r in stopped)
    assert f"stopped after epoch {expected}" in caplog.text
    # Resumed after the stop, the fit stays stopped.
    again, _ = _fit(
        tmp_path / "stopped",
        resume_from=tmp_path / "stopped" / "latest.ckpt",
        early_stopping_patience=1,
        **options,
    )
    assert again == stopped


@pytest.mark.parametrize(
    "options",
    [
        {"lr_schedule": "cosine", "lr_warmup_epochs": 1},
        {"lr_schedule": "cosine", "ema_half_life_epochs": 0.5},
    ],
)
def test_a_resumed_fit_with_a_schedule_or_average_equals_the_uninterrupted_one(tmp_path, options):
    whole, whole_model = _fit(tmp_path / "whole", **options)

    def kill(record, history):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path / "part", callbacks=Callbacks(on_epoch=kill), **options)
    resumed, resumed_model = _fit(
        tmp_path / "part", resume_from=tmp_path / "part" / "latest.ckpt", **options
    )
    assert resumed == whole
    for a, b in zip(whole_model.parameters(), resumed_model.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_the_schedule_changes_the_fit_and_the_average_is_what_checkpoints_hold(tmp_path):
    plain, plain_model = _fit(tmp_path / "plain")
    cosine, _ = _fit(tmp_path / "cosine", lr_schedule="cosine")
    assert [r["fitting_loss"] for r in cosine] != [r["fitting_loss"] for r in plain]
    averaged, model = _fit(tmp_path / "ema", ema_half_life_epochs=1.0)
    assert averaged[0]["fitting_loss"] == plain[0]["fitting_loss"]  # same steps, other weights
    state = load_checkpoint(tmp_path / "ema" / "latest.ckpt")
    for name, p in model.named_parameters():  # the returned network is the average
        torch.testing.assert_close(state["model_state"][name], p.detach())
    moved = [
        not torch.equal(state["fitted_model_state"][n], state["model_state"][n])
        for n, _ in model.named_parameters()
    ]
    assert any(moved)
    assert math.isfinite(averaged[-1]["val_loss"])
