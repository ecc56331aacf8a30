"""The steps as users run them: config in, files in the project directory out.

This is the only package that mixes file layout with the algorithms. Layout of a project::

    {project_dir}/subtomos/{fitting,val}/subtomo{0,1}.npy   rotation-ready crop banks
    {project_dir}/subtomos/metadata.json                     sizes, coordinates, sources
    {project_dir}/logs/checkpoints/*.ckpt                    latest, best-val, every-n
    {project_dir}/logs/losses.csv                            one row per epoch
    {project_dir}/refined_tomograms/*.mrc                    refined tomograms (+ .json)

Each step's module (and torch with it) is imported when one of its names is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> the module that defines it.
_MODULES = {
    "best_checkpoint": "fitting",
    "fit_model": "fitting",
    "load_banks": "prepare",
    "load_model": "fitting",
    "log_dir": "fitting",
    "make_mask": "masking",
    "prepare_data": "prepare",
    "provenance": "common",
    "reconstruct": "reconstruction",
    "refine_tomogram": "refining",
    "resolve_device": "common",
    "subtomo_dir": "prepare",
}

__all__ = [
    "best_checkpoint",
    "fit_model",
    "load_banks",
    "load_model",
    "log_dir",
    "make_mask",
    "prepare_data",
    "provenance",
    "reconstruct",
    "refine_tomogram",
    "resolve_device",
    "subtomo_dir",
]

if TYPE_CHECKING:
    from deepdewedge.pipeline.common import provenance, resolve_device
    from deepdewedge.pipeline.fitting import best_checkpoint, fit_model, load_model, log_dir
    from deepdewedge.pipeline.masking import make_mask
    from deepdewedge.pipeline.prepare import load_banks, prepare_data, subtomo_dir
    from deepdewedge.pipeline.reconstruction import reconstruct
    from deepdewedge.pipeline.refining import refine_tomogram


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        module = importlib.import_module(f"{__name__}.{_MODULES[name]}")
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULES})
