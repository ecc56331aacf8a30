"""The fitting loop: epochs, Adam, wedge updates, validation, checkpoints and resume."""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from deepdewedge.fit.bank_files import load_input_bank, write_filled_bank
from deepdewedge.fit.checkpoints import CheckpointWriter, check_compatible, check_same_banks
from deepdewedge.fit.distributed import DistContext
from deepdewedge.fit.schedule import (
    WeightAverage,
    averaged,
    lr_factor,
    patience_exhausted,
    set_learning_rate,
    warmup_epochs,
)
from deepdewedge.fit.step import (
    STATS_SEED_OFFSET,
    VAL_SEED_OFFSET,
    Banks,
    FitSettings,
    accumulate_gradients,
    batch_rotations,
    model_input_statistics,
    row_tilt_ranges,
    rows_on_device,
    validation_loss,
)
from deepdewedge.fit.wedge_update import fill_missing_wedges
from deepdewedge.fourier import missing_wedge_mask
from deepdewedge.io.checkpoint import load_checkpoint
from deepdewedge.model.denormals import flush_denormals
from deepdewedge.model.unet import DeWedgeModel

__all__ = [
    "STATS_SEED_OFFSET",
    "VAL_SEED_OFFSET",
    "Banks",
    "Callbacks",
    "FitSettings",
    "accumulate_gradients",
    "fit",
    "model_input_statistics",
    "validation_loss",
]

log = logging.getLogger(__name__)

# On a GPU the host reads the running loss (progress, finiteness) only every this many steps,
# so that it seldom waits for the GPU inside an epoch.
GPU_SYNC_EVERY_N_STEPS = 16


@dataclass
class Callbacks:
    """Hooks for progress display; the loop itself never prints.

    ``on_step(epoch, step, steps, running_loss)`` follows every step; on a GPU the running
    mean loss it gets is refreshed every ``GPU_SYNC_EVERY_N_STEPS`` steps. With several
    processes only rank 0 calls the hooks.
    """

    on_step: Callable[[int, int, int, float], None] | None = None
    on_epoch: Callable[[dict[str, Any], list[dict[str, Any]]], None] | None = None


def _update_input_banks(
    model: DeWedgeModel, banks: Banks, settings: FitSettings, dist: DistContext, path: Path
) -> None:
    """Fill the missing wedges of the model-input banks; the targets stay measured data.

    The filled crops go into the new bank file `path` (fitting rows, then validation rows),
    which the fit then reads a batch at a time, or from the device where the old input
    bank was resident. Each process fills its share (see
    :func:`~deepdewedge.fit.bank_files.write_filled_bank`). Rows with tilt ranges of their
    own get their own wedge filled.
    """
    on_device = isinstance(banks.fit0, torch.Tensor) and banks.fit0.device == settings.device
    ranges = [banks.fit_tilt_ranges, banks.val_tilt_ranges]

    def fill(crops: torch.Tensor, part: int, rows: slice) -> torch.Tensor:
        own = ranges[part]
        return fill_missing_wedges(
            model,
            crops,
            **(settings.wedge if own is None else {"tilt_range_deg": own[rows]}),
            size_multiple=model.size_multiple,
            batch_size=settings.batch_size,
            device=settings.device,
        )

    parts = [bank for bank in (banks.fit0, banks.val0) if bank is not None]
    filled = write_filled_bank(path, parts, fill, dist, chunk_rows=settings.batch_size)
    del parts  # the old banks go before the new ones may take their place on the device
    banks.fit0 = filled[0]
    banks.val0 = filled[1] if banks.val0 is not None else None
    if on_device and settings.device.type != "cpu":
        banks.fit0 = banks.fit0.to(settings.device)
        banks.val0 = None if banks.val0 is None else banks.val0.to(settings.device)


