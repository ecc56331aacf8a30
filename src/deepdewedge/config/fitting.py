"""Configs of the DeepDeWedge steps: prepare-data, fit-model and refine-tomogram."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from deepdewedge.config.base import DISTRIBUTED_BACKENDS, Precision, _Step


class UNetParams(BaseModel):
    """Architecture of the U-Net (``unet_params_dict``)."""

    model_config = ConfigDict(extra="forbid")

    in_chans: Literal[1] = 1
    out_chans: Literal[1] = 1

    chans: int = Field(64, ge=1)
    num_downsample_layers: int = Field(3, ge=1)
    drop_prob: float = Field(0.0, ge=0.0, lt=1.0)
    # The published implementation adds the input to the output; on real data that network
    # hardly denoises (docs/evaluation.md, "Ablation"), so it is off by default.
    residual: bool = False
    # Restores each input's mean and contrast, which the instance norms discard; on real data
    # that keeps the tomogram's large-scale contrast (docs/method.md, "Network"). Checkpoints
    # written without it hold networks without it.
    affine_equivariant: bool = True


class AdamParams(BaseModel):
    """Options of ``torch.optim.Adam`` (``adam_params_dict``)."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(4e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    amsgrad: bool = False


class PrepareDataConfig(_Step):
    """``ddw prepare-data``: sub-tomogram banks from pairs of half tomograms."""

    tomo0_files: list[Path] = Field(description="Half tomogram 0 of each tomogram (MRC).")
    tomo1_files: list[Path] = Field(
        description="Half tomogram 1 of each tomogram (MRC), in the order of tomo0_files."
    )
    subtomo_size: int = Field(96, ge=8, description="Edge of the sub-tomograms in px.")
    mw_angle: float | None = Field(
        None,
        ge=0,
        lt=180,
        description="Full opening angle of the missing wedge in degrees; default: the tilt "
        "range ddw reconstruct recorded beside the half tomograms (an asymmetric one too), "
        "else 60. Recorded with the sub-tomograms for fit-model.",
    )
    tilt_ranges_deg: list[tuple[float, float] | None] | None = Field(
        None,
        description="Lowest and highest tilt angle in degrees of each tomogram, in the order "
        "of tomo0_files; default: the tilt range ddw reconstruct recorded beside the half "
        "tomograms.",
    )
    subtomo_dir: Path | None = Field(
        None, description="Folder of the sub-tomogram banks; default: {project_dir}/subtomos."
    )
    mask_files: list[Path] | None = Field(
        None,
        description="Sample mask of each tomogram (MRC), in the order of tomo0_files; "
        "default: no mask.",
    )
    min_nonzero_mask_fraction_in_subtomo: float = Field(
        0.3, ge=0, le=1, description="Smallest fraction of a sub-tomogram inside the mask."
    )
    subtomo_extraction_strides: list[int] | None = Field(
        None,
        description="Sliding-window strides z, y, x in px; default: subtomo_size along each axis.",
    )
    val_fraction: float = Field(
        0.1, ge=0, lt=1, description="Fraction of the sub-tomograms kept for validation."
    )
    standardize_full_tomos: bool = Field(
        False, description="Scale each half tomogram to zero mean, unit standard deviation."
    )
    overwrite: bool = Field(False, description="Replace prepared sub-tomograms.")

    @field_validator("subtomo_extraction_strides")
    @classmethod
    def _three_strides(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(v) != 3 or min(v) < 1):
            raise ValueError(
                "need three positive strides; give them as [z, y, x], e.g. [64, 80, 80]"
            )
        return v

    @model_validator(mode="after")
    def _paired(self) -> PrepareDataConfig:
        if len(self.tomo0_files) != len(self.tomo1_files) or not self.tomo0_files:
            raise ValueError(
                f"tomo0_files ({len(self.tomo0_files)}) and tomo1_files "
                f"({len(self.tomo1_files)}) must list the same, non-zero number of tomograms; "
                "give the two halves of each tomogram, in the same order"
            )
        if self.mask_files is not None and len(self.mask_files) != len(self.tomo0_files):
            raise ValueError(
                f"mask_files ({len(self.mask_files)}) must list one mask per tomogram pair "
                f"({len(self.tomo0_files)}); give the masks in the order of tomo0_files"
            )
        ranges = self.tilt_ranges_deg
        if ranges is not None and len(ranges) != len(self.tomo0_files):
            raise ValueError(
                f"tilt_ranges_deg ({len(ranges)}) must give one range per tomogram pair "
                f"({len(self.tomo0_files)}); give them in the order of tomo0_files"
            )
        if any(r is not None and not -90 < r[0] < r[1] < 90 for r in ranges or []):
            raise ValueError(
                "tilt_ranges_deg: each range must be [lowest, highest] with -90 < lowest < "
                "highest < 90; give the tilt angles in degrees"
            )
        return self

    @property
    def strides(self) -> tuple[int, int, int]:
        """Extraction strides, `subtomo_size` along each axis by default."""
        s = self.subtomo_extraction_strides or [self.subtomo_size] * 3
        return (s[0], s[1], s[2])


