"""Step 2: fit the network on the banks; checkpoints and loss logs."""

from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from deepdewedge import __version__
from deepdewedge.config import (
    FitModelConfig,
    RefineTomogramConfig,
    check_divisible,
)
from deepdewedge.cpu import cpu_micro_batch, set_cpu_threads
from deepdewedge.evaluate.figures import loss_curve_figure
from deepdewedge.fit import distributed
from deepdewedge.fit.checkpoints import check_compatible
from deepdewedge.fit.distributed import DistContext
from deepdewedge.fit.loop import Banks, Callbacks, FitSettings, fit
from deepdewedge.io.checkpoint import load_checkpoint
from deepdewedge.io.mrc import InputError
from deepdewedge.model.unet import DeWedgeModel
from deepdewedge.pipeline.common import (
    check_writable,
    provenance,
    resolve_device,
    resolve_precision,
    save_figure,
    write_csv,
)
from deepdewedge.pipeline.prepare import load_banks, subtomo_dir

log = logging.getLogger(__name__)


def log_dir(config: FitModelConfig | RefineTomogramConfig) -> Path:
    """Folder of the loss CSV and the checkpoints: ``logdir``, else ``{project_dir}/logs``."""
    return Path(getattr(config, "logdir", None) or Path(config.project_dir) / "logs")


def build_model(unet_params: dict[str, Any]) -> DeWedgeModel:
    """The network of a config or checkpoint."""
    return DeWedgeModel(**unet_params)


def fit_model(config: FitModelConfig, *, callbacks: Callbacks | None = None) -> dict[str, Any]:
    """Step 2: fit the network on the prepared banks; write checkpoints and the loss CSV.

    Started by ``torchrun`` with several processes, the fit runs data-parallel (DDP), one
    process per GPU, with the same result as one process up to rounding::

        torchrun --nproc_per_node 4 -m deepdewedge.cli fit-model --config config.yaml

    and on SLURM ``srun torchrun --nnodes N --nproc_per_node 4 --rdzv_backend c10d
    --rdzv_endpoint HEAD:29500 -m deepdewedge.cli fit-model ...`` (one ``torchrun`` per node;
    see :mod:`deepdewedge.fit.distributed`). ``batch_size`` is then the batch of all processes
    together; only rank 0 writes files and reports progress.

    Returns
    -------
    dict
        ``history`` (one record per epoch), ``checkpoint`` (the latest),
        ``best_checkpoint`` (lowest validation loss, or the latest without validation) and
        ``is_main_process`` (False in the processes other than rank 0 of a multi-process fit).
    """
    if not distributed.launched():
        return _fit_model(config, resolve_device(config.gpu), DistContext(), callbacks)
    device = distributed.local_device(config.gpu)
    with distributed.process_group(device, backend=config.distributed_backend) as dist:
        return _fit_model(config, device, dist, callbacks)