class _CompiledModel(nn.Module):
    """`model` compiled with ``torch.compile``, falling back to the plain model.

    Compilation happens at the first call (and again for a new batch shape); if it fails, a
    warning names the error and fitting continues with the uncompiled model, whose result is
    the same up to rounding. A real error of the model recurs in the uncompiled call.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        # In a plain list, so that the compiled wrapper is not registered as a second module.
        self._compiled: list[Callable[[torch.Tensor], torch.Tensor]] = []
        try:
            self._compiled.append(torch.compile(model))
        except Exception as err:  # e.g. a Python version torch.compile does not support
            self._give_up(err)

    @property
    def is_compiled(self) -> bool:
        """Whether calls still go through the compiled model."""
        return bool(self._compiled)

    def _give_up(self, err: Exception) -> None:
        first_line = (str(err).strip().splitlines() or [""])[0]
        log.warning(
            "torch.compile failed (%s: %s); fitting continues with the uncompiled network",
            type(err).__name__,
            first_line,
        )
        self._compiled.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map `(b, 1, d, h, w)` to `(b, 1, d, h, w)` as the wrapped model does."""
        if self._compiled:
            try:
                return self._compiled[0](x)
            except torch.OutOfMemoryError:
                raise
            except Exception as err:  # compiler failures
                self._give_up(err)
        return self.model(x)


def _training_module(model: DeWedgeModel, settings: FitSettings, dist: DistContext) -> nn.Module:
    """The network as the fitting steps call it: compiled and DDP-wrapped as configured."""
    module: nn.Module = _CompiledModel(model) if settings.compile else model
    if dist.world_size > 1:
        # The only buffers are the input statistics, computed identically everywhere: no
        # need to broadcast them at every step.
        no_buffer_sync = (
            {"forward_sync_buffers": False}
            if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else {"broadcast_buffers": False}
        )
        module = DistributedDataParallel(
            module,
            device_ids=[settings.device.index] if settings.device.type == "cuda" else None,
            **no_buffer_sync,
        )
    return module