class FitModelConfig(_Step):
    """``ddw fit-model``: fit the U-Net on the sub-tomogram banks."""

    subtomo_size: int | None = Field(
        None,
        ge=8,
        description="Edge of the fitted sub-tomograms in px; default: the size they were "
        "prepared with.",
    )
    subtomo_dir: Path | None = Field(
        None, description="Folder of the sub-tomogram banks; default: {project_dir}/subtomos."
    )
    logdir: Path | None = Field(
        None, description="Folder of losses and checkpoints; default: {project_dir}/logs."
    )
    mw_angle: float | None = Field(
        None,
        ge=0,
        lt=180,
        description="Full opening angle of the missing wedge in degrees; default: the wedge "
        "recorded with the sub-tomograms, which a different value contradicts (an error).",
    )
    unet_params_dict: UNetParams = Field(
        UNetParams(),
        description="U-Net architecture, e.g. {chans: 32, num_downsample_layers: 3, "
        "drop_prob: 0}; keys not given keep their default.",
    )
    adam_params_dict: AdamParams = Field(
        AdamParams(),
        description="Adam options, e.g. {lr: 4e-4}; keys not given keep their default.",
    )
    num_epochs: int = Field(1000, ge=1, description="Length of the fit in epochs.")
    batch_size: int = Field(
        5, ge=1, description="Sub-tomogram pairs per step (over all processes)."
    )
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="Learning rate over the fit: constant (adam_params_dict.lr throughout), or "
        "cosine (linear warm-up to adam_params_dict.lr, then half a cosine down to 1% of it "
        "at num_epochs).",
    )
    lr_warmup_epochs: int | None = Field(
        None, ge=0, description="Warm-up epochs of the cosine schedule; default: 5% of num_epochs."
    )
    ema_half_life_epochs: float | None = Field(
        None,
        gt=0,
        description="Average the network's weights over the fit, a step counting half as much "
        "this many epochs later; validation, missing-wedge updates and checkpoints use the "
        "average. null: no averaging.",
    )
    early_stopping_patience: int | None = Field(
        None,
        ge=1,
        description="Stop the fit after this many epochs without a lower validation loss; "
        "null: run all num_epochs.",
    )
    update_subtomo_missing_wedges_every_n_epochs: int | None = Field(
        10,
        ge=1,
        description="Fill the missing wedges of the input sub-tomograms with the model's "
        "prediction every this many epochs; null: never.",
    )
    check_val_every_n_epochs: int = Field(
        10, ge=1, description="Compute the validation loss every this many epochs."
    )
    save_model_every_n_epochs: int | None = Field(
        50, ge=1, description="Keep a checkpoint every this many epochs; null: never."
    )
    save_n_models_with_lowest_val_loss: int = Field(
        1, ge=0, description="Checkpoints kept with the lowest validation loss."
    )
    save_n_models_with_lowest_fitting_loss: int = Field(
        0, ge=0, description="Checkpoints kept with the lowest fitting loss."
    )
    logger: Literal["csv", "tensorboard"] = Field(
        "csv",
        description="Accepted for published configs: losses always go to {logdir}/losses.csv.",
    )
    distributed_backend: str | None = Field(
        None,
        description="Process-group backend of a fit launched by torchrun: nccl or gloo; "
        "default (or a published strategy name such as ddp): nccl on GPUs, gloo on the CPU.",
    )
    rotate: bool = Field(
        True, description="Rotate the sub-tomogram pairs at random (off: noise2noise-only)."
    )
    wedge_mask: bool = Field(
        True,
        description="Extra missing wedge on the input and the masked loss (off: noise2noise-only).",
    )
    interpolation: Literal["cubic", "linear"] = Field(
        "cubic", description="Interpolation of the rotations: cubic or linear."
    )
    precision: Precision = Field(
        "auto",
        description="Arithmetic of the U-Net: auto (bf16-mixed on GPUs and on CPUs with native "
        "bf16, else 32), 32 or bf16-mixed.",
    )
    micro_batch_size: int | None = Field(
        None,
        ge=1,
        description="Sub-tomograms per forward and backward pass; their gradients add up to "
        "the batch's, so the fit is the same. null: the whole batch on GPUs, as many as fit "
        "the CPU's cache on the CPU.",
    )
    channels_last: bool = Field(
        False, description="GPU speed-up: the U-Net in the channels-last 3D memory layout."
    )
    compile: bool = Field(
        False,
        description="GPU speed-up: torch.compile the U-Net (falling back to the uncompiled "
        "network, with a warning, if compiling fails).",
    )
    resume: bool = Field(False, description="Continue from the latest checkpoint.")
    resume_from_checkpoint: Path | None = Field(None, description="Continue from this checkpoint.")
    init_from: Path | None = Field(
        None,
        description="Checkpoint whose network weights start the fit (fine-tuning); the "
        "optimiser starts anew.",
    )
    overwrite: bool = Field(False, description="Discard an existing fit.")

    @field_validator("distributed_backend")
    @classmethod
    def _backend(cls, v: str | None) -> str | None:
        if v is None:
            return None
        name = v.lower()
        if name in DISTRIBUTED_BACKENDS or name in ("auto", "dp") or name.startswith("ddp"):
            return name
        raise ValueError(
            f"unknown distributed_backend {v!r}; use nccl (GPUs) or gloo (CPU), or leave it "
            "out to choose by device"
        )

    @model_validator(mode="after")
    def _divisible(self) -> FitModelConfig:
        if self.subtomo_size is not None:
            check_divisible(self.subtomo_size, 2**self.unet_params_dict.num_downsample_layers)
        return self


