"""The fitting loop's device-side options: host reads, compile, memory layout, precision."""

import logging
import math

import numpy as np
import pytest
import torch

from deepdewedge.fit import loop
from deepdewedge.fit import step as fit_step
from deepdewedge.fit.bank_files import BankFile, new_bank
from deepdewedge.fit.loop import Banks, Callbacks, FitSettings, fit
from deepdewedge.io.checkpoint import load_checkpoint, save_checkpoint
from deepdewedge.model.unet import DeWedgeModel

SETTINGS = {
    "subtomo_size": 8,
    "mw_angle": 60.0,
    "num_epochs": 3,
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


def _fit(tmp_path, banks=None, callbacks=None, **options):
    settings = {**SETTINGS, **options}
    torch.manual_seed(1)
    model = DeWedgeModel(chans=4, num_downsample_layers=1)
    directory = tmp_path / f"ckpt{len(list(tmp_path.iterdir()))}"
    directory.mkdir()
    history = fit(
        model,
        banks or _banks(),
        FitSettings(**settings),
        checkpoint_dir=directory,
        callbacks=callbacks,
    )
    return history, model, directory


def test_running_loss_is_read_every_n_steps(tmp_path):
    shown = []

    def on_step(epoch, step, steps, running):
        assert not torch.is_anomaly_enabled()
        shown.append((epoch, step, running))

    banks = _banks(n_fit=14)  # batches of 3: 5 steps per epoch
    history, _, _ = _fit(
        tmp_path, banks, Callbacks(on_step=on_step), num_epochs=2, sync_every_n_steps=2
    )
    every_step = []
    reference, _, _ = _fit(
        tmp_path,
        banks,
        Callbacks(on_step=lambda e, s, n, r: every_step.append((e, s, r))),
        num_epochs=2,
        sync_every_n_steps=1,
    )
    assert history == reference  # when the host looks does not change the fit
    for epoch in (0, 1):
        values = {step: r for e, step, r in shown if e == epoch}
        exact = {step: r for e, step, r in every_step if e == epoch}
        assert list(values) == [1, 2, 3, 4, 5]
        # Refreshed at the first step, every second step and the last one; held in between.
        assert values[3] == values[2] and values[1] == exact[1]
        assert all(values[s] == exact[s] for s in (2, 4, 5))
        assert values[5] == pytest.approx(history[epoch]["fitting_loss"])


def test_non_finite_loss_stops_the_fit_before_a_checkpoint(tmp_path, monkeypatch):
    real_loss, calls = fit_step.masked_fourier_loss, []

    def second_step_diverges(output, target, weights):
        calls.append(1)
        return real_loss(output, target, weights) * (math.nan if len(calls) == 2 else 1.0)

    monkeypatch.setattr(fit_step, "masked_fourier_loss", second_step_diverges)
    # Read at steps 1 and 3 only: the NaN of step 2 is still caught within its epoch.
    with pytest.raises(FloatingPointError, match="fitting loss became nan at epoch 0; lower"):
        _fit(tmp_path, sync_every_n_steps=4)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_compile_failure_falls_back_to_the_plain_network(tmp_path, monkeypatch, caplog):
    expected, _, _ = _fit(tmp_path)

    def broken_compile(module, **kwargs):
        def call(x):
            raise RuntimeError("no C++ compiler found\ndetails")

        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    with caplog.at_level(logging.WARNING, logger="deepdewedge.fit.loop"):
        history, _, _ = _fit(tmp_path, compile=True)
    assert history == expected
    warnings = [r.getMessage() for r in caplog.records if "torch.compile failed" in r.message]
    assert warnings == [
        "torch.compile failed (RuntimeError: no C++ compiler found); fitting continues with "
        "the uncompiled network"
    ]


def test_compiled_network_fits_like_the_plain_one(tmp_path, monkeypatch):
    expected, _, _ = _fit(tmp_path, num_epochs=2)
    real_compile, calls = torch.compile, []

    def eager_compile(module, **kwargs):
        compiled = real_compile(module, backend="eager")  # dynamo without a C++ toolchain

        def call(x):
            calls.append(x.shape[0])
            return compiled(x)

        return call

    monkeypatch.setattr(torch, "compile", eager_compile)
    history, _, _ = _fit(tmp_path, num_epochs=2, compile=True)
    assert calls == [3, 3, 1] * 2  # the training steps went through the compiled network
    for got, want in zip(history, expected, strict=True):
        assert got["fitting_loss"] == pytest.approx(want["fitting_loss"], rel=1e-5)
        assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)


def test_channels_last_fits_like_the_default_layout(tmp_path):
    expected, _, _ = _fit(tmp_path)
    history, model, directory = _fit(tmp_path, channels_last=True)
    weight = model.unet.down[0][0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last_3d)
    for got, want in zip(history, expected, strict=True):
        assert got["fitting_loss"] == pytest.approx(want["fitting_loss"], rel=1e-4)
    state = torch.load(directory / "latest.ckpt", weights_only=True)["model_state"]
    DeWedgeModel(chans=4, num_downsample_layers=1).load_state_dict(state)