@flush_denormals()
def fit(
    model: DeWedgeModel,
    banks: Banks,
    settings: FitSettings,
    *,
    checkpoint_dir: Path,
    resume_from: Path | None = None,
    extra_state: dict[str, Any] | None = None,
    callbacks: Callbacks | None = None,
    dist: DistContext | None = None,
) -> list[dict[str, Any]]:
    """Fit `model` on the banks with the loss of Eq. (2) (or plain MSE in noise2noise mode).

    Parameters
    ----------
    model
        The network, initialised identically in every process.
    banks
        Fitting and validation crops, in memory or read from their files (see
        :class:`~deepdewedge.fit.bank_files.BankFile`); every process reads all of them.
    settings
        Options of the fit; ``settings.device`` is this process's device.
    checkpoint_dir
        Folder of the checkpoints and input-bank files (written by rank 0 only; every
        process reads the input-bank files, so all must see the folder).
    resume_from
        Checkpoint to continue from; every process loads it.
    extra_state
        Entries stored with every checkpoint (provenance, bank id, network options).
    callbacks
        Progress hooks, called by rank 0 only.
    dist
        Process group of a multi-process fit (see :mod:`deepdewedge.fit.distributed`);
        None fits in this process alone.

    Returns
    -------
    list of dict
        One record per epoch: ``epoch``, ``fitting_loss``, ``val_loss`` (None when not
        computed); the same in every process.

    Notes
    -----
    A run is reproducible on CPU for a given seed: the model is initialised by the caller
    under ``torch.manual_seed(seed)``, batches are shuffled and rotations drawn from one CPU
    generator, and every checkpoint holds the generator, the global RNG, the optimiser, the
    history and the current input-bank state, so a resumed run continues with the same losses.

    With several processes, ``batch_size`` is the global batch: every process draws the same
    permutation and rotations, fits its contiguous share of each batch, and scales its mean
    loss by ``world_size · share / batch`` so that DDP's gradient average is the gradient of
    the global batch's mean loss. The fit then follows the single-process fit with the same
    seed up to floating-point rounding (with ``drop_prob = 0``; dropout masks depend on the
    process). Validation, input statistics and missing-wedge updates are split the same way
    and all-reduced or gathered. Only rank 0 writes files.
    """
    callbacks = callbacks or Callbacks()
    dist = dist or DistContext()
    device = settings.device
    model.to(device)
    if settings.channels_last:
        model.to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.Adam(model.parameters(), **settings.adam_params)
    generator = torch.Generator().manual_seed(settings.seed)
    mw_mask = None
    if settings.wedge_mask:
        mw_mask = missing_wedge_mask((settings.subtomo_size,) * 3, **settings.wedge, device=device)
    writer = CheckpointWriter(checkpoint_dir, settings, extra_state or {})
    if dist.is_main:
        for stale in checkpoint_dir.parent.rglob(".*.tmp"):  # left by a run killed mid-write
            stale.unlink()
    history: list[dict[str, Any]] = []
    start_epoch = 0
    bank_file = None
    state: dict[str, Any] = {}
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        check_compatible(state, model, resume_from)
        # With weight averaging, "model_state" holds the average (what refinement uses) and
        # "fitted_model_state" the weights the optimiser moves.
        model.load_state_dict(state.get("fitted_model_state", state["model_state"]))
        optimizer.load_state_dict(state["optimizer_state"])
        generator.set_state(state["generator_state"])
        torch.set_rng_state(state["torch_rng_state"])
        if device.type == "cuda" and state.get("cuda_rng_state") is not None:
            torch.cuda.set_rng_state(state["cuda_rng_state"], device)
        history = list(state["history"])
        start_epoch = state["epoch"] + 1
        check_same_banks(state, extra_state or {}, resume_from)
        bank_file = state["bank_file"]
        if bank_file is not None:
            banks.fit0, banks.val0 = load_input_bank(
                checkpoint_dir / bank_file,
                n_fit=len(banks.fit1),
                n_val=0 if banks.val1 is None else len(banks.val1),
                checkpoint=resume_from,
            )
        writer.restore(state)
        if dist.is_main:
            log.info("resumed from %s at epoch %d", resume_from, start_epoch)
    dist.barrier()  # every process has read the checkpoint before rank 0 writes the next

    _place_banks(banks, device)
    if resume_from is None:
        model.set_normalization(*model_input_statistics(banks, settings, mw_mask, dist))
    n_fit = len(banks.fit0)
    steps = math.ceil(n_fit / settings.batch_size)
    peak_lr = settings.adam_params["lr"]
    warmup_steps = steps * warmup_epochs(settings.lr_warmup_epochs, settings.num_epochs)
    average = None
    if settings.ema_half_life_epochs:
        average = WeightAverage(model, settings.ema_half_life_epochs * steps)
        if state.get("weight_average") is not None:
            average.load_state_dict(state["weight_average"])
    if dist.is_main and dist.world_size > 1 and settings.batch_size % dist.world_size:
        log.warning(
            "batch_size %d is the batch of all %d processes together and does not divide "
            "evenly among them; some wait for others at every step",
            settings.batch_size,
            dist.world_size,
        )
    train_module = _training_module(model, settings, dist)
    sync_every = settings.sync_every_n_steps or (
        1 if device.type == "cpu" else GPU_SYNC_EVERY_N_STEPS
    )
    total = 0.0
    model.train()
    for epoch in range(start_epoch, settings.num_epochs):
        if patience_exhausted(history, settings.early_stopping_patience):
            if dist.is_main:
                _log_early_stop(history, settings.early_stopping_patience)
            break
        if (
            settings.update_every
            and settings.wedge_mask
            and epoch > 0
            and epoch % settings.update_every == 0
        ):
            bank_file = writer.bank_name(epoch)
            with averaged(average, model):
                _update_input_banks(model, banks, settings, dist, checkpoint_dir / bank_file)
            # Filled wedges carry signal: the inputs' statistics change with the bank.
            model.set_normalization(*model_input_statistics(banks, settings, mw_mask, dist))
        order = torch.randperm(n_fit, generator=generator).to(banks.fit0.device)
        running = torch.zeros((), device=device)
        shown = math.nan
        for step in range(steps):
            idx = order[step * settings.batch_size : (step + 1) * settings.batch_size]
            rotmats = batch_rotations(len(idx), generator, settings)
            lo, hi = dist.shard_bounds(len(idx))
            # A process without a share of a short batch still runs one pair, with weight
            # 0, so that DDP's gradient all-reduce finds every process.
            scale = dist.world_size * (hi - lo) / len(idx)
            part = slice(lo, hi) if hi > lo else slice(0, 1)
            optimizer.zero_grad(set_to_none=True)
            factor = lr_factor(
                epoch * steps + step,
                total_steps=settings.num_epochs * steps,
                warmup_steps=warmup_steps,
                schedule=settings.lr_schedule,
            )
            set_learning_rate(optimizer, peak_lr * factor)
            loss = accumulate_gradients(
                train_module,
                rows_on_device(banks.fit0, idx[part], device),
                rows_on_device(banks.fit1, idx[part], device),
                None if rotmats is None else rotmats[part],
                settings,
                mw_mask,
                scale=scale,
                tilt_ranges=row_tilt_ranges(banks.fit_tilt_ranges, idx[part], device),
            )
            optimizer.step()
            if average is not None:
                average.update(model)
            running += loss
            if step == 0 or (step + 1) % sync_every == 0 or step + 1 == steps:
                total = float(dist.all_reduce_sum(running)) / dist.world_size
                if not math.isfinite(total):
                    raise FloatingPointError(
                        f"fitting loss became {total} at epoch {epoch}; lower the learning "
                        "rate (adam_params_dict.lr) or standardize the tomograms"
                    )
                shown = total / (step + 1)
            if callbacks.on_step is not None and dist.is_main:
                callbacks.on_step(epoch, step + 1, steps, shown)
        record: dict[str, Any] = {
            "epoch": epoch,
            "fitting_loss": total / steps,
            "val_loss": None,
        }
        if banks.val0 is not None and (epoch + 1) % settings.check_val_every == 0:
            with averaged(average, model):
                record["val_loss"] = validation_loss(model, banks, settings, mw_mask, dist)
        history.append(record)
        if (
            dist.is_main
            and len(history) > 1
            and record["fitting_loss"] < 1e-6 * history[0]["fitting_loss"]
        ):
            log.warning(
                "fitting loss collapsed to %.3g (from %.3g): the halves may share their noise, "
                "or the input is constant",
                record["fitting_loss"],
                history[0]["fitting_loss"],
            )
        if dist.is_main:
            model_state = model.state_dict()
            if average is not None:
                with average.applied(model):
                    model_state = {k: v.clone() for k, v in model.state_dict().items()}
            state = {
                "model_state": model_state,
                "optimizer_state": optimizer.state_dict(),
                "generator_state": generator.get_state(),
                "torch_rng_state": torch.get_rng_state(),
                "cuda_rng_state": (
                    torch.cuda.get_rng_state(device) if device.type == "cuda" else None
                ),
                "epoch": epoch,
                "history": history,
                "bank_file": bank_file,
            }
            if average is not None:
                state["fitted_model_state"] = model.state_dict()
                state["weight_average"] = average.state_dict()
            writer.write(state, record)
            if callbacks.on_epoch is not None:
                callbacks.on_epoch(record, history)
    dist.barrier()  # rank 0 has written the last checkpoint
    if average is not None:  # the fit's result is the average, as in its checkpoints
        average.copy_to(model)
    model.eval()
    return history