def _fit_model(
    config: FitModelConfig,
    device: torch.device,
    dist: DistContext,
    callbacks: Callbacks | None,
) -> dict[str, Any]:
    banks, meta = load_banks(subtomo_dir(config), subtomo_size=config.subtomo_size)
    subtomo_size = int(meta["subtomo_size"])
    mw_angle, tilt_range = _wedge_of_banks(meta, config.mw_angle, subtomo_dir(config))
    tomo_ranges = _tilt_ranges_of_banks(meta, banks, tilt_range, subtomo_dir(config))
    if tomo_ranges is not None and dist.is_main:
        log.info("the tomograms' tilt ranges differ: each sub-tomogram has its own wedge")
    if config.early_stopping_patience and banks.val1 is None:
        raise InputError(
            f"{subtomo_dir(config)}: early_stopping_patience needs validation sub-tomograms; "
            "prepare the data with val_fraction > 0, or leave early_stopping_patience out"
        )
    unet_params = config.unet_params_dict.model_dump(exclude={"in_chans", "out_chans"})
    try:
        check_divisible(subtomo_size, 2 ** unet_params["num_downsample_layers"])
    except ValueError as err:
        raise InputError(f"{subtomo_dir(config)}: {err}") from None
    logs = log_dir(config)
    ckpt_dir = logs / "checkpoints"
    latest = ckpt_dir / "latest.ckpt"
    resume_from = config.resume_from_checkpoint or (latest if config.resume else None)
    if resume_from is not None and not Path(resume_from).exists():
        raise InputError(f"{resume_from}: nothing to resume from; run fit-model without --resume")
    if resume_from is None and latest.exists() and not config.overwrite:
        raise InputError(
            f"{latest}: a fit already exists; pass --resume to continue it or --overwrite "
            "to start again and discard its checkpoints"
        )
    torch.manual_seed(config.seed)
    model = build_model(unet_params)
    init_from = None
    if resume_from is None and config.init_from is not None:
        init_from = str(config.init_from)
        _load_weights(model, Path(config.init_from))
    elif config.init_from is not None and dist.is_main:
        log.info("resuming %s: init_from %s is not used", resume_from, config.init_from)
    precision = resolve_precision(config.precision, device)
    micro_batch = config.micro_batch_size
    if device.type == "cpu":
        threads = set_cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        if micro_batch is None:
            micro_batch = cpu_micro_batch(unet_params["chans"], subtomo_size, precision)
        if dist.is_main:
            log.info(
                "fitting on the CPU: %d threads, precision %s, micro-batches of %d",
                threads,
                precision,
                min(micro_batch, config.batch_size),
            )
    adam = config.adam_params_dict.model_dump()
    adam["betas"] = tuple(adam["betas"])
    settings = FitSettings(
        subtomo_size=subtomo_size,
        mw_angle=mw_angle,
        tilt_range_deg=tilt_range,
        num_epochs=config.num_epochs,
        batch_size=config.batch_size,
        adam_params=adam,
        seed=config.seed,
        rotate=config.rotate,
        wedge_mask=config.wedge_mask,
        interpolation=config.interpolation,
        update_every=config.update_subtomo_missing_wedges_every_n_epochs,
        check_val_every=config.check_val_every_n_epochs,
        save_every=config.save_model_every_n_epochs,
        keep_best_val=config.save_n_models_with_lowest_val_loss,
        keep_best_fit=config.save_n_models_with_lowest_fitting_loss,
        precision=precision,
        micro_batch_size=micro_batch,
        channels_last=config.channels_last,
        compile=config.compile,
        device=device,
        lr_schedule=config.lr_schedule,
        lr_warmup_epochs=config.lr_warmup_epochs,
        ema_half_life_epochs=config.ema_half_life_epochs,
        early_stopping_patience=config.early_stopping_patience,
    )
    extra = {
        **provenance(config),
        "bank_id": meta.get("bank_id"),
        "unet_params": unet_params,
        "subtomo_size": subtomo_size,
        "mw_angle": mw_angle,
        "tilt_range_deg": list(tilt_range) if tilt_range is not None else None,
        "tilt_ranges_deg": tomo_ranges,
        "init_from": init_from,
    }
    # Two input-bank files (the kept one and the next) at a missing-wedge update.
    input_bytes = sum(4 * math.prod(b.shape) for b in (banks.fit0, banks.val0) if b is not None)
    check_writable(logs, needed_bytes=2 * input_bytes)
    if dist.is_main:
        if resume_from is None and ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)  # --overwrite, checked above; only now that all is valid
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    callbacks = callbacks or Callbacks()
    on_epoch = callbacks.on_epoch

    board = _tensorboard(logs) if config.logger == "tensorboard" and dist.is_main else None

    def write_losses(record: dict[str, Any], history: list[dict[str, Any]]) -> None:
        write_loss_csv(logs / "losses.csv", history)  # atomic: a kill leaves the old file
        if board is not None:
            for key in ("fitting_loss", "val_loss"):
                if record[key] is not None:
                    board.add_scalar(key, record[key], record["epoch"])
            board.flush()
        if record["val_loss"] is not None or record["epoch"] + 1 == config.num_epochs:
            save_figure(
                loss_curve_figure(
                    [r["epoch"] for r in history],
                    [r["fitting_loss"] for r in history],
                    [r["val_loss"] for r in history],
                ),
                logs / "loss_curve.png",
            )
        if on_epoch is not None:
            on_epoch(record, history)

    # Fixed batch shapes: on a GPU, let cuDNN time its 3D convolution algorithms once and
    # keep the fastest.
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = benchmark or device.type == "cuda"
    try:
        history = fit(
            model,
            banks,
            settings,
            checkpoint_dir=ckpt_dir,
            resume_from=resume_from,
            extra_state=extra,
            callbacks=Callbacks(on_step=callbacks.on_step, on_epoch=write_losses),
            dist=dist,
        )
    finally:
        torch.backends.cudnn.benchmark = benchmark
    return {
        "history": history,
        "checkpoint": latest,
        "best_checkpoint": best_checkpoint(ckpt_dir),
        "is_main_process": dist.is_main,
    }


def _load_weights(model: DeWedgeModel, path: Path) -> None:
    """Start `model` from the network weights of the checkpoint `path` (fine-tuning).

    The input normalisation the checkpoint holds is replaced by the fit, which computes it
    on the new banks.
    """
    if not path.exists():
        raise InputError(
            f"{path}: no such checkpoint file; check init_from (a .ckpt written by ddw fit-model)"
        )
    state = load_checkpoint(path)
    theirs = state.get("unet_params")
    check_compatible(
        state,
        model,
        path,
        fix=f"fit with its unet_params_dict ({theirs}) or leave init_from out",
    )
    model.load_state_dict(state["model_state"])
    log.info("network weights start from %s", path)


