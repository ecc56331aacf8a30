"""The fitting loop: batches, Adam, wedge updates, validation, checkpoints and resume."""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from deepdewedge.fit.batch import make_batch
from deepdewedge.fit.distributed import DistContext
from deepdewedge.fit.loss import loss_weights, masked_fourier_loss
from deepdewedge.fit.wedge_update import fill_missing_wedges
from deepdewedge.fourier import missing_wedge_mask
from deepdewedge.io.checkpoint import load_checkpoint, save_checkpoint
from deepdewedge.io.mrc import InputError
from deepdewedge.model.denormals import flush_denormals
from deepdewedge.model.unet import DeWedgeModel
from deepdewedge.rotation import sample_rotations

log = logging.getLogger(__name__)

VAL_SEED_OFFSET = 7919
STATS_SEED_OFFSET = 104729
# On a GPU the host reads the running loss (progress, finiteness) only every this many steps,
# so that it seldom waits for the GPU inside an epoch.
GPU_SYNC_EVERY_N_STEPS = 16


@dataclass
class FitSettings:
    """Everything the loop needs besides the model and the data (see ``FitModelConfig``)."""

    subtomo_size: int
    mw_angle: float
    num_epochs: int
    batch_size: int
    adam_params: dict[str, Any]
    seed: int
    rotate: bool = True
    wedge_mask: bool = True
    interpolation: str = "cubic"
    update_every: int | None = 10
    check_val_every: int = 10
    save_every: int | None = 50
    keep_best_val: int = 1
    keep_best_fit: int = 0
    precision: str = "32"
    channels_last: bool = False
    compile: bool = False
    # Steps between reads of the running loss by the host; None: every step on the CPU,
    # GPU_SYNC_EVERY_N_STEPS on a GPU.
    sync_every_n_steps: int | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


@dataclass
class Banks:
    """Rotation-ready crops `(n, S, S, S)`: tomo0 (model input) and tomo1 (target) halves."""

    fit0: torch.Tensor
    fit1: torch.Tensor
    val0: torch.Tensor | None = None
    val1: torch.Tensor | None = None


@dataclass
class Callbacks:
    """Hooks for progress display; the loop itself never prints.

    ``on_step(epoch, step, steps, running_loss)`` follows every step; on a GPU the running
    mean loss it gets is refreshed every ``GPU_SYNC_EVERY_N_STEPS`` steps. With several
    processes only rank 0 calls the hooks.
    """

    on_step: Callable[[int, int, int, float], None] | None = None
    on_epoch: Callable[[dict[str, Any], list[dict[str, Any]]], None] | None = None


def _autocast(settings: FitSettings):
    """bf16 autocast of the network under ``bf16-mixed``; the FFT loss stays in float32."""
    if settings.precision == "bf16-mixed":
        return torch.autocast(settings.device.type, dtype=torch.bfloat16)
    return torch.autocast(settings.device.type, enabled=False)


def _rows(bank: torch.Tensor, index: torch.Tensor | slice, device: torch.device) -> torch.Tensor:
    """`(k, S, S, S)` rows of a bank on `device`.

    A bank resident on `device` is indexed in place (`index` on that device). From host
    memory, the rows are gathered into page-locked memory and copied without waiting, so the
    copy overlaps the GPU's work.
    """
    rows = bank[index]
    if rows.device == device:
        return rows
    if device.type == "cuda":
        rows = rows.pin_memory()
    return rows.to(device, non_blocking=True)


def _rotations(n: int, generator: torch.Generator, settings: FitSettings) -> torch.Tensor | None:
    """`(n, 3, 3)` rotations of a whole batch on the device, or None without rotation.

    Every process draws the rotations of the whole batch, so that all random streams stay
    the same as in a single process; each then takes its share.
    """
    if not settings.rotate:
        return None
    return sample_rotations(n, generator=generator, device=settings.device)


