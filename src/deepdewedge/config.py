"""Validated configuration of each step; the only place defaults live.

The YAML layout is the published DeepDeWedge one: sections ``shared``, ``prepare_data``,
``fit_model`` and ``refine_tomogram``. Keys in ``shared`` go to every step that knows them;
keys in a step's section must be known to that step.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from deepdewedge.io.errors import InputError

SECTIONS = ("shared", "reconstruct", "make_mask", "prepare_data", "fit_model", "refine_tomogram")
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


class UNetParams(BaseModel):
    """Architecture of the U-Net (``unet_params_dict``)."""

    model_config = ConfigDict(extra="forbid")

    in_chans: Literal[1] = 1
    out_chans: Literal[1] = 1

    chans: int = Field(64, ge=1)
    num_downsample_layers: int = Field(3, ge=1)
    drop_prob: float = Field(0.0, ge=0.0, lt=1.0)
    # The published implementation adds the input to the output; on our simulated benchmark
    # (docs/method.md) that lowers the refined tomogram's CC, so it is off by default.
    residual: bool = False


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
    mw_angle: float = Field(
        60.0, ge=0, lt=180, description="Full opening angle of the missing wedge in degrees."
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
    mw_angle: float = Field(
        60.0, ge=0, lt=180, description="Full opening angle of the missing wedge in degrees."
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
        description="Arithmetic of the U-Net: auto (bf16-mixed on GPUs, 32 on the CPU), 32 or "
        "bf16-mixed.",
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
    mw_angle: float = Field(
        60.0,
        ge=0,
        lt=180,
        description="Full opening angle of the missing wedge in degrees (accepted for "
        "published configs; refining does not use it).",
    )
    batch_size: int = Field(8, ge=1, description="Tiles per forward pass.")
    recompute_normalization: bool = Field(
        True,
        description="Normalise each tomogram with its own mean and standard deviation, not "
        "those of the fitting data.",
    )
    overwrite: bool = Field(False, description="Replace refined tomograms.")
    output_dir: Path | None = Field(
        None,
        description="Folder of the refined tomograms; default: {project_dir}/refined_tomograms.",
    )
    precision: Precision = Field(
        "auto",
        description="Arithmetic of the U-Net: auto (bf16-mixed on GPUs, 32 on the CPU), 32 or "
        "bf16-mixed.",
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


class ReconstructConfig(_Step):
    """``ddw reconstruct``: tomo0, tomo1 and the full tomogram from a tilt series."""

    tilt_series: Path = Field(
        description="Tilt series (MRC stack): raw with an alignment, or aligned."
    )
    alignment: Path | None = Field(
        None,
        description="Alignment of the raw stack: IMOD .xf (with tilt_angles), AreTomo .aln, "
        "Warp .xml or RELION-5 tilt-series .star, recognised from the file.",
    )
    tilt_angles: Path | None = Field(
        None, description="IMOD .tlt or .rawtlt file, where the alignment has no angles."
    )
    x_tilt_file: Path | None = Field(None, description="IMOD .xtilt file.")
    mdoc: Path | None = Field(
        None, description="SerialEM .mdoc: angles, acquisition order, dose, defocus."
    )
    even_frames: Path | None = Field(
        None, description="Sums of the even movie frames of each view (MRC stack)."
    )
    odd_frames: Path | None = Field(
        None, description="Sums of the odd movie frames of each view (MRC stack)."
    )
    split: Literal["even-odd", "frames", "random"] | None = Field(
        None,
        description="How to split into halves: even-odd (acquisition order), frames or "
        "random; default: frames where even and odd frames are given, else even-odd.",
    )
    random_fraction: float = Field(
        0.5, gt=0, lt=1, description="Fraction of the views in tomo0 with split random."
    )
    acquisition_scheme: Literal["sequential", "dose-symmetric"] = Field(
        "sequential",
        description="Acquisition order without an .mdoc: sequential or dose-symmetric.",
    )
    pixel_size_angstrom: float | None = Field(
        None, gt=0, description="Pixel size of the stack in Å; default: from its MRC header."
    )
    bin: int = Field(1, ge=1, description="Binning factor of the tomograms.")
    binning_method: Literal["fourier", "average"] = Field(
        "fourier", description="Binning by Fourier cropping (fourier) or block averages."
    )
    thickness: int = Field(..., ge=1, description="Tomogram thickness in unbinned px, as in IMOD.")
    tilt_axis_offset_px: float = Field(
        0.0, description="Offset of the tilt axis from the image centre in unbinned px."
    )
    exclude_views: list[int] = Field(
        [], description="Views to leave out, numbered from 1 as in IMOD."
    )
    filter: Literal["ramp", "hamming", "sirt"] = Field(
        "ramp", description="Reconstruction filter: ramp, hamming or sirt (SIRT-like)."
    )
    sirt_iterations: int = Field(
        10, ge=1, description="Iterations of SIRT that the sirt filter mimics."
    )
    defocus_file: Path | None = Field(
        None, description="IMOD .defocus, CTFFIND output, or one defocus per line in µm."
    )
    ctf_correction: Literal["none", "phase-flip"] = Field(
        "phase-flip", description="CTF correction where the defocus is known: phase-flip or none."
    )
    wiener_deconvolution: bool = Field(
        False, description="Wiener-like CTF deconvolution of the tomograms (as in IsoNet)."
    )
    snr_falloff: float = Field(
        1.0, gt=0, description="Fall of the modelled SNR with frequency (IsoNet's snrfalloff)."
    )
    deconv_strength: float = Field(
        1.0, gt=0, description="Low-frequency SNR 10^(3 x this) (IsoNet's deconvstrength)."
    )
    highpass_nyquist: float = Field(
        0.02,
        ge=0,
        lt=1,
        description="High-pass cut-off as a fraction of Nyquist (IsoNet's hpnyquist).",
    )
    voltage_kv: float = Field(300.0, gt=0, description="Acceleration voltage in kV.")
    spherical_aberration_mm: float = Field(2.7, ge=0, description="Spherical aberration in mm.")
    amplitude_contrast: float = Field(
        0.07, ge=0, lt=1, description="Fraction of amplitude contrast."
    )
    # Real-data preprocessing of every view, each switched off on its own.
    normalize_tilts: bool = Field(
        True, description="Scale each view to zero mean, unit standard deviation."
    )
    log_counts: bool = Field(False, description="Take the log of the counts before normalising.")
    taper_px: int = Field(
        32,
        ge=0,
        description="Fade the view borders over this many unbinned px, at most 1/16 of the "
        "image; 0: off.",
    )
    dose_filter: bool = Field(
        True, description="Exposure filter where the pre-exposure of every view is known."
    )
    erase_gold: bool = Field(True, description="Erase gold fiducials where they are found.")
    gold_diameter_nm: float | None = Field(
        None, gt=0, description="Gold bead diameter in nm; default: measured from the images."
    )
    write_aligned_stack: bool = Field(
        False, description="Also write the preprocessed, aligned, binned stack."
    )
    output_dir: Path | None = Field(
        None, description="Folder of the tomograms; default: {project_dir}/tomograms."
    )
    overwrite: bool = Field(False, description="Replace existing tomograms.")

    @model_validator(mode="after")
    def _sources(self) -> ReconstructConfig:
        if (self.even_frames is None) != (self.odd_frames is None):
            raise ValueError("even_frames and odd_frames come as a pair; give both, or neither")
        if self.split == "frames" and self.even_frames is None:
            raise ValueError(
                "split 'frames' needs even_frames and odd_frames; give them, or choose "
                "split even-odd or random"
            )
        if self.tilt_angles is None and self.mdoc is None and self.alignment is None:
            raise ValueError(
                "no tilt angles; give tilt_angles (.tlt/.rawtlt), mdoc (SerialEM .mdoc) or an "
                "alignment (.xf with .tlt, .aln, Warp .xml, RELION-5 .star)"
            )
        return self


class MakeMaskConfig(_Step):
    """``ddw make-mask``: sample masks from local density and structure (IsoNet-style)."""

    tomo_files: list[Path] = Field(description="Tomograms to mask (MRC).")
    density_percentage: float = Field(
        50.0, gt=0, le=100, description="Percentage of voxels kept for their local density."
    )
    std_percentage: float = Field(
        50.0,
        gt=0,
        le=100,
        description="Percentage of voxels kept for their local structure (standard deviation).",
    )
    sigma_px: float = Field(2.0, gt=0, description="Smoothing width in px of the tomogram.")
    bin_factor: int = Field(2, ge=1, description="Compute on a copy binned by this factor.")
    z_crop: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="Fraction of the slices removed at the top and at the bottom.",
    )
    auto_z: bool = Field(True, description="Remove the empty ice above and below the sample.")
    polarity: Literal["both", "dark", "bright"] = Field(
        "both",
        description="What counts as dense: a local mean far from the median on either side "
        "(both), below it (dark) or above it (bright).",
    )
    output_dir: Path | None = Field(
        None, description="Folder of the masks; default: {project_dir}/masks."
    )
    overwrite: bool = Field(False, description="Replace existing masks.")


class SimulateConfig(BaseModel):
    """``ddw simulate``: a synthetic tilt series, its ground truth and particle records.

    Sizes are in voxels of ``voxel_size_angstrom``; ``thickness_px``, ``height_px`` and
    ``width_px`` give the ground truth `(d, h, w)`, and the images are ``height_px`` by
    ``width_px``.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    output_dir: Path = Path("simulation")
    thickness_px: int = Field(64, ge=8)
    height_px: int = Field(192, ge=8)
    width_px: int = Field(192, ge=8)
    voxel_size_angstrom: float = Field(10.0, gt=0)
    ice_thickness_px: int | None = Field(None, ge=1)  # default: 3/4 of thickness_px
    templates: list[str] | None = None  # default: all shipped templates
    n_particles: int | None = Field(None, ge=0)  # default: 15% of the ice filled
    n_vesicles: int = Field(2, ge=0)
    n_sheets: int = Field(1, ge=0)
    n_beads: int = Field(4, ge=0)
    bead_radius_angstrom: float = Field(50.0, gt=0)
    tilt_min_deg: float = Field(-60.0, gt=-90, lt=90)
    tilt_max_deg: float = Field(60.0, gt=-90, lt=90)
    tilt_step_deg: float = Field(3.0, gt=0)
    acquisition_scheme: Literal["dose-symmetric", "sequential"] = "dose-symmetric"
    dose_per_tilt_e_per_a2: float = Field(3.0, ge=0)  # written to the .mdoc only
    snr: float = Field(0.25, gt=0)
    ctf: bool = False
    defocus_um: float = Field(3.0, gt=0)
    voltage_kv: float = Field(300.0, gt=0)
    spherical_aberration_mm: float = Field(2.7, ge=0)
    amplitude_contrast: float = Field(0.07, ge=0, lt=1)
    defocus_gradient: bool = True
    n_frames: int = Field(0, ge=0)  # 0: no frames; else at least 2
    seed: int = 42
    overwrite: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> SimulateConfig:
        if self.tilt_min_deg >= self.tilt_max_deg:
            raise ValueError(
                f"tilt_min_deg ({self.tilt_min_deg:g}) must be below tilt_max_deg "
                f"({self.tilt_max_deg:g})"
            )
        if self.tilt_max_deg - self.tilt_min_deg < self.tilt_step_deg:
            raise ValueError("tilt_step_deg is larger than the tilt range; give a smaller step")
        if self.ice_thickness_px is not None and self.ice_thickness_px > self.thickness_px:
            raise ValueError(
                f"ice_thickness_px ({self.ice_thickness_px}) exceeds thickness_px "
                f"({self.thickness_px}); the ice must fit in the tomogram"
            )
        if self.n_frames == 1:
            raise ValueError("n_frames must be 0 (no frames) or at least 2")
        if self.templates is not None:
            # The shipped templates are listed by the simulator, imported only when needed.
            from deepdewedge.simulate.templates import template_names

            known = template_names()
            unknown = [name for name in self.templates if name not in known]
            if unknown or not self.templates:
                raise ValueError(
                    f"unknown template(s) {', '.join(unknown) or '(none given)'}; choose from "
                    f"{', '.join(known)}"
                )
        return self

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        """`(d, h, w)` of the ground truth."""
        return (self.thickness_px, self.height_px, self.width_px)