def _wedge_of_banks(
    meta: dict[str, Any], mw_angle: float | None, bank_dir: Path
) -> tuple[float, tuple[float, float] | None]:
    """The banks' missing wedge (angle, tilt range); a contradicting `mw_angle` is an error.

    Banks prepared before the wedge was recorded with them take `mw_angle`, else 60°.
    """
    recorded = meta.get("mw_angle")
    if recorded is None:
        return (60.0 if mw_angle is None else mw_angle), None
    if mw_angle is not None and abs(mw_angle - recorded) > 0.5:
        raise InputError(
            f"{bank_dir / 'metadata.json'}: the sub-tomograms were prepared for a missing "
            f"wedge of {recorded:g}°, but fit_model.mw_angle is {mw_angle:g}°; leave mw_angle "
            f"out of fit-model or prepare again with --mw-angle {mw_angle:g}"
        )
    lo, hi = meta["tilt_range_deg"]
    return float(recorded), (float(lo), float(hi))


def _tilt_ranges_of_banks(
    meta: dict[str, Any],
    banks: Banks,
    common: tuple[float, float] | None,
    bank_dir: Path,
) -> list[list[float]] | None:
    """Give each bank row its tomogram's tilt range where the tomograms' ranges differ.

    Tomograms of unknown range (null in ``tilt_ranges_deg``) take the common wedge `common`.
    When all ranges agree within 0.5° (one tomogram, one tilt scheme, a given ``mw_angle``),
    or the banks predate per-tomogram ranges, nothing changes: every row has the common
    wedge and the fit keeps one precomputed mask. Otherwise ``banks.fit_tilt_ranges`` and
    ``banks.val_tilt_ranges`` get one range per row (from the ``subtomos`` records: the k-th
    row of a split is its k-th record), and the per-tomogram ranges are returned for the
    checkpoints.
    """
    recorded = meta.get("tilt_ranges_deg")
    if recorded is None or common is None:
        return None
    ranges = [[float(lo), float(hi)] for lo, hi in (r or common for r in recorded)]
    per_tomo = torch.tensor(ranges, dtype=torch.float64)
    if float((per_tomo.amax(dim=0) - per_tomo.amin(dim=0)).max()) <= 0.5:
        return None
    meta_file = bank_dir / "metadata.json"
    for split, half in (("fitting", banks.fit1), ("val", banks.val1)):
        tomos = [r["tomo_index"] for r in meta.get("subtomos", []) if r["split"] == split]
        n_rows = 0 if half is None else len(half)
        if len(tomos) != n_rows or max(tomos, default=0) >= len(ranges):
            raise InputError(
                f"{meta_file}: its sub-tomogram records do not match the {split} banks; "
                "prepare the sub-tomograms again (ddw prepare-data --overwrite)"
            )
        rows = per_tomo[torch.tensor(tomos, dtype=torch.long)] if tomos else None
        if split == "fitting":
            banks.fit_tilt_ranges = rows
        else:
            banks.val_tilt_ranges = rows
    return ranges


def _tensorboard(logs: Path) -> Any:
    """A TensorBoard writer under ``{logdir}/tensorboard``, if tensorboard is installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning(
            "tensorboard is not installed (pip install tensorboard); losses go to %s only",
            logs / "losses.csv",
        )
        return None
    return SummaryWriter(log_dir=str(logs / "tensorboard"))


def write_loss_csv(path: Path, history: list[dict[str, Any]]) -> None:
    """One row per epoch: epoch, fitting_loss, val_loss (empty when not computed)."""
    write_csv(path, history, ["epoch", "fitting_loss", "val_loss"])


def best_checkpoint(ckpt_dir: Path) -> Path:
    """The checkpoint with the lowest validation loss, else the latest."""
    best = sorted(
        ckpt_dir.glob("best-val-*.ckpt"), key=lambda p: float(p.stem.split("val_loss=")[1])
    )
    return best[0] if best else ckpt_dir / "latest.ckpt"


def load_model(path: Path) -> tuple[DeWedgeModel, dict[str, Any]]:
    """Rebuild the fitted network stored in a checkpoint."""
    state = load_checkpoint(path)
    model = build_model(state["unet_params"])
    try:
        model.load_state_dict(state["model_state"])
    except RuntimeError:
        raise InputError(
            f"{path}: weights do not match the network layout of this version "
            f"({__version__}; written by {state.get('deepdewedge_version', 'unknown')}); "
            "refine with the version that fitted it or fit again"
        ) from None
    return model.eval(), state
