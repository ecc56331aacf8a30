"""Checkpoints of a fit: which are kept, and whether one can be resumed here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deepdewedge.fit.step import FitSettings
from deepdewedge.io.checkpoint import save_checkpoint
from deepdewedge.io.mrc import InputError
from deepdewedge.model.unet import DeWedgeModel


class CheckpointWriter:
    """Writes latest / best / every-n checkpoints and the input-bank state.

    The best checkpoints are ranked by validation loss (``best-val-*``) and by fitting loss
    (``best-fit-*``). The model-input bank changes at every missing-wedge update; its state
    is stored once per update as ``input_bank_eNNNNN.npy`` (fitting rows, then validation
    rows; earlier versions wrote ``.pt`` files) and only the one ``latest.ckpt`` needs is
    kept, so disk use stays at one bank whatever the number of checkpoints. Every checkpoint
    holds the model, optimiser, random state and history; a checkpoint other than the latest
    can be resumed from until the next wedge update replaces its bank.
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
        return f"input_bank_e{epoch:05d}.npy"

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
        for bank in [*self.dir.glob("input_bank_e*.npy"), *self.dir.glob("input_bank_e*.pt")]:
            if bank.name != state["bank_file"]:
                bank.unlink(missing_ok=True)

    def restore(self, resumed: dict[str, Any]) -> None:
        """Rebuild the bookkeeping from a resumed checkpoint, with the weights it started from."""
        if "init_from" in resumed:
            self.extra["init_from"] = resumed["init_from"]
        for metric, ranked in resumed.get("best_checkpoints", {}).items():
            self.best[metric] = [(float(v), n) for v, n in ranked if (self.dir / n).exists()]


def check_same_banks(state: dict[str, Any], extra: dict[str, Any], path: Path) -> None:
    """Refuse to resume the checkpoint `state` (at `path`) on banks prepared after it."""
    if state.get("bank_id") != extra.get("bank_id"):
        raise InputError(
            f"{path}: the sub-tomograms were prepared again after this fit started; fit anew "
            "with --overwrite instead of --resume"
        )


def check_compatible(
    state: dict[str, Any],
    model: DeWedgeModel,
    path: Path,
    *,
    fix: str = "use the same unet_params_dict as the run that wrote it, or fit anew with "
    "--overwrite",
) -> None:
    """Refuse to load the checkpoint `state` (at `path`) into a different architecture.

    Besides the weights' shapes, the switches that change what the same weights compute
    (``residual``, ``affine_equivariant``; absent from older checkpoints, i.e. off) must
    agree. The one-line error names `path` and ends with `fix`.
    """
    own = model.state_dict()
    theirs = state.get("model_state", {})
    if own.keys() != theirs.keys() or any(own[k].shape != theirs[k].shape for k in own):
        raise InputError(f"{path}: checkpoint holds a different network architecture; {fix}")
    params = state.get("unet_params") or {}
    for switch in ("residual", "affine_equivariant"):
        mine, stored = bool(getattr(model.unet, switch)), bool(params.get(switch, False))
        if mine != stored:
            raise InputError(
                f"{path}: checkpoint was fitted with {switch}: {str(stored).lower()}, this run "
                f"has {switch}: {str(mine).lower()}; {fix}"
            )
