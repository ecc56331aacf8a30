"""Checkpoints: model, optimiser, random state, history and provenance in one file."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from deepdewedge.io.atomic import atomic_write
from deepdewedge.io.errors import InputError

FORMAT = "deepdewedge-checkpoint-v1"


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write `state` to `path` atomically (temporary file in the same folder, then rename).

    Raises
    ------
    InputError
        When the folder cannot be created or written (full disk, permissions): one line
        naming the file; `path` is then left as it was.
    """
    with atomic_write(
        path, fix="free disk space, then continue with `ddw fit-model --resume`"
    ) as tmp:
        torch.save({"format": FORMAT, **state}, tmp)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` onto the CPU.

    Raises
    ------
    InputError
        One line naming the file when it is missing, a folder, damaged (e.g. cut short by a
        full disk or an interrupted copy), written by another program, or not ours.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such checkpoint file; check model_checkpoint_file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory; give a .ckpt file written by ddw fit-model")
    fix = (
        "use another checkpoint of the same fit (latest.ckpt, epoch=*.ckpt or best-*.ckpt) "
        "or fit again with ddw fit-model --overwrite"
    )
    # torch.save writes a zip archive whose directory is at the end: a file cut short, empty
    # or overwritten by something else has none.
    if not zipfile.is_zipfile(path):
        size = path.stat().st_size
        raise InputError(
            f"{path}: unreadable or truncated checkpoint ({size} bytes, not a complete "
            f"PyTorch archive); {fix}"
        )
    try:
        # weights_only: a checkpoint is data (tensors, numbers, strings), never code to run.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise InputError(
            f"{path}: not a DeepDeWedge checkpoint (it holds Python objects, e.g. a PyTorch "
            "Lightning checkpoint of the published DeepDeWedge); give a .ckpt written by "
            "ddw fit-model"
        ) from None
    except Exception as err:  # torch raises many kinds for damaged or foreign files
        raise InputError(
            f"{path}: unreadable or truncated checkpoint ({type(err).__name__}); {fix}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InputError(
            f"{path}: not a DeepDeWedge checkpoint; give a .ckpt written by ddw fit-model"
        )
    return state
