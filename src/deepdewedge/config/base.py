"""What every step's config shares: the YAML sections, the project, seed and device."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
)

SECTIONS = (
    "shared",
    "dataset",
    "reconstruct",
    "make_mask",
    "prepare_data",
    "fit_model",
    "refine_tomogram",
)
# Arithmetic of the U-Net: "auto" is bf16 autocast on GPUs and float32 on the CPU. YAML's
# `precision: 32` (a number, as in published configs) means "32".
Precision = Annotated[
    Literal["auto", "32", "bf16-mixed"],
    BeforeValidator(lambda v: str(v) if isinstance(v, int) and not isinstance(v, bool) else v),
]
# Process-group backends a multi-process fit can use.
DISTRIBUTED_BACKENDS = ("nccl", "gloo")


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    project_dir: Path = Field(
        Path("./ddw_project"),
        description="Project directory: sub-tomograms, logs, checkpoints, refined tomograms.",
    )
    seed: int = Field(42, description="Random seed.")
    gpu: int | list[int] | None = Field(None, description="GPU index; omit to run on the CPU.")