class RefineTomogramConfig(_Step):
    """``ddw refine-tomogram``: apply the fitted model to whole tomograms."""

    tomo0_files: list[Path] | None = Field(
        None, description="Half tomogram 0 of each tomogram to refine (MRC)."
    )
    tomo1_files: list[Path] | None = Field(
        None, description="Half tomogram 1 of each tomogram (MRC), in the order of tomo0_files."
    )
    tomo_files: list[Path] | None = Field(
        None, description="Full tomograms to refine instead of averaging refined halves (MRC)."
    )
    model_checkpoint_file: Path | None = Field(
        None, description="Fitted model; default: the best validation checkpoint under logdir."
    )
    logdir: Path | None = Field(
        None, description="Folder of losses and checkpoints; default: {project_dir}/logs."
    )
    subtomo_size: int | None = Field(
        None,
        ge=8,
        description="Edge of the tiles in px; default: the size the model was fitted on.",
    )
    subtomo_overlap: int | None = Field(
        None,
        ge=0,
        description="Overlap of neighbouring tiles in px; default: subtomo_size / 3, rounded up.",
    )
    mw_angle: float | None = Field(
        None,
        ge=0,
        lt=180,
        description="Full opening angle of the missing wedge in degrees (accepted for "
        "published configs); must agree with the wedge the model was fitted for.",
    )
    batch_size: int = Field(8, ge=1, description="Tiles per forward pass.")
    recompute_normalization: bool = Field(
        True,
        description="Normalise each tomogram with its own mean and standard deviation, not "
        "those of the fitting data.",
    )
    mask_tile_wedges: bool = Field(
        False,
        description="Empty each tile's missing wedge before the network sees it, as in every "
        "fitting input (the published implementation does).",
    )
    overwrite: bool = Field(False, description="Replace refined tomograms.")
    output_dir: Path | None = Field(
        None,
        description="Folder of the refined tomograms; default: {project_dir}/refined_tomograms.",
    )
    precision: Precision = Field(
        "auto",
        description="Arithmetic of the U-Net: auto (bf16-mixed on GPUs and on CPUs with native "
        "bf16, else 32), 32 or bf16-mixed.",
    )

    @field_validator("gpu")
    @classmethod
    def _distinct_gpus(cls, v: int | list[int] | None) -> int | list[int] | None:
        # Several GPUs share the tiles; each must be a real, distinct GPU.
        if isinstance(v, list) and len(v) > 1:
            if min(v) < 0:
                raise ValueError(
                    "mixes the CPU (-1) with GPUs; list GPU indices only, or -1 alone for the CPU"
                )
            if len(set(v)) < len(v):
                raise ValueError("names a GPU more than once; list each GPU once")
        return v

    @model_validator(mode="after")
    def _inputs(self) -> RefineTomogramConfig:
        if self.subtomo_size is not None and self.subtomo_overlap is not None:
            check_overlap(self.subtomo_overlap, self.subtomo_size)
        if self.tomo_files:
            return self
        if not self.tomo0_files or not self.tomo1_files:
            raise ValueError(
                "no tomograms to refine; give tomo0_files and tomo1_files (or tomo_files to "
                "refine full tomograms)"
            )
        if len(self.tomo0_files) != len(self.tomo1_files):
            raise ValueError(
                f"tomo0_files ({len(self.tomo0_files)}) and tomo1_files "
                f"({len(self.tomo1_files)}) must list the same number of files; give the two "
                "halves of each tomogram, in the same order"
            )
        return self


def check_divisible(subtomo_size: int, multiple: int) -> None:
    """The U-Net halves sizes `log2(multiple)` times: sizes must divide evenly."""
    if subtomo_size % multiple:
        raise ValueError(
            f"subtomo_size {subtomo_size} must be divisible by 2**num_downsample_layers = "
            f"{multiple}; choose e.g. {subtomo_size - subtomo_size % multiple + multiple}"
        )


def check_overlap(subtomo_overlap: int, subtomo_size: int) -> None:
    """Tiles must advance: the overlap is smaller than the tile."""
    if subtomo_overlap >= subtomo_size:
        raise ValueError(
            f"subtomo_overlap ({subtomo_overlap}) must be smaller than subtomo_size "
            f"({subtomo_size}); choose e.g. {math.ceil(subtomo_size / 3)}"
        )