# Fixed settings of `ddw demo` (a few minutes on a CPU); only the number of epochs is an option.
DEMO = {
    "shape_zyx": (48, 96, 96),
    "snr": 0.25,
    "voxel_size": 10.0,
    "subtomo_size": 32,
    "strides": [16, 16, 16],
    "unet": {"chans": 8, "num_downsample_layers": 2, "drop_prob": 0.0},
    "num_epochs": 30,
    "batch_size": 8,
    "lr": 1e-3,
}


STEP_MODELS: dict[str, type[_Step]] = {
    "reconstruct": ReconstructConfig,
    "make_mask": MakeMaskConfig,
    "prepare_data": PrepareDataConfig,
    "fit_model": FitModelConfig,
    "refine_tomogram": RefineTomogramConfig,
}
# Options of the published tool that have no effect here: data stays in memory (no loader
# workers), crops always get a √3 margin and mirror padding, results are always written.
IGNORED_KEYS = frozenset(
    {
        "num_workers",
        "pad_before_subtomo_extraction",
        "extract_larger_subtomos_for_rotating",
        "verbose",
        "return_tomos",
    }
)
KNOWN_KEYS = set().union(*(m.model_fields for m in STEP_MODELS.values())) | IGNORED_KEYS


COMMAND_LINE = "command line"
# How to fix a value pydantic rejected, by error type.
_HINTS = {
    "int_parsing": "give a whole number",
    "int_type": "give a whole number",
    "int_from_float": "give a whole number",
    "float_parsing": "give a number",
    "float_type": "give a number",
    "finite_number": "give a finite number",
    "bool_parsing": "give true or false",
    "bool_type": "give true or false",
    "string_type": "give a text value",
    "path_type": "give a file or folder path",
    "list_type": "give a list, e.g. [a, b]",
    "tuple_type": "give a list, e.g. [a, b]",
    "too_short": "give more items",
    "too_long": "give fewer items",
    "dict_type": "give a mapping, e.g. {key: value}",
    "model_type": "give a mapping, e.g. {key: value}",
    "model_attributes_type": "give a mapping, e.g. {key: value}",
    "literal_error": "use one of these values",
    "greater_than": "give a larger value",
    "greater_than_equal": "give a larger value",
    "less_than": "give a smaller value",
    "less_than_equal": "give a smaller value",
}