def _log_early_stop(history: list[dict[str, Any]], patience: int | None) -> None:
    best = min((r for r in history if r["val_loss"] is not None), key=lambda r: r["val_loss"])
    log.info(
        "stopped after epoch %d: no lower validation loss in %d epochs (lowest %.6g at epoch %d)",
        history[-1]["epoch"],
        patience,
        best["val_loss"],
        best["epoch"],
    )


def _place_banks(banks: Banks, device: torch.device) -> None:
    """Keep the banks resident on the GPU when they take under a third of its free memory.

    Larger banks stay where they are: in host memory, or in their files. The rows' tilt
    ranges (a few bytes each) always go to `device`.
    """
    for name in ("fit_tilt_ranges", "val_tilt_ranges"):
        ranges = getattr(banks, name)
        if ranges is not None:
            setattr(banks, name, ranges.to(device))
    if device.type != "cuda":
        return
    tensors = [t for t in (banks.fit0, banks.fit1, banks.val0, banks.val1) if t is not None]
    free, _ = torch.cuda.mem_get_info(device)
    if sum(math.prod(t.shape) * 4 for t in tensors) < free / 3:  # float32
        for name in ("fit0", "fit1", "val0", "val1"):
            tensor = getattr(banks, name)
            if tensor is not None:
                setattr(banks, name, tensor.to(device))
    else:
        log.info("sub-tomogram banks stay in host memory; batches are copied to %s", device)
