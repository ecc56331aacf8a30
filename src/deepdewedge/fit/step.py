"""One fitting step, and the passes over the banks that build batches the same way."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from deepdewedge.fit.bank_files import Bank
from deepdewedge.fit.batch import make_batch
from deepdewedge.fit.distributed import DistContext
from deepdewedge.fit.loss import loss_weights, masked_fourier_loss
from deepdewedge.fourier import missing_wedge_mask
from deepdewedge.model.unet import DeWedgeModel
from deepdewedge.rotation import sample_rotations

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
    # Samples per forward and backward pass; their gradients add up to the batch's. None:
    # the whole batch (or a process's share of it) at once.
    micro_batch_size: int | None = None
    channels_last: bool = False
    compile: bool = False
    # Steps between reads of the running loss by the host; None: every step on the CPU,
    # GPU_SYNC_EVERY_N_STEPS on a GPU.
    sync_every_n_steps: int | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # Tilt range of an asymmetric missing wedge; when given, it defines the wedge, not mw_angle.
    tilt_range_deg: tuple[float, float] | None = None
    # Learning rate over the fit: "constant", or "cosine" (warm-up, then cosine decay).
    lr_schedule: str = "constant"
    # Warm-up epochs of the cosine schedule; None: 5% of the fit.
    lr_warmup_epochs: int | None = None
    # Half-life in epochs of the weight average the checkpoints hold; None: no averaging.
    ema_half_life_epochs: float | None = None
    # Stop after this many epochs without a lower validation loss; None: never.
    early_stopping_patience: int | None = None

    @property
    def wedge(self) -> dict[str, Any]:
        """The missing wedge as keywords of the mask functions of :mod:`deepdewedge.fourier`."""
        if self.tilt_range_deg is not None:
            return {"tilt_range_deg": tuple(self.tilt_range_deg)}
        return {"mw_angle_deg": self.mw_angle}


@dataclass
class Banks:
    """Rotation-ready crops `(n, S, S, S)`: tomo0 (model input) and tomo1 (target) halves.

    Each bank is a tensor (in host or device memory) or a
    :class:`~deepdewedge.fit.bank_files.BankFile` of a file, whose rows are read per batch.

    ``fit_tilt_ranges`` and ``val_tilt_ranges`` are `(n, 2)` tilt ranges in degrees, one per
    row: the range of the tomogram the row was cut from, for banks of tomograms whose ranges
    differ. None: every row has the wedge of the settings (:attr:`FitSettings.wedge`).
    """

    fit0: Bank
    fit1: Bank
    val0: Bank | None = None
    val1: Bank | None = None
    fit_tilt_ranges: torch.Tensor | None = None
    val_tilt_ranges: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for ranges, bank in ((self.fit_tilt_ranges, self.fit1), (self.val_tilt_ranges, self.val1)):
            if ranges is not None and tuple(ranges.shape) != (0 if bank is None else len(bank), 2):
                raise ValueError(
                    f"tilt ranges {tuple(ranges.shape)} do not give one range per row of a bank "
                    f"of {0 if bank is None else len(bank)}"
                )


def _autocast(settings: FitSettings):
    """bf16 autocast of the network under ``bf16-mixed``; the FFT loss stays in float32."""
    if settings.precision == "bf16-mixed":
        return torch.autocast(settings.device.type, dtype=torch.bfloat16)
    return torch.autocast(settings.device.type, enabled=False)


def rows_on_device(bank: Bank, index: torch.Tensor | slice, device: torch.device) -> torch.Tensor:
    """`(k, S, S, S)` rows of a bank on `device`.

    A bank resident on `device` is indexed in place (`index` on that device). From host
    memory or from a bank file (:class:`~deepdewedge.fit.bank_files.BankFile`), the rows are
    gathered into page-locked memory and copied without waiting, so the copy overlaps the
    GPU's work.
    """
    rows = bank[index]
    if rows.device == device:
        return rows
    if device.type == "cuda":
        rows = rows.pin_memory()
    return rows.to(device, non_blocking=True)


def row_tilt_ranges(
    ranges: torch.Tensor | None, index: torch.Tensor | slice, device: torch.device
) -> torch.Tensor | None:
    """`(k, 2)` tilt ranges of the bank rows `index` on `device`, or None without `ranges`."""
    if ranges is None:
        return None
    if isinstance(index, torch.Tensor):
        index = index.to(ranges.device)
    return ranges[index].to(device)


def batch_wedge(
    settings: FitSettings, mw_mask: torch.Tensor | None, tilt_ranges: torch.Tensor | None
) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """The extra-wedge mask M of a batch and its wedge, as keywords of :func:`make_batch`.

    Parameters
    ----------
    settings
        Options of the fit; its wedge is that of rows without a tilt range of their own.
    mw_mask
        `(s, s, s // 2 + 1)` mask M of the settings' wedge, or None for no extra wedge.
    tilt_ranges
        `(b, 2)` tilt range of each pair's tomogram (see :func:`row_tilt_ranges`), or None
        when all pairs have the settings' wedge.

    Returns
    -------
    tuple
        `mw_mask` and ``settings.wedge`` when the pairs share the wedge (or without extra
        wedge); else `(b, s, s, s // 2 + 1)` one mask M per pair and
        ``{"tilt_range_deg": tilt_ranges}``.

    Notes
    -----
    The masks M and M_φ of Eq. (2) are the missing wedge of the pair's own tomogram. Pairs
    of tomograms with different tilt ranges thus get their own M here and their own M_φ in
    :func:`make_batch` (the wedge test on rotated frequencies, one range per volume).
    """
    if mw_mask is None or tilt_ranges is None:
        return mw_mask, settings.wedge
    ranges = tilt_ranges.to(settings.device)
    mask = missing_wedge_mask(
        (settings.subtomo_size,) * 3, tilt_range_deg=ranges, device=settings.device
    )
    return mask, {"tilt_range_deg": ranges}


def batch_rotations(
    n: int, generator: torch.Generator, settings: FitSettings
) -> torch.Tensor | None:
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
    tilt_ranges: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean loss over `(b, S, S, S)` crop pairs on the device, under the given rotations.

    `tilt_ranges` `(b, 2)` gives each pair its own wedge (see :func:`batch_wedge`).
    """
    mw_mask, wedge = batch_wedge(settings, mw_mask, tilt_ranges)
    batch = make_batch(
        crops0,
        crops1,
        subtomo_size=settings.subtomo_size,
        mw_mask=mw_mask,
        **wedge,
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


def accumulate_gradients(
    module: nn.Module,
    crops0: torch.Tensor,
    crops1: torch.Tensor,
    rotmats: torch.Tensor | None,
    settings: FitSettings,
    mw_mask: torch.Tensor | None,
    *,
    scale: float = 1.0,
    tilt_ranges: torch.Tensor | None = None,
) -> torch.Tensor:
    """Add the gradient of `scale` × the mean loss over `(b, S, S, S)` crop pairs to `module`.

    `tilt_ranges` `(b, 2)` gives each pair the wedge of its own tomogram; None: all have the
    wedge of `mw_mask` (see :func:`batch_wedge`).

    The pairs go through the network ``settings.micro_batch_size`` at a time. The U-Net
    normalises each sample on its own (instance norm), so the micro-batches' gradients,
    weighted by their share of the batch, add up to the whole batch's gradient. A DDP module
    all-reduces once, after the last micro-batch. Returns the detached scaled loss.
    """
    n = len(crops0)
    size = settings.micro_batch_size or n
    total = torch.zeros((), device=settings.device)
    for lo in range(0, n, size):
        hi = min(n, lo + size)
        last = hi == n
        defer_sync = not last and isinstance(module, DistributedDataParallel)
        with module.no_sync() if defer_sync else nullcontext():
            loss = _loss_of_batch(
                module,
                crops0[lo:hi],
                crops1[lo:hi],
                None if rotmats is None else rotmats[lo:hi],
                settings,
                mw_mask,
                None if tilt_ranges is None else tilt_ranges[lo:hi],
            )
            loss = loss * (scale * (hi - lo) / n)
            loss.backward()
        total += loss.detach()
    return total


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
    all-reduced, so every process returns the same value. Rows with tilt ranges of their own
    (``banks.val_tilt_ranges``) are masked with their own wedge, as in fitting.
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
        rotmats = batch_rotations(n, generator, settings)
        lo, hi = dist.shard_bounds(n)
        if hi == lo:
            continue
        size = settings.micro_batch_size or hi - lo
        for start in range(lo, hi, size):
            stop = min(hi, start + size)
            rows = slice(i + start, i + stop)
            loss = _loss_of_batch(
                model,
                rows_on_device(banks.val0, rows, settings.device),
                rows_on_device(banks.val1, rows, settings.device),
                None if rotmats is None else rotmats[start:stop],
                settings,
                mw_mask,
                row_tilt_ranges(banks.val_tilt_ranges, rows, settings.device),
            )
            total += loss.double() * (stop - start)
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
        rotmats = batch_rotations(n, generator, settings)
        lo, hi = dist.shard_bounds(n)
        if hi == lo:
            continue
        rows = slice(i + lo, i + hi)
        mask, wedge = batch_wedge(
            settings, mw_mask, row_tilt_ranges(banks.fit_tilt_ranges, rows, settings.device)
        )
        batch = make_batch(
            rows_on_device(banks.fit0, rows, settings.device),
            rows_on_device(banks.fit1, rows, settings.device),
            subtomo_size=settings.subtomo_size,
            mw_mask=mask,
            **wedge,
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