def read_config_file(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Read a YAML config with the published section layout, checking section and key names."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: config file not found; check the --config path")
    if not path.is_file():
        raise InputError(f"{path}: is a directory, not a config file; check the --config path")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(
            f"{path}: not a text file; give the YAML config with --config (sections "
            f"{', '.join(SECTIONS)})"
        ) from None
    except OSError as err:
        raise InputError(
            f"{path}: cannot read the config file ({err.strerror}); check its permissions"
        ) from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None)
        why = f" ({_one_line(problem)})" if problem else ""
        raise InputError(f"{path}: invalid YAML{where}{why}; fix the syntax") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected sections {', '.join(SECTIONS)} at the top level")
    for section, body in raw.items():
        if section not in SECTIONS:
            raise InputError(
                f"{path}: unknown section '{section}'; use one of {', '.join(SECTIONS)}"
            )
        if body is not None and not isinstance(body, dict):
            raise InputError(f"{path}: section '{section}' must be a mapping of keys to values")
        for key in body or {}:
            known = (
                KNOWN_KEYS
                if section == "shared"
                else set(STEP_MODELS[section].model_fields) | IGNORED_KEYS
            )
            if key not in known:
                raise InputError(f"{path}: unknown key '{section}.{key}'; check its spelling")
    return {section: dict(raw.get(section) or {}) for section in SECTIONS}


