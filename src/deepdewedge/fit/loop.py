"""The fitting loop: batches, Adam, wedge updates, validation, checkpoints and resume."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deepdewedge.fit.batch import make_batch
from deepdewedge.fit.loss import loss_weights, masked_fourier_loss
from deepdewedge.fit.wedge_update import fill_missing_wedges
from deepdewedge.fourier import missing_wedge_mask
from deepdewedge.io.checkpoint import load_checkpoint, save_checkpoint
from deepdewedge.io.mrc import InputError
from deepdewedge.model.unet import DeWedgeModel

log = logging.getLogger(__name__)

VAL_SEED_OFFSET = 7919
STATS_SEED_OFFSET = 104729


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
    """Hooks for progress display; the loop itself never prints."""

    on_step: Callable[[int, int, int, float], None] | None = None
    on_epoch: Callable[[dict[str, Any], list[dict[str, Any]]], None] | None = None


def _autocast(settings: FitSettings):
    if settings.precision == "bf16-mixed":
        return torch.autocast(settings.device.type, dtype=torch.bfloat16)
    return torch.autocast(settings.device.type, enabled=False)


def _loss_of_batch(
    model: DeWedgeModel,
    crops0: torch.Tensor,
    crops1: torch.Tensor,
    settings: FitSettings,
    mw_mask: torch.Tensor | None,
    generator: torch.Generator,
) -> torch.Tensor:
    batch = make_batch(
        crops0.to(settings.device, non_blocking=True),
        crops1.to(settings.device, non_blocking=True),
        subtomo_size=settings.subtomo_size,
        mw_mask=mw_mask,
        mw_angle_deg=settings.mw_angle,
        rotate=settings.rotate,
        generator=generator,
        interpolation=settings.interpolation,
    )
    with _autocast(settings):
        output = model(batch.model_input)
    weights = None
    if batch.rot_mw_mask is not None:
        weights = loss_weights(mw_mask, batch.rot_mw_mask)
    return masked_fourier_loss(output, batch.target, weights)


@torch.no_grad()
def validation_loss(
    model: DeWedgeModel, banks: Banks, settings: FitSettings, mw_mask: torch.Tensor | None
) -> float:
    """Mean loss over the validation bank, rotations fixed by the seed across epochs."""
    assert banks.val0 is not None and banks.val1 is not None
    generator = torch.Generator().manual_seed(settings.seed + VAL_SEED_OFFSET)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(banks.val0), settings.batch_size):
        c0, c1 = banks.val0[i : i + settings.batch_size], banks.val1[i : i + settings.batch_size]
        total += float(_loss_of_batch(model, c0, c1, settings, mw_mask, generator)) * len(c0)
        count += len(c0)
    model.train(was_training)
    return total / count


@torch.no_grad()
def model_input_statistics(
    banks: Banks, settings: FitSettings, mw_mask: torch.Tensor | None
) -> tuple[float, float]:
    """Mean and standard deviation of the model inputs of one pass over the fitting bank.

    The inputs are built exactly as in fitting (rotation, crop, extra wedge), with their own
    seeded generator so that the fitting's random stream is untouched. Standardising with
    these statistics gives the network unit-variance inputs; refinement standardises whole
    tomograms the same way.
    """
    generator = torch.Generator().manual_seed(settings.seed + STATS_SEED_OFFSET)
    total = torch.zeros((), dtype=torch.float64, device=settings.device)
    total_sq = torch.zeros_like(total)
    count = 0
    for i in range(0, len(banks.fit0), settings.batch_size):
        batch = make_batch(
            banks.fit0[i : i + settings.batch_size].to(settings.device),
            banks.fit1[i : i + settings.batch_size].to(settings.device),
            subtomo_size=settings.subtomo_size,
            mw_mask=mw_mask,
            mw_angle_deg=settings.mw_angle,
            rotate=settings.rotate,
            generator=generator,
            interpolation=settings.interpolation,
        )
        x = batch.model_input.double()
        total += x.sum()
        total_sq += x.square().sum()
        count += x.numel()
    mean = float(total) / count
    std = max(float(total_sq) / count - mean**2, 0.0) ** 0.5
    return mean, std if std > 0 else 1.0


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

    def save_bank(self, epoch: int, banks: Banks) -> str:
        """Store the input banks after the update at `epoch`; return the file name."""
        name = f"input_bank_e{epoch:05d}.pt"
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


def fit(
    model: DeWedgeModel,
    banks: Banks,
    settings: FitSettings,
    *,
    checkpoint_dir: Path,
    resume_from: Path | None = None,
    extra_state: dict[str, Any] | None = None,
    callbacks: Callbacks | None = None,
) -> list[dict[str, Any]]:
    """Fit `model` on the banks with the loss of Eq. (2) (or plain MSE in noise2noise mode).

    Returns
    -------
    list of dict
        One record per epoch: ``epoch``, ``fitting_loss``, ``val_loss`` (None when not
        computed).

    Notes
    -----
    A run is reproducible on CPU for a given seed: the model is initialised by the caller
    under ``torch.manual_seed(seed)``, batches are shuffled and rotations drawn from one CPU
    generator, and every checkpoint holds the generator, the global RNG, the optimiser, the
    history and the current input-bank state, so a resumed run continues with the same losses.
    """
    callbacks = callbacks or Callbacks()
    device = settings.device
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), **settings.adam_params)
    generator = torch.Generator().manual_seed(settings.seed)
    mw_mask = None
    if settings.wedge_mask:
        mw_mask = missing_wedge_mask(
            (settings.subtomo_size,) * 3, mw_angle_deg=settings.mw_angle, device=device
        )
    writer = CheckpointWriter(checkpoint_dir, settings, extra_state or {})
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
        log.info("resumed from %s at epoch %d", resume_from, start_epoch)

    _place_banks(banks, device)
    if resume_from is None:
        model.set_normalization(*model_input_statistics(banks, settings, mw_mask))
    n_fit = len(banks.fit0)
    steps = math.ceil(n_fit / settings.batch_size)
    model.train()
    for epoch in range(start_epoch, settings.num_epochs):
        if (
            settings.update_every
            and settings.wedge_mask
            and epoch > 0
            and epoch % settings.update_every == 0
        ):
            for name in ("fit0", "val0"):  # the model-input banks; targets stay measured
                crops = getattr(banks, name)
                if crops is not None:
                    filled = fill_missing_wedges(
                        model,
                        crops,
                        mw_angle_deg=settings.mw_angle,
                        size_multiple=model.size_multiple,
                        batch_size=settings.batch_size,
                        device=device,
                    )
                    setattr(banks, name, filled)
            bank_file = writer.save_bank(epoch, banks)
            # Filled wedges carry signal: the inputs' statistics change with the bank.
            model.set_normalization(*model_input_statistics(banks, settings, mw_mask))
        perm = torch.randperm(n_fit, generator=generator)
        running = torch.zeros((), device=device)
        for step in range(steps):
            idx = perm[step * settings.batch_size : (step + 1) * settings.batch_size]
            loss = _loss_of_batch(
                model, banks.fit0[idx], banks.fit1[idx], settings, mw_mask, generator
            )
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"fitting loss became {float(loss)} at epoch {epoch}; lower the learning "
                    "rate (adam_params_dict.lr) or standardize the tomograms"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.detach()
            if callbacks.on_step is not None:
                callbacks.on_step(epoch, step + 1, steps, float(running) / (step + 1))
        record: dict[str, Any] = {
            "epoch": epoch,
            "fitting_loss": float(running) / steps,
            "val_loss": None,
        }
        if banks.val0 is not None and (epoch + 1) % settings.check_val_every == 0:
            record["val_loss"] = validation_loss(model, banks, settings, mw_mask)
        history.append(record)
        if len(history) > 1 and record["fitting_loss"] < 1e-6 * history[0]["fitting_loss"]:
            log.warning(
                "fitting loss collapsed to %.3g (from %.3g): the halves may share their noise, "
                "or the input is constant",
                record["fitting_loss"],
                history[0]["fitting_loss"],
            )
        state = {
            "model_state": model.state_dict(),
            "optimizer_state": optimizer.state_dict(),
            "generator_state": generator.get_state(),
            "torch_rng_state": torch.get_rng_state(),
            "cuda_rng_state": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "epoch": epoch,
            "history": history,
            "bank_file": bank_file,
        }
        writer.write(state, record)
        if callbacks.on_epoch is not None:
            callbacks.on_epoch(record, history)
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
