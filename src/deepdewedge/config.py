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

from deepdewedge.io.mrc import InputError

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

    project_dir: Path = Path("./ddw_project")
    seed: int = 42
    gpu: int | list[int] | None = None


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

    tomo0_files: list[Path]
    tomo1_files: list[Path]
    subtomo_size: int = Field(96, ge=8)
    mw_angle: float = Field(60.0, ge=0, lt=180)
    subtomo_dir: Path | None = None  # default: {project_dir}/subtomos
    mask_files: list[Path] | None = None
    min_nonzero_mask_fraction_in_subtomo: float = Field(0.3, ge=0, le=1)
    subtomo_extraction_strides: list[int] | None = None
    val_fraction: float = Field(0.1, ge=0, lt=1)
    standardize_full_tomos: bool = False
    overwrite: bool = False

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

    # None: the size the sub-tomograms were prepared with.
    subtomo_size: int | None = Field(None, ge=8)
    subtomo_dir: Path | None = None  # default: {project_dir}/subtomos
    logdir: Path | None = None  # default: {project_dir}/logs
    mw_angle: float = Field(60.0, ge=0, lt=180)
    unet_params_dict: UNetParams = UNetParams()
    adam_params_dict: AdamParams = AdamParams()
    num_epochs: int = Field(1000, ge=1)
    batch_size: int = Field(5, ge=1)
    update_subtomo_missing_wedges_every_n_epochs: int | None = Field(10, ge=1)
    check_val_every_n_epochs: int = Field(10, ge=1)
    save_model_every_n_epochs: int | None = Field(50, ge=1)
    save_n_models_with_lowest_val_loss: int = Field(1, ge=0)
    save_n_models_with_lowest_fitting_loss: int = Field(0, ge=0)
    # Accepted for published configs: losses always go to {logdir}/losses.csv.
    logger: Literal["csv", "tensorboard"] = "csv"
    # Process-group backend of a fit launched by torchrun: nccl or gloo; None, or a published
    # strategy name such as ddp, picks nccl on GPUs and gloo on the CPU.
    distributed_backend: str | None = None
    rotate: bool = True
    wedge_mask: bool = True
    interpolation: Literal["cubic", "linear"] = "cubic"
    precision: Precision = "auto"
    # GPU speed-ups: the U-Net in the channels-last 3D memory layout, and torch.compile
    # (which falls back to the uncompiled network, with a warning, if compiling fails).
    channels_last: bool = False
    compile: bool = False
    resume: bool = False
    resume_from_checkpoint: Path | None = None
    overwrite: bool = False

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

    tomo0_files: list[Path] | None = None
    tomo1_files: list[Path] | None = None
    tomo_files: list[Path] | None = None
    model_checkpoint_file: Path | None = None  # default: best checkpoint under logdir
    logdir: Path | None = None  # default: {project_dir}/logs
    # None: the size the model was fitted on.
    subtomo_size: int | None = Field(None, ge=8)
    subtomo_overlap: int | None = Field(None, ge=0)  # default: ceil(subtomo_size / 3)
    mw_angle: float = Field(60.0, ge=0, lt=180)
    batch_size: int = Field(8, ge=1)
    recompute_normalization: bool = True
    overwrite: bool = False
    output_dir: Path | None = None
    precision: Precision = "auto"

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

    tilt_series: Path
    # Raw stack + alignment: IMOD .xf, AreTomo .aln, Warp .xml or RELION-5 tilt-series .star
    alignment: Path | None = None
    tilt_angles: Path | None = None  # IMOD .tlt / .rawtlt
    x_tilt_file: Path | None = None  # IMOD .xtilt
    mdoc: Path | None = None  # SerialEM: angles, acquisition order, dose, defocus
    even_frames: Path | None = None  # frame-sum stacks of the even / odd movie frames
    odd_frames: Path | None = None
    split: Literal["even-odd", "frames", "random"] | None = None  # default: frames if given
    random_fraction: float = Field(0.5, gt=0, lt=1)
    acquisition_scheme: Literal["sequential", "dose-symmetric"] = "sequential"  # without .mdoc
    pixel_size_angstrom: float | None = Field(None, gt=0)  # default: from the MRC header
    bin: int = Field(1, ge=1)
    binning_method: Literal["fourier", "average"] = "fourier"
    thickness: int = Field(..., ge=1)  # in unbinned pixels, as in IMOD
    tilt_axis_offset_px: float = 0.0  # in unbinned pixels
    exclude_views: list[int] = []  # 1-based view numbers, as in IMOD
    filter: Literal["ramp", "hamming", "sirt"] = "ramp"
    sirt_iterations: int = Field(10, ge=1)
    defocus_file: Path | None = None  # IMOD .defocus, CTFFIND output or a list in µm
    ctf_correction: Literal["none", "phase-flip"] = "phase-flip"  # when defocus is known
    wiener_deconvolution: bool = False
    snr_falloff: float = Field(1.0, gt=0)
    deconv_strength: float = Field(1.0, gt=0)
    highpass_nyquist: float = Field(0.02, ge=0, lt=1)
    voltage_kv: float = Field(300.0, gt=0)
    spherical_aberration_mm: float = Field(2.7, ge=0)
    amplitude_contrast: float = Field(0.07, ge=0, lt=1)
    # Real-data preprocessing of every view, each switched off on its own.
    normalize_tilts: bool = True  # zero mean, unit standard deviation per view
    log_counts: bool = False  # take the log of the counts before normalising
    taper_px: int = Field(32, ge=0)  # border fade, unbinned px, at most 1/16 of the image; 0: off
    dose_filter: bool = True  # exposure filter where the pre-exposure of every view is known
    erase_gold: bool = True  # erase gold fiducials where they are found
    gold_diameter_nm: float | None = Field(None, gt=0)  # default: measured from the images
    write_aligned_stack: bool = False  # also write the preprocessed, aligned, binned stack
    output_dir: Path | None = None  # default: {project_dir}/tomograms
    overwrite: bool = False

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

    tomo_files: list[Path]
    density_percentage: float = Field(50.0, gt=0, le=100)
    std_percentage: float = Field(50.0, gt=0, le=100)
    sigma_px: float = Field(2.0, gt=0)
    bin_factor: int = Field(2, ge=1)
    z_crop: float = Field(0.0, ge=0, lt=0.5)
    auto_z: bool = True
    polarity: Literal["both", "dark", "bright"] = "both"
    output_dir: Path | None = None  # default: {project_dir}/masks
    overwrite: bool = False


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