def step_config(
    step: str,
    *,
    config_file: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
) -> _Step:
    """Build the validated config of one step from a config file and command-line overrides.

    Precedence: command line > the step's own section > ``shared``. Mappings such as
    ``unet_params_dict`` are merged key by key with the same precedence. Relative paths in the
    file are taken relative to the current directory, as the published tool does.

    Raises
    ------
    InputError
        One line naming the file and ``section.key`` (or the command-line option) of the first
        invalid value, and how to fix it.
    """
    model = STEP_MODELS[step]
    values: dict[str, Any] = {}
    # Where each value came from: "shared", the step's section or COMMAND_LINE, by key path.
    origins: dict[tuple[str, ...], str] = {}

    def put(key: str, value: Any, origin: str) -> None:
        if isinstance(value, dict):
            origins.update({(key, str(sub)): origin for sub in value})
            if isinstance(values.get(key), dict):
                value = {**values[key], **value}  # e.g. one U-Net option on top of the file's
        values[key] = value
        origins[(key,)] = origin

    if config_file is not None:
        sections = read_config_file(config_file)
        for key, value in sections["shared"].items():
            if key in model.model_fields:
                put(key, value, "shared")
        for key, value in sections[step].items():
            if key not in IGNORED_KEYS:
                put(key, value, step)
    for key, value in (overrides or {}).items():
        if value is not None:
            put(key, value, COMMAND_LINE)
    try:
        return model(**values)
    except ValidationError as err:
        raise InputError(_first_error(err, step, model, config_file, origins)) from None