def _loss_of_batch(
    forward: Callable[[torch.Tensor], torch.Tensor],
    crops0: torch.Tensor,
    crops1: torch.Tensor,
    rotmats: torch.Tensor | None,
    settings: FitSettings,
    mw_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Mean loss over `(b, S, S, S)` crop pairs on the device, under the given rotations."""
    batch = make_batch(
        crops0,
        crops1,
        subtomo_size=settings.subtomo_size,
        mw_mask=mw_mask,
        mw_angle_deg=settings.mw_angle,
        rotate=settings.rotate,
        generator=None,
        interpolation=settings.interpolation,
        rotmats=rotmats,
    )
    model_input = batch.model_input
    if settings.channels_last:
        model_input = model_input.contiguous(memory_format=torch.channels_last_3d)
    with _autocast(settings):
        output = forward(model_input)
    weights = None
    if batch.rot_mw_mask is not None:
        weights = loss_weights(mw_mask, batch.rot_mw_mask)
    return masked_fourier_loss(output, batch.target, weights)


@torch.no_grad()
def validation_loss(
    model: DeWedgeModel,
    banks: Banks,
    settings: FitSettings,
    mw_mask: torch.Tensor | None,
    dist: DistContext | None = None,
) -> float:
    """Mean loss over the validation bank, rotations fixed by the seed across epochs.

    With several processes each one evaluates its share of every batch; the sum is
    all-reduced, so every process returns the same value.
    """
    assert banks.val0 is not None and banks.val1 is not None
    dist = dist or DistContext()
    generator = torch.Generator().manual_seed(settings.seed + VAL_SEED_OFFSET)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=settings.device)
    n_val = len(banks.val0)
    for i in range(0, n_val, settings.batch_size):
        n = min(settings.batch_size, n_val - i)
        rotmats = _rotations(n, generator, settings)
        lo, hi = dist.shard_bounds(n)
        if hi == lo:
            continue
        rows = slice(i + lo, i + hi)
        loss = _loss_of_batch(
            model,
            _rows(banks.val0, rows, settings.device),
            _rows(banks.val1, rows, settings.device),
            None if rotmats is None else rotmats[lo:hi],
            settings,
            mw_mask,
        )
        total += loss.double() * (hi - lo)
    model.train(was_training)
    return float(dist.all_reduce_sum(total)) / n_val


@torch.no_grad()
def model_input_statistics(
    banks: Banks,
    settings: FitSettings,
    mw_mask: torch.Tensor | None,
    dist: DistContext | None = None,
) -> tuple[float, float]:
    """Mean and standard deviation of the model inputs of one pass over the fitting bank.

    The inputs are built exactly as in fitting (rotation, crop, extra wedge), with their own
    seeded generator so that the fitting's random stream is untouched. Standardising with
    these statistics gives the network unit-variance inputs; refinement standardises whole
    tomograms the same way. With several processes each one builds its share of every batch
    and the sums are all-reduced, so every process gets the same statistics.
    """
    dist = dist or DistContext()
    generator = torch.Generator().manual_seed(settings.seed + STATS_SEED_OFFSET)
    total = torch.zeros((), dtype=torch.float64, device=settings.device)
    total_sq = torch.zeros_like(total)
    count = 0
    n_fit = len(banks.fit0)
    for i in range(0, n_fit, settings.batch_size):
        n = min(settings.batch_size, n_fit - i)
        rotmats = _rotations(n, generator, settings)
        lo, hi = dist.shard_bounds(n)
        if hi == lo:
            continue
        rows = slice(i + lo, i + hi)
        batch = make_batch(
            _rows(banks.fit0, rows, settings.device),
            _rows(banks.fit1, rows, settings.device),
            subtomo_size=settings.subtomo_size,
            mw_mask=mw_mask,
            mw_angle_deg=settings.mw_angle,
            rotate=settings.rotate,
            generator=None,
            interpolation=settings.interpolation,
            rotmats=None if rotmats is None else rotmats[lo:hi],
        )
        x = batch.model_input.double()
        total += x.sum()
        total_sq += x.square().sum()
        count += x.numel()
    sums = torch.stack([total, total_sq, torch.full_like(total, count)])
    total, total_sq, n_values = (float(v) for v in dist.all_reduce_sum(sums))
    mean = total / n_values
    std = max(total_sq / n_values - mean**2, 0.0) ** 0.5
    return mean, std if std > 0 else 1.0


def _update_input_banks(
    model: DeWedgeModel, banks: Banks, settings: FitSettings, dist: DistContext
) -> None:
    """Fill the missing wedges of the model-input banks; the targets stay measured data.

    Each process fills its contiguous share of a bank in memory; the shares are then gathered,
    so every process holds the whole updated bank.
    """
    for name in ("fit0", "val0"):
        crops = getattr(banks, name)
        if crops is None:
            continue
        filled = fill_missing_wedges(
            model,
            crops[dist.shard(len(crops))],
            mw_angle_deg=settings.mw_angle,
            size_multiple=model.size_multiple,
            batch_size=settings.batch_size,
            device=settings.device,
        )
        setattr(banks, name, dist.all_gather_rows(filled, len(crops)))


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


class CheckpointWriter:
    """Writes latest / best / every-n checkpoints and the input-bank state.

    The best checkpoints are ranked by validation loss (``best-val-*``) and by fitting loss
    (``best-fit-*``). The model-input bank changes at every missing-wedge update; its state
    is stored once per update as ``input_bank_eNNNNN.pt`` and only the one ``latest.ckpt``
    needs is kept, so disk use stays at one bank whatever the number of checkpoints. Every
    checkpoint holds the model, optimiser, random state and history; a checkpoint other than
    the latest can be resumed from until the next wedge update replaces its bank.
    """

    RANKINGS = {"val_loss": "best-val", "fitting_loss": "best-fit"}

    def __init__(self, directory: Path, settings: FitSettings, extra: dict[str, Any]) -> None:
        self.dir = directory
        self.keep = {"val_loss": settings.keep_best_val, "fitting_loss": settings.keep_best_fit}
        self.save_every = settings.save_every
        self.extra = extra
        # Names relative to the checkpoint folder, so a moved project keeps its bookkeeping.
        self.best: dict[str, list[tuple[float, str]]] = {k: [] for k in self.RANKINGS}

    @staticmethod
    def bank_name(epoch: int) -> str:
        """File name of the input-bank state after the update at `epoch`."""
        return f"input_bank_e{epoch:05d}.pt"

    def save_bank(self, epoch: int, banks: Banks) -> str:
        """Store the input banks after the update at `epoch`; return the file name."""
        name = self.bank_name(epoch)
        save_checkpoint(
            self.dir / name,
            {"fit0": banks.fit0.cpu(), "val0": None if banks.val0 is None else banks.val0.cpu()},
        )
        return name

    def write(self, state: dict[str, Any], record: dict[str, Any]) -> None:
        """Write the checkpoints due after the epoch of `record`; drop those no longer kept."""
        state = {**self.extra, **state}
        epoch = record["epoch"]
        names, dropped = ["latest.ckpt"], []
        if self.save_every and (epoch + 1) % self.save_every == 0:
            names.append(f"epoch={epoch:05d}.ckpt")
        for metric, prefix in self.RANKINGS.items():
            value, keep = record[metric], self.keep[metric]
            if value is None or keep <= 0:
                continue
            name = f"{prefix}-epoch={epoch:05d}-{metric}={value:.6f}.ckpt"
            ranked = sorted([*self.best[metric], (value, name)], key=lambda item: item[0])
            if name in [n for _, n in ranked[:keep]]:
                names.append(name)
            dropped += [old for _, old in ranked[keep:]]
            self.best[metric] = ranked[:keep]
        state["best_checkpoints"] = self.best
        for name in names:
            save_checkpoint(self.dir / name, state)
        for old in dropped:  # only once their successors are on disk
            (self.dir / old).unlink(missing_ok=True)
        for bank in self.dir.glob("input_bank_e*.pt"):
            if bank.name != state["bank_file"]:
                bank.unlink(missing_ok=True)

    def restore(self, resumed: dict[str, Any]) -> None:
        """Rebuild the bookkeeping from a resumed checkpoint."""
        for metric, ranked in resumed.get("best_checkpoints", {}).items():
            self.best[metric] = [(float(v), n) for v, n in ranked if (self.dir / n).exists()]


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
        Fitting and validation crops; every process holds all of them.
    settings
        Options of the fit; ``settings.device`` is this process's device.
    checkpoint_dir
        Folder of the checkpoints and input-bank states (written by rank 0 only).
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
        mw_mask = missing_wedge_mask(
            (settings.subtomo_size,) * 3, mw_angle_deg=settings.mw_angle, device=device
        )
    writer = CheckpointWriter(checkpoint_dir, settings, extra_state or {})
    if dist.is_main:
        for stale in checkpoint_dir.parent.rglob(".*.tmp"):  # left by a run killed mid-write
            stale.unlink()
    history: list[dict[str, Any]] = []
    start_epoch = 0
    bank_file = None
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        _check_compatible(state, model, resume_from)
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        generator.set_state(state["generator_state"])
        torch.set_rng_state(state["torch_rng_state"])
        if device.type == "cuda" and state.get("cuda_rng_state") is not None:
            torch.cuda.set_rng_state(state["cuda_rng_state"], device)
        history = list(state["history"])
        start_epoch = state["epoch"] + 1
        _check_same_banks(state, extra_state or {}, resume_from)
        bank_file = state["bank_file"]
        if bank_file is not None:
            if not (checkpoint_dir / bank_file).exists():
                raise InputError(
                    f"{resume_from}: its input-bank state {bank_file} was replaced by a later "
                    "missing-wedge update; resume from latest.ckpt"
                )
            bank = load_checkpoint(checkpoint_dir / bank_file)
            banks.fit0, banks.val0 = bank["fit0"], bank["val0"]
        writer.restore(state)
        if dist.is_main:
            log.info("resumed from %s at epoch %d", resume_from, start_epoch)
    dist.barrier()  # every process has read the checkpoint before rank 0 writes the next

    _place_banks(banks, device)
    if resume_from is None:
        model.set_normalization(*model_input_statistics(banks, settings, mw_mask, dist))
    n_fit = len(banks.fit0)
    steps = math.ceil(n_fit / settings.batch_size)
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
        if (
            settings.update_every
            and settings.wedge_mask
            and epoch > 0
            and epoch % settings.update_every == 0
        ):
            _update_input_banks(model, banks, settings, dist)
            bank_file = writer.bank_name(epoch)
            if dist.is_main:
                writer.save_bank(epoch, banks)
            # Filled wedges carry signal: the inputs' statistics change with the bank.
            model.set_normalization(*model_input_statistics(banks, settings, mw_mask, dist))
        order = torch.randperm(n_fit, generator=generator).to(banks.fit0.device)
        running = torch.zeros((), device=device)
        shown = math.nan
        for step in range(steps):
            idx = order[step * settings.batch_size : (step + 1) * settings.batch_size]
            rotmats = _rotations(len(idx), generator, settings)
            lo, hi = dist.shard_bounds(len(idx))
            # A process without a share of a short batch still runs one pair, with weight
            # 0, so that DDP's gradient all-reduce finds every process.
            scale = dist.world_size * (hi - lo) / len(idx)
            part = slice(lo, hi) if hi > lo else slice(0, 1)
            loss = _loss_of_batch(
                train_module,
                _rows(banks.fit0, idx[part], device),
                _rows(banks.fit1, idx[part], device),
                None if rotmats is None else rotmats[part],
                settings,
                mw_mask,
            )
            if scale != 1.0:
                loss = loss * scale
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.detach()
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
            state = {
                "model_state": model.state_dict(),
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
            writer.write(state, record)
            if callbacks.on_epoch is not None:
                callbacks.on_epoch(record, history)
    dist.barrier()  # rank 0 has written the last checkpoint
    model.eval()
    return history


def _place_banks(banks: Banks, device: torch.device) -> None:
    """Keep the banks resident on the GPU when they take under a third of its free memory."""
    if device.type != "cuda":
        return
    tensors = [t for t in (banks.fit0, banks.fit1, banks.val0, banks.val1) if t is not None]
    free, _ = torch.cuda.mem_get_info(device)
    if sum(t.numel() * t.element_size() for t in tensors) < free / 3:
        for name in ("fit0", "fit1", "val0", "val1"):
            tensor = getattr(banks, name)
            if tensor is not None:
                setattr(banks, name, tensor.to(device))
    else:
        log.info("sub-tomogram banks stay in host memory; batches are copied to %s", device)


def _check_same_banks(state: dict[str, Any], extra: dict[str, Any], path: Path) -> None:
    if state.get("bank_id") != extra.get("bank_id"):
        raise InputError(
            f"{path}: the sub-tomograms were prepared again after this fit started; fit anew "
            "with --overwrite instead of --resume"
        )


def _check_compatible(state: dict[str, Any], model: DeWedgeModel, path: Path) -> None:
    own = model.state_dict()
    theirs = state.get("model_state", {})
    if own.keys() != theirs.keys() or any(own[k].shape != theirs[k].shape for k in own):
        raise InputError(
            f"{path}: checkpoint holds a different network architecture; use the same "
            "unet_params_dict as the run that wrote it, or fit anew with --overwrite"
        )
