"""DeepDeWedge: self-supervised denoising and missing-wedge reconstruction for cryo-ET.

The step functions are imported on first use, so that ``import deepdewedge`` (and the ``ddw``
command line's help) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "fit_model", "prepare_data", "refine_tomogram"]

if TYPE_CHECKING:
    from deepdewedge.pipeline import fit_model, prepare_data, refine_tomogram


def __getattr__(name: str) -> Any:
    if name in __all__:
        value = getattr(importlib.import_module("deepdewedge.pipeline"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