def _one_line(text: object, limit: int | None = None) -> str:
    """`text` on one line, shortened to `limit` characters."""
    flat = " ".join(str(text).split())
    if limit is not None and len(flat) > limit:
        flat = flat[: limit - 3] + "..."
    return flat


def _clean_loc(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of an error location, without pydantic's union tags (``int``, ``list[int]``)."""
    parts: list[str] = []
    current: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, int):
            parts[-1:] = [f"{parts[-1]}[{part}]"] if parts else [f"[{part}]"]
        elif current is not None:
            parts.append(str(part))
            field = current.model_fields.get(str(part))
            annotation = field.annotation if field is not None else None
            is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
            current = annotation if is_model else None
    return parts


def _first_error(
    err: ValidationError,
    step: str,
    model: type[BaseModel],
    config_file: str | os.PathLike | None,
    origins: dict[tuple[str, ...], str],
) -> str:
    """One line: where the first invalid value came from, what is wrong, how to fix it."""
    first = err.errors()[0]
    raw_loc = tuple(str(p) for p in first["loc"] if not isinstance(p, int))
    parts = _clean_loc(model, tuple(first["loc"]))
    # The origin of the most specific key path we know.
    origin = next(
        (origins[raw_loc[:n]] for n in range(len(raw_loc), 0, -1) if raw_loc[:n] in origins),
        None,
    )
    msg = _one_line(first["msg"]).removeprefix("Value error, ")
    kind = first["type"]
    if origin == COMMAND_LINE:
        option = "--" + parts[0].replace("_", "-")
        where = f"{COMMAND_LINE}: {option}" + (f" {'.'.join(parts[1:])}" if parts[1:] else "")
    elif origin is not None:
        where = f"{config_file}: {origin}.{'.'.join(parts)}"
    else:  # a required key nobody gave, or a rule about several keys
        where = f"{config_file if config_file is not None else COMMAND_LINE}: {step}"
    if kind == "missing" and origin is None:
        key = parts[0] if parts else "?"
        return (
            f"{where}: missing required key '{key}'; add it to the {step} or shared section of "
            f"the config, or give --{key.replace('_', '-')}"
        )
    if kind == "missing":
        return f"{where}: a value is missing ({msg}); complete it"
    if kind == "extra_forbidden":
        known: Any = model
        for name in first["loc"][:-1]:
            field = getattr(known, "model_fields", {}).get(name)
            known = field.annotation if field is not None else None
        names = getattr(known, "model_fields", None)
        listed = f" (known keys: {', '.join(names)})" if names else ""
        return f"{where}: unknown key; check its spelling{listed}"
    if not parts:  # a rule about several keys: the message names them and the fix
        return f"{where}: {msg}"
    got = first.get("input")
    shown = "" if isinstance(got, dict) else f" (got {_one_line(repr(got), 60)})"
    problem, _, fix = msg.partition("; ")  # our own validators end with the fix
    fix = fix or _HINTS.get(kind, f"correct {'.'.join(parts)}")
    return f"{where}: {problem}{shown}; {fix}"
