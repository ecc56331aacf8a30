"""Config of a dataset run: which tomograms, which to fit on, which shard."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from deepdewedge.config.base import _Step


class DatasetConfig(_Step):
    """``ddw run --dataset``: fit one model and refine every tomogram of a dataset."""

    path: str | None = Field(
        None,
        description="The dataset: an AreTomo3 output folder, a Warp/WarpTools project, a "
        "RELION-5 tomograms.star, or a folder or glob of paired half tomograms; default: the "
        "tomo0_files and tomo1_files of the config.",
    )
    fit_on: list[str] | int | None = Field(
        None,
        description="Tomograms to fit on: names or patterns (TS_0*), or a number spread evenly "
        "over the dataset; default: all.",
    )
    shard: str | None = Field(
        None,
        description="K/N: refine only every N-th tomogram from the K-th; default: from "
        "SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT, else the whole dataset.",
    )

    @field_validator("fit_on")
    @classmethod
    def _some(cls, v: list[str] | int | None) -> list[str] | int | None:
        if isinstance(v, int) and v < 1:
            raise ValueError("fit on at least one tomogram; give a number >= 1 or names")
        return v

    @field_validator("shard")
    @classmethod
    def _k_of_n(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"\d+/\d+", v.strip()):
            raise ValueError("not K/N; give e.g. 2/4")
        return v
