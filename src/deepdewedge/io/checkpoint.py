"""Checkpoints: model, optimiser, random state, history and provenance in one file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from deepdewedge.io.mrc import InputError

FORMAT = "deepdewedge-checkpoint-v1"


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write `state` to `path` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save({"format": FORMAT, **state}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint file; check model_checkpoint_file")
    try:
        # weights_only: a checkpoint is data (tensors, numbers, strings), never code to run.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for damaged or foreign files
        raise InputError(
            f"{path}: unreadable or truncated checkpoint ({type(err).__name__}); "
            "use another checkpoint, e.g. latest.ckpt"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InputError(f"{path}: not a DeepDeWedge checkpoint; give a .ckpt written by fit-model")
    return state