def test_bf16_mixed_keeps_the_fourier_loss_in_float32(tmp_path, monkeypatch):
    dtypes = []
    real_loss = fit_step.masked_fourier_loss

    def spy(output, target, weights):
        dtypes.append(output.dtype)
        return real_loss(output, target, weights)

    monkeypatch.setattr(fit_step, "masked_fourier_loss", spy)
    history, _, _ = _fit(tmp_path, num_epochs=1, precision="bf16-mixed")
    assert set(dtypes) == {torch.float32}
    assert math.isfinite(history[0]["fitting_loss"]) and math.isfinite(history[0]["val_loss"])


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
@pytest.mark.parametrize("options", [{}, {"channels_last": True}])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_banks_in_host_memory_fit_like_resident_banks(
    tmp_path, monkeypatch, precision, options
):
    device = torch.device("cuda", 0)
    resident, _, _ = _fit(tmp_path, device=device, precision=precision, **options)
    assert torch.cuda.memory_allocated(device) > 0
    monkeypatch.setattr(loop, "_place_banks", lambda banks, device: None)  # pinned copies
    host, _, _ = _fit(tmp_path, device=device, precision=precision, **options)
    for got, want in zip(host, resident, strict=True):
        assert got["fitting_loss"] == pytest.approx(want["fitting_loss"], rel=1e-3)


@pytest.mark.parametrize("micro", [1, 2])
def test_micro_batches_fit_like_the_whole_batch(tmp_path, micro):
    """Batches of 3 in micro-batches of 1 or 2 (+1): the same losses and parameters."""
    expected, reference, _ = _fit(tmp_path)
    history, model, _ = _fit(tmp_path, micro_batch_size=micro)
    for got, want in zip(history, expected, strict=True):
        assert got["fitting_loss"] == pytest.approx(want["fitting_loss"], rel=1e-5)
        assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)
    x = torch.randn(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model.eval()(x), reference.eval()(x)
    assert float((ours - theirs).norm() / theirs.norm()) < 1e-4


def _in_files(banks, folder):
    folder.mkdir()
    names = ("fit0", "fit1", "val0", "val1")
    for name in names:
        rows = getattr(banks, name)
        with new_bank(folder / f"{name}.npy", tuple(rows.shape)) as writer:
            writer.write(0, rows)
    return Banks(**{name: BankFile(folder / f"{name}.npy") for name in names})


def test_banks_in_files_fit_like_banks_in_memory_and_stay_unwritten(tmp_path):
    files = _in_files(_banks(), tmp_path / "banks")
    before = {p.name: p.read_bytes() for p in (tmp_path / "banks").iterdir()}
    expected, _, _ = _fit(tmp_path, _banks(), num_epochs=4)
    history, _, directory = _fit(tmp_path, files, num_epochs=4)
    assert history == expected
    assert {p.name: p.read_bytes() for p in (tmp_path / "banks").iterdir()} == before
    # After the update of epoch 2 the model input comes from the checkpoint folder's file.
    assert isinstance(files.fit0, BankFile) and files.fit0.path == files.val0.path
    assert files.fit0.path == directory / "input_bank_e00002.npy"
    assert [p.name for p in directory.glob("input_bank_*")] == ["input_bank_e00002.npy"]


def test_resume_from_an_input_bank_state_of_earlier_versions(tmp_path):
    """Checkpoints whose input bank is a ``.pt`` file, as earlier versions wrote, resume."""
    expected, _, _ = _fit(tmp_path, num_epochs=4)
    _, _, directory = _fit(tmp_path, num_epochs=3)  # updated at epoch 2
    rows = torch.from_numpy(np.load(directory / "input_bank_e00002.npy"))
    save_checkpoint(directory / "input_bank_e00002.pt", {"fit0": rows[:7], "val0": rows[7:]})
    (directory / "input_bank_e00002.npy").unlink()
    state = load_checkpoint(directory / "latest.ckpt")
    save_checkpoint(directory / "latest.ckpt", {**state, "bank_file": "input_bank_e00002.pt"})
    torch.manual_seed(1)
    model = DeWedgeModel(chans=4, num_downsample_layers=1)
    settings = FitSettings(**{**SETTINGS, "num_epochs": 4})
    history = fit(
        model, _banks(), settings, checkpoint_dir=directory, resume_from=directory / "latest.ckpt"
    )
    assert history == expected


def _ranged(banks, fit_ranges, val_ranges):
    def rows(ranges):
        return torch.tensor(ranges, dtype=torch.float64)

    return Banks(
        banks.fit0,
        banks.fit1,
        banks.val0,
        banks.val1,
        fit_tilt_ranges=rows(fit_ranges),
        val_tilt_ranges=rows(val_ranges),
    )


def test_rows_with_tilt_ranges_of_their_own_fit_with_their_own_wedges(tmp_path):
    """Rows that all carry -50..65 fit like one -50..65 wedge for all (steps in micro-batches,
    validation, input statistics, the wedge update of epoch 2), not like the settings' 60°."""
    asymmetric = [-50.0, 65.0]
    expected, _, _ = _fit(tmp_path, num_epochs=4, tilt_range_deg=tuple(asymmetric))
    banks = _ranged(_banks(), [asymmetric] * 7, [asymmetric] * 2)
    history, _, _ = _fit(tmp_path, banks, num_epochs=4, micro_batch_size=2)
    for got, want in zip(history, expected, strict=True):
        assert got["fitting_loss"] == pytest.approx(want["fitting_loss"], rel=1e-5)
        assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)
    # Rows of two tomograms with different ranges: neither tomogram's wedge alone.
    symmetric, _, _ = _fit(tmp_path, num_epochs=4)
    two = [[-60.0, 60.0], asymmetric]
    mixed, _, _ = _fit(
        tmp_path, _ranged(_banks(), [two[i % 2] for i in range(7)], two), num_epochs=4
    )
    for other in (expected, symmetric):
        assert all(
            m["val_loss"] != pytest.approx(o["val_loss"], rel=1e-4)
            for m, o in zip(mixed[1:], other[1:], strict=True)
        )
    with pytest.raises(ValueError, match="one range per row of a bank of 7"):
        _ranged(_banks(), [asymmetric] * 6, [asymmetric] * 2)
