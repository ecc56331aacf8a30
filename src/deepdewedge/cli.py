"""The ``ddw`` command line: parse, validate, call the pipeline, report.

Only typer and the config models are imported up front; torch, the pipeline's step modules
and the progress bars are imported by the commands that run, so that ``ddw --help`` and
``ddw <command> --help`` answer at once.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import typer.core
import yaml
from pydantic import BaseModel

from deepdewedge import pipeline
from deepdewedge.config import (
    DEMO,
    DatasetConfig,
    FitModelConfig,
    MakeMaskConfig,
    PrepareDataConfig,
    ReconstructConfig,
    RefineTomogramConfig,
    SimulateConfig,
    read_config_file,
    step_config,
)
from deepdewedge.io.errors import InputError

if TYPE_CHECKING:
    from tqdm import tqdm

    from deepdewedge.fit.loop import Callbacks

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="DeepDeWedge: self-supervised denoising and missing-wedge filling for cryo-ET.",
)

# What rich markup, which renders typer's help, would take for a style tag and drop, such as
# "[default: 32]"; a backslash keeps it as text.
_MARKUP_TAG = re.compile(r"(\\*)(\[[a-z#/@][^[]*?])")
_REPEAT = "Repeat the option for several."


def _shown_default(name: str, value: Any) -> str | None:
    """`value` as the help shows it: a bool as the flag that gives it; None where there is none."""
    if value is None or value is ...:
        return None
    if isinstance(value, bool):
        return ("" if value else "no-") + name.replace("_", "-")
    if isinstance(value, BaseModel):
        mapping = value.model_dump(mode="json")
        return yaml.safe_dump(mapping, default_flow_style=True, sort_keys=False, width=1000).strip()
    if isinstance(value, list | tuple):
        return " ".join(str(item) for item in value) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _help(text: str, name: str, default: Any, syntax: str = "") -> str:
    shown = _shown_default(name, default)
    joined = " ".join(part for part in (text, syntax, shown and f"[default: {shown}]") if part)
    return _MARKUP_TAG.sub(r"\1\1\\\2", joined) if typer.core.HAS_RICH else joined


def _option(
    model: type[BaseModel],
    name: str,
    *,
    text: str | None = None,
    syntax: str = "",
    flag: str | None = None,
) -> Any:
    """An option overriding `model`'s field `name`: help from the field's description and default.

    The option itself defaults to None, so that a value not given on the command line leaves the
    config file's (or the model's) value in place; `text` replaces the field's description
    where the command line says it differently, `syntax` tells how to give the value here,
    `flag` names the option where its name is not the field's.
    """
    field = model.model_fields[name]
    default = None if field.is_required() else field.get_default(call_default_factory=True)
    help_text = _help(text or field.description or "", name, default, syntax)
    return typer.Option(*([flag] if flag else []), help=help_text)


def _simulate_opt(name: str, text: str, syntax: str = "") -> Any:
    return _option(SimulateConfig, name, text=text, syntax=syntax)


_reconstruct_opt = functools.partial(_option, ReconstructConfig)
_mask_opt = functools.partial(_option, MakeMaskConfig)
_prepare_opt = functools.partial(_option, PrepareDataConfig)
_fit_opt = functools.partial(_option, FitModelConfig)
_refine_opt = functools.partial(_option, RefineTomogramConfig)
_dataset_opt = functools.partial(_option, DatasetConfig)

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="YAML config (sections shared, reconstruct, make_mask, prepare_data, fit_model, "
        "refine_tomogram); options given here override it.",
    ),
]


def _friendly(func):
    """Turn input errors into one line on stderr and a non-zero exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
        try:
            return func(*args, **kwargs)
        except (InputError, FloatingPointError) as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(code=1) from None
        except KeyboardInterrupt:
            resumable = func.__name__ in ("fit_model_cmd", "run_cmd")
            typer.echo(
                "interrupted" + ("; resume fitting with --resume" if resumable else ""), err=True
            )
            raise typer.Exit(code=130) from None
        except Exception as err:
            torch = sys.modules.get("torch")  # only a command that imported torch can run out
            if torch is not None and isinstance(err, torch.OutOfMemoryError):
                typer.echo("error: out of GPU memory; lower batch_size (or subtomo_size)", err=True)
                raise typer.Exit(code=1) from None
            raise

    return wrapper


def _parse_mapping(text: str | None, name: str) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, dict):
        raise InputError(f"--{name}: expected a mapping such as '{{\"chans\": 32}}', got {text!r}")
    return value


def _fit_callbacks(num_epochs: int) -> tuple[Callbacks, list[tqdm]]:
    from tqdm import tqdm

    from deepdewedge.fit.loop import Callbacks

    bars: list[tqdm] = []

    def on_step(epoch: int, step: int, steps: int, running: float) -> None:
        if not bars:
            bars.append(
                tqdm(
                    total=num_epochs * steps,
                    desc="fitting",
                    unit="batch",
                    initial=epoch * steps + step - 1,
                    dynamic_ncols=True,
                )
            )
        bars[0].update(1)
        bars[0].set_postfix(epoch=epoch, loss=f"{running:.4g}", refresh=False)

    def on_epoch(record: dict[str, Any], history: list[dict[str, Any]]) -> None:
        if record["val_loss"] is not None and bars:
            bars[0].write(
                f"epoch {record['epoch']}: fitting loss {record['fitting_loss']:.5g}, "
                f"val loss {record['val_loss']:.5g}"
            )

    return Callbacks(on_step=on_step, on_epoch=on_epoch), bars


def _run_reconstruct(config_file: Path | None, overrides: dict[str, Any]) -> dict[str, Path]:
    from tqdm import tqdm

    config = step_config("reconstruct", config_file=config_file, overrides=overrides)
    with tqdm(desc="reconstructing", unit="tomogram", total=3, dynamic_ncols=True) as bar:

        def progress(done: int, total: int) -> None:
            bar.n = done
            bar.refresh()

        written = pipeline.reconstruct(config, progress=progress)  # type: ignore[arg-type]
    for path in written.values():
        typer.echo(f"wrote {path}")
    return written


def _run_prepare(config_file: Path | None, overrides: dict[str, Any]) -> None:
    config = step_config("prepare_data", config_file=config_file, overrides=overrides)
    result = pipeline.prepare_data(config)  # type: ignore[arg-type]
    typer.echo(
        f"{result['n_fitting']} fitting and {result['n_val']} validation sub-tomograms "
        f"in {result['dir']}"
    )


def _run_fit(config_file: Path | None, overrides: dict[str, Any]) -> Path:
    config = step_config("fit_model", config_file=config_file, overrides=overrides)
    callbacks, bars = _fit_callbacks(config.num_epochs)  # type: ignore[attr-defined]
    try:
        result = pipeline.fit_model(config, callbacks=callbacks)  # type: ignore[arg-type]
    finally:
        for bar in bars:
            bar.close()
    last = result["history"][-1] if result["history"] else None
    if not result["is_main_process"]:  # under torchrun, rank 0 reports
        return result["best_checkpoint"]
    if last is not None:
        typer.echo(f"fitting loss {last['fitting_loss']:.5g} after epoch {last['epoch']}")
    typer.echo(
        f"checkpoints in {result['checkpoint'].parent} (best: {result['best_checkpoint'].name})"
    )
    return result["best_checkpoint"]


def _run_refine(config_file: Path | None, overrides: dict[str, Any]) -> list[Path]:
    from tqdm import tqdm

    config = step_config("refine_tomogram", config_file=config_file, overrides=overrides)
    bar = tqdm(desc="refining", unit="tile", dynamic_ncols=True)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        written = pipeline.refine_tomogram(config, progress=progress)  # type: ignore[arg-type]
    finally:
        bar.close()
    for path in written:
        typer.echo(f"wrote {path}")
    return written


@app.command("simulate")
@_friendly
def simulate_cmd(
    output_dir: Annotated[
        Path | None, _simulate_opt("output_dir", "Folder for the simulated data.")
    ] = None,
    thickness_px: Annotated[
        int | None,
        _simulate_opt("thickness_px", "Ground-truth thickness (z) in px, the tomogram's."),
    ] = None,
    height_px: Annotated[int | None, _simulate_opt("height_px", "Image height (y) in px.")] = None,
    width_px: Annotated[int | None, _simulate_opt("width_px", "Image width (x) in px.")] = None,
    voxel_size_angstrom: Annotated[
        float | None, _simulate_opt("voxel_size_angstrom", "Voxel (and pixel) size in Å.")
    ] = None,
    ice_thickness_px: Annotated[
        int | None,
        _simulate_opt("ice_thickness_px", "Ice thickness in px; default: 3/4 of thickness_px."),
    ] = None,
    templates: Annotated[
        list[str] | None,
        _simulate_opt("templates", "Macromolecule to place; default: all shipped ones.", _REPEAT),
    ] = None,
    n_particles: Annotated[
        int | None,
        _simulate_opt(
            "n_particles", "Particles in the field of view; default: enough to fill 15% of the ice."
        ),
    ] = None,
    n_vesicles: Annotated[int | None, _simulate_opt("n_vesicles", "Membrane vesicles.")] = None,
    n_sheets: Annotated[int | None, _simulate_opt("n_sheets", "Flat membrane patches.")] = None,
    n_beads: Annotated[int | None, _simulate_opt("n_beads", "Gold beads.")] = None,
    bead_radius_angstrom: Annotated[
        float | None, _simulate_opt("bead_radius_angstrom", "Gold bead radius in Å.")
    ] = None,
    tilt_min_deg: Annotated[
        float | None, _simulate_opt("tilt_min_deg", "Lowest tilt angle in degrees.")
    ] = None,
    tilt_max_deg: Annotated[
        float | None, _simulate_opt("tilt_max_deg", "Highest tilt angle in degrees.")
    ] = None,
    tilt_step_deg: Annotated[
        float | None, _simulate_opt("tilt_step_deg", "Tilt increment in degrees.")
    ] = None,
    acquisition_scheme: Annotated[
        str | None,
        _simulate_opt("acquisition_scheme", "Order of the tilts: dose-symmetric or sequential."),
    ] = None,
    dose_per_tilt_e_per_a2: Annotated[
        float | None,
        _simulate_opt(
            "dose_per_tilt_e_per_a2", "Electron dose per tilt in e/Å² (written to the .mdoc)."
        ),
    ] = None,
    snr: Annotated[
        float | None, _simulate_opt("snr", "var(signal) / var(noise) of the tilt series.")
    ] = None,
    ctf: Annotated[bool | None, _simulate_opt("ctf", "Modulate the images by the CTF.")] = None,
    defocus_um: Annotated[
        float | None, _simulate_opt("defocus_um", "Underfocus at the tilt axis in µm.")
    ] = None,
    voltage_kv: Annotated[
        float | None, _simulate_opt("voltage_kv", "Acceleration voltage in kV.")
    ] = None,
    spherical_aberration_mm: Annotated[
        float | None, _simulate_opt("spherical_aberration_mm", "Spherical aberration in mm.")
    ] = None,
    amplitude_contrast: Annotated[
        float | None, _simulate_opt("amplitude_contrast", "Fraction of amplitude contrast.")
    ] = None,
    defocus_gradient: Annotated[
        bool | None,
        _simulate_opt("defocus_gradient", "Defocus varies across the tilted images."),
    ] = None,
    n_frames: Annotated[
        int | None,
        _simulate_opt(
            "n_frames", "Dose-fractionated frames per tilt, written as even/odd sums; 0: none."
        ),
    ] = None,
    seed: Annotated[int | None, _simulate_opt("seed", "Random seed.")] = None,
    overwrite: Annotated[
        bool | None, _simulate_opt("overwrite", "Replace an existing simulation.")
    ] = None,
) -> None:
    """Simulate a tilt series of macromolecules, membranes and gold in ice, with ground truth."""
    options = dict(locals())
    from deepdewedge.pipeline.simulation import simulate, simulate_config

    cfg = simulate_config(**options)
    paths = simulate(cfg)
    for role, path in paths.items():
        typer.echo(f"wrote {path}" + (f" ({role.replace('_', ' ')})" if role != "record" else ""))
    typer.echo(
        f"reconstruct with: ddw reconstruct --tilt-series {paths['tilt_series']} "
        f"--mdoc {paths['mdoc']} --thickness {cfg.thickness_px}"
        + (
            f" --even-frames {paths['even_frames']} --odd-frames {paths['odd_frames']}"
            if "even_frames" in paths
            else ""
        )
    )


@app.command("reconstruct")
@_friendly
def reconstruct_cmd(
    config: ConfigOpt = None,
    project_dir: Annotated[Path | None, _reconstruct_opt("project_dir")] = None,
    tilt_series: Annotated[Path | None, _reconstruct_opt("tilt_series")] = None,
    alignment: Annotated[Path | None, _reconstruct_opt("alignment")] = None,
    tilt_angles: Annotated[Path | None, _reconstruct_opt("tilt_angles")] = None,
    x_tilt_file: Annotated[Path | None, _reconstruct_opt("x_tilt_file")] = None,
    mdoc: Annotated[Path | None, _reconstruct_opt("mdoc")] = None,
    even_frames: Annotated[Path | None, _reconstruct_opt("even_frames")] = None,
    odd_frames: Annotated[Path | None, _reconstruct_opt("odd_frames")] = None,
    split: Annotated[str | None, _reconstruct_opt("split")] = None,
    random_fraction: Annotated[float | None, _reconstruct_opt("random_fraction")] = None,
    acquisition_scheme: Annotated[str | None, _reconstruct_opt("acquisition_scheme")] = None,
    pixel_size_angstrom: Annotated[float | None, _reconstruct_opt("pixel_size_angstrom")] = None,
    bin: Annotated[int | None, _reconstruct_opt("bin")] = None,
    binning_method: Annotated[str | None, _reconstruct_opt("binning_method")] = None,
    thickness: Annotated[int | None, _reconstruct_opt("thickness")] = None,
    tilt_axis_offset_px: Annotated[float | None, _reconstruct_opt("tilt_axis_offset_px")] = None,
    exclude_views: Annotated[
        list[int] | None, _reconstruct_opt("exclude_views", syntax=_REPEAT)
    ] = None,
    filter: Annotated[str | None, _reconstruct_opt("filter")] = None,
    full_filter: Annotated[str | None, _reconstruct_opt("full_filter")] = None,
    sirt_iterations: Annotated[int | None, _reconstruct_opt("sirt_iterations")] = None,
    defocus_file: Annotated[Path | None, _reconstruct_opt("defocus_file")] = None,
    ctf_correction: Annotated[str | None, _reconstruct_opt("ctf_correction")] = None,
    wiener_deconvolution: Annotated[bool | None, _reconstruct_opt("wiener_deconvolution")] = None,
    voltage_kv: Annotated[float | None, _reconstruct_opt("voltage_kv")] = None,
    spherical_aberration_mm: Annotated[
        float | None, _reconstruct_opt("spherical_aberration_mm")
    ] = None,
    amplitude_contrast: Annotated[float | None, _reconstruct_opt("amplitude_contrast")] = None,
    normalize_tilts: Annotated[bool | None, _reconstruct_opt("normalize_tilts")] = None,
    log_counts: Annotated[bool | None, _reconstruct_opt("log_counts")] = None,
    taper_px: Annotated[int | None, _reconstruct_opt("taper_px")] = None,
    dose_filter: Annotated[bool | None, _reconstruct_opt("dose_filter")] = None,
    erase_gold: Annotated[bool | None, _reconstruct_opt("erase_gold")] = None,
    gold_diameter_nm: Annotated[float | None, _reconstruct_opt("gold_diameter_nm")] = None,
    write_aligned_stack: Annotated[bool | None, _reconstruct_opt("write_aligned_stack")] = None,
    holdout: Annotated[str | None, _reconstruct_opt("holdout")] = None,
    output_dir: Annotated[Path | None, _reconstruct_opt("output_dir")] = None,
    gpu: Annotated[list[int] | None, _reconstruct_opt("gpu")] = None,
    seed: Annotated[int | None, _reconstruct_opt("seed")] = None,
    overwrite: Annotated[bool | None, _reconstruct_opt("overwrite")] = None,
) -> None:
    """Split a tilt series and reconstruct tomo0, tomo1 and the full tomogram.

    A raw stack is preprocessed (per-view normalisation, faded borders, exposure filter, gold
    erasure) and aligned on the fly with --alignment; an aligned stack needs only its angles.
    """
    _run_reconstruct(config, {k: v for k, v in locals().items() if k != "config"})


@app.command("make-mask")
@_friendly
def make_mask_cmd(
    config: ConfigOpt = None,
    project_dir: Annotated[Path | None, _mask_opt("project_dir")] = None,
    tomo_files: Annotated[list[Path] | None, _mask_opt("tomo_files", syntax=_REPEAT)] = None,
    density_percentage: Annotated[float | None, _mask_opt("density_percentage")] = None,
    std_percentage: Annotated[float | None, _mask_opt("std_percentage")] = None,
    sigma_px: Annotated[float | None, _mask_opt("sigma_px")] = None,
    bin_factor: Annotated[int | None, _mask_opt("bin_factor")] = None,
    z_crop: Annotated[float | None, _mask_opt("z_crop")] = None,
    auto_z: Annotated[bool | None, _mask_opt("auto_z")] = None,
    polarity: Annotated[str | None, _mask_opt("polarity")] = None,
    output_dir: Annotated[Path | None, _mask_opt("output_dir")] = None,
    overwrite: Annotated[bool | None, _mask_opt("overwrite")] = None,
) -> None:
    """Make sample masks (MRC + PNG overlay) to guide prepare-data's --mask-files."""
    cfg = step_config(
        "make_mask",
        config_file=config,
        overrides={k: v for k, v in locals().items() if k != "config"},
    )
    for path in pipeline.make_mask(cfg):  # type: ignore[arg-type]
        typer.echo(f"wrote {path} (check {path.with_suffix('.png').name})")


@app.command("prepare-data")
@_friendly
def prepare_data_cmd(
    config: ConfigOpt = None,
    project_dir: Annotated[Path | None, _prepare_opt("project_dir")] = None,
    tomo0_files: Annotated[list[Path] | None, _prepare_opt("tomo0_files", syntax=_REPEAT)] = None,
    tomo1_files: Annotated[list[Path] | None, _prepare_opt("tomo1_files", syntax=_REPEAT)] = None,
    mask_files: Annotated[list[Path] | None, _prepare_opt("mask_files", syntax=_REPEAT)] = None,
    subtomo_size: Annotated[int | None, _prepare_opt("subtomo_size")] = None,
    mw_angle: Annotated[float | None, _prepare_opt("mw_angle")] = None,
    subtomo_extraction_strides: Annotated[
        list[int] | None,
        _prepare_opt("subtomo_extraction_strides", syntax="Give the option three times."),
    ] = None,
    min_nonzero_mask_fraction_in_subtomo: Annotated[
        float | None, _prepare_opt("min_nonzero_mask_fraction_in_subtomo")
    ] = None,
    val_fraction: Annotated[float | None, _prepare_opt("val_fraction")] = None,
    standardize_full_tomos: Annotated[bool | None, _prepare_opt("standardize_full_tomos")] = None,
    seed: Annotated[int | None, _prepare_opt("seed")] = None,
    overwrite: Annotated[bool | None, _prepare_opt("overwrite")] = None,
) -> None:
    """Extract paired sub-tomogram banks from half tomograms (sliding window, √3 margin)."""
    _run_prepare(config, {k: v for k, v in locals().items() if k != "config"})


@app.command("fit-model")
@_friendly
def fit_model_cmd(
    config: ConfigOpt = None,
    project_dir: Annotated[Path | None, _fit_opt("project_dir")] = None,
    subtomo_size: Annotated[int | None, _fit_opt("subtomo_size")] = None,
    mw_angle: Annotated[float | None, _fit_opt("mw_angle")] = None,
    unet_params_dict: Annotated[
        str | None, _fit_opt("unet_params_dict", syntax="Quote the mapping.")
    ] = None,
    adam_params_dict: Annotated[
        str | None, _fit_opt("adam_params_dict", syntax="Quote the mapping.")
    ] = None,
    num_epochs: Annotated[int | None, _fit_opt("num_epochs")] = None,
    batch_size: Annotated[int | None, _fit_opt("batch_size")] = None,
    update_subtomo_missing_wedges_every_n_epochs: Annotated[
        int | None, _fit_opt("update_subtomo_missing_wedges_every_n_epochs")
    ] = None,
    check_val_every_n_epochs: Annotated[int | None, _fit_opt("check_val_every_n_epochs")] = None,
    save_model_every_n_epochs: Annotated[int | None, _fit_opt("save_model_every_n_epochs")] = None,
    lr_schedule: Annotated[str | None, _fit_opt("lr_schedule")] = None,
    lr_warmup_epochs: Annotated[int | None, _fit_opt("lr_warmup_epochs")] = None,
    ema_half_life_epochs: Annotated[float | None, _fit_opt("ema_half_life_epochs")] = None,
    early_stopping_patience: Annotated[int | None, _fit_opt("early_stopping_patience")] = None,
    rotate: Annotated[bool | None, _fit_opt("rotate")] = None,
    wedge_mask: Annotated[bool | None, _fit_opt("wedge_mask")] = None,
    interpolation: Annotated[str | None, _fit_opt("interpolation")] = None,
    precision: Annotated[str | None, _fit_opt("precision")] = None,
    micro_batch_size: Annotated[int | None, _fit_opt("micro_batch_size")] = None,
    gpu: Annotated[list[int] | None, _fit_opt("gpu")] = None,
    seed: Annotated[int | None, _fit_opt("seed")] = None,
    resume: Annotated[bool | None, _fit_opt("resume")] = None,
    init_from: Annotated[Path | None, _fit_opt("init_from")] = None,
    overwrite: Annotated[bool | None, _fit_opt("overwrite")] = None,
) -> None:
    """Fit the U-Net with the masked Fourier loss on randomly rotated sub-tomogram pairs."""
    overrides = {k: v for k, v in locals().items() if k != "config"}
    overrides["unet_params_dict"] = _parse_mapping(unet_params_dict, "unet-params-dict")
    overrides["adam_params_dict"] = _parse_mapping(adam_params_dict, "adam-params-dict")
    _run_fit(config, overrides)


@app.command("refine-tomogram")
@_friendly
def refine_tomogram_cmd(
    config: ConfigOpt = None,
    project_dir: Annotated[Path | None, _refine_opt("project_dir")] = None,
    tomo0_files: Annotated[list[Path] | None, _refine_opt("tomo0_files", syntax=_REPEAT)] = None,
    tomo1_files: Annotated[list[Path] | None, _refine_opt("tomo1_files", syntax=_REPEAT)] = None,
    tomo_files: Annotated[list[Path] | None, _refine_opt("tomo_files", syntax=_REPEAT)] = None,
    model_checkpoint_file: Annotated[Path | None, _refine_opt("model_checkpoint_file")] = None,
    subtomo_size: Annotated[int | None, _refine_opt("subtomo_size")] = None,
    subtomo_overlap: Annotated[int | None, _refine_opt("subtomo_overlap")] = None,
    mw_angle: Annotated[float | None, _refine_opt("mw_angle")] = None,
    batch_size: Annotated[int | None, _refine_opt("batch_size")] = None,
    recompute_normalization: Annotated[bool | None, _refine_opt("recompute_normalization")] = None,
    mask_tile_wedges: Annotated[bool | None, _refine_opt("mask_tile_wedges")] = None,
    output_dir: Annotated[Path | None, _refine_opt("output_dir")] = None,
    precision: Annotated[str | None, _refine_opt("precision")] = None,
    gpu: Annotated[
        list[int] | None,
        _refine_opt(
            "gpu", text="GPU index; repeat to split the tiles over several; omit for the CPU."
        ),
    ] = None,
    overwrite: Annotated[bool | None, _refine_opt("overwrite")] = None,
    dataset: Annotated[
        str | None,
        _dataset_opt(
            "path",
            flag="--dataset",
            text="Refine every tomogram of this dataset (AreTomo3 folder, Warp project, "
            "RELION-5 tomograms.star, folder or glob of halves), resumably.",
        ),
    ] = None,
    shard: Annotated[str | None, _dataset_opt("shard")] = None,
) -> None:
    """Apply a fitted model to whole tomograms in overlapping, blended tiles."""
    if dataset is not None or shard is not None:
        overrides = {"path": dataset, "project_dir": project_dir, "shard": shard}
        failed = _run_dataset(
            config,
            overrides,
            steps="refine",
            model_checkpoint_file=model_checkpoint_file,
            overwrite=bool(overwrite),
        )
        raise typer.Exit(code=min(failed, 100))
    options = {k: v for k, v in locals().items() if k not in ("config", "dataset", "shard")}
    _run_refine(config, options)


@app.command("run")
@_friendly
def run_cmd(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML config with all sections.")
    ] = None,
    dataset: Annotated[str | None, _dataset_opt("path", flag="--dataset")] = None,
    fit_on: Annotated[list[str] | None, _dataset_opt("fit_on", syntax=_REPEAT)] = None,
    shard: Annotated[str | None, _dataset_opt("shard")] = None,
    project_dir: Annotated[Path | None, _dataset_opt("project_dir")] = None,
    model_checkpoint_file: Annotated[
        Path | None,
        typer.Option(help="With a dataset: refine with this model instead of fitting one."),
    ] = None,
    stop_after: Annotated[
        str | None,
        typer.Option(
            help="With a dataset: stop after 'fit' (then refine in shards, e.g. SLURM array tasks)."
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace prepared data and an existing fit.")
    ] = False,
) -> None:
    """Run (reconstruct,) prepare-data, fit-model and refine-tomogram from one config.

    With a ``reconstruct`` section the tomograms are first reconstructed from the tilt series
    and used as tomo0 and tomo1 by the other steps. With ``--dataset`` (or a ``dataset``
    section) one model is fitted on a whole dataset and every tomogram is refined; run again,
    the same command continues where it stopped. The exit status is the number of tomograms
    that failed (at most 100).
    """
    sections = read_config_file(config) if config is not None else None
    dataset_options = (dataset, fit_on, shard, stop_after, model_checkpoint_file)
    if any(o is not None for o in dataset_options) or (sections and sections["dataset"]):
        if stop_after not in (None, "fit"):
            raise InputError(f"--stop-after: '{stop_after}' is not a step; use fit")
        overrides = {"path": dataset, "fit_on": _fit_on(fit_on), "shard": shard}
        overrides["project_dir"] = project_dir
        failed = _run_dataset(
            config,
            overrides,
            steps="fit" if stop_after else "all",
            model_checkpoint_file=model_checkpoint_file,
            overwrite=overwrite,
        )
        raise typer.Exit(code=min(failed, 100))
    if config is None:
        raise InputError("ddw run: give --config (a YAML config with all sections) or --dataset")
    halves: dict[str, Any] = {}
    has_tilt_series = bool(sections["reconstruct"])
    # Validate every section before any step writes anything.
    # Halves still to be reconstructed get stand-in names while validating.
    stand_in: dict[str, Any] = {}
    if has_tilt_series:
        step_config("reconstruct", config_file=config)
        stand_in = {"tomo0_files": [Path("tomo0.mrc")], "tomo1_files": [Path("tomo1.mrc")]}
    step_config("prepare_data", config_file=config, overrides=stand_in)
    step_config("fit_model", config_file=config)
    step_config(
        "refine_tomogram",
        config_file=config,
        overrides={**stand_in, "model_checkpoint_file": Path("latest.ckpt")},
    )
    if has_tilt_series:
        written = _run_reconstruct(config, {"overwrite": overwrite or None})
        halves = {"tomo0_files": [written["tomo0"]], "tomo1_files": [written["tomo1"]]}
    _run_prepare(config, {**halves, "overwrite": overwrite or None})
    checkpoint = _run_fit(config, {"overwrite": overwrite or None})
    # Refine with the model just fitted, whatever checkpoint the file names.
    refined = _run_refine(
        config,
        {**halves, "model_checkpoint_file": checkpoint, "overwrite": overwrite or None},
    )
    if has_tilt_series and "heldout" in written:
        _run_score(written["record"], [written["full"], *refined], ["full", "refined"])


def _fit_on(names: list[str] | None) -> list[str] | int | None:
    """``--fit-on 8`` is a number of tomograms; names and patterns otherwise."""
    if names and len(names) == 1 and names[0].isdigit():
        return int(names[0])
    return names


def _run_dataset(
    config_file: Path | None,
    overrides: dict[str, Any],
    *,
    steps: str,
    model_checkpoint_file: Path | None,
    overwrite: bool,
) -> int:
    """Run a dataset and print its summary; the number of failed tomograms."""
    from tqdm import tqdm

    from deepdewedge.pipeline.dataset import DatasetCallbacks, run_dataset

    dataset_config = step_config("dataset", config_file=config_file, overrides=overrides)
    fit_bars: list[tqdm] = []
    fit_callbacks = None
    if steps != "refine" and model_checkpoint_file is None:
        fit_config = step_config("fit_model", config_file=config_file)
        fit_callbacks, fit_bars = _fit_callbacks(fit_config.num_epochs)  # type: ignore[attr-defined]
    # The tile bar appears with the first tomogram refined, not during the fit.
    tiles: list[tqdm] = []

    def on_tiles(done: int, total: int) -> None:
        if not tiles:
            tiles.append(tqdm(desc="refining", unit="tile", dynamic_ncols=True))
        tiles[0].total = total
        tiles[0].n = done
        tiles[0].refresh()

    def on_tomogram(name: str, record: dict[str, Any]) -> None:
        if record["status"] == "running" and tiles:
            tiles[0].set_description(f"refining {name}")
        elif record["status"] == "refined":
            tqdm.write(f"{name}: refined in {record['seconds']['refine']:.0f} s")
        elif record["status"] == "failed":
            tqdm.write(f"{name}: FAILED: {record['error']}")

    try:
        summary = run_dataset(
            dataset_config,  # type: ignore[arg-type]
            config_file=config_file,
            model_checkpoint_file=model_checkpoint_file,
            steps=steps,  # type: ignore[arg-type]
            overwrite=overwrite,
            callbacks=DatasetCallbacks(
                fit=fit_callbacks, message=tqdm.write, tiles=on_tiles, tomogram=on_tomogram
            ),
        )
    finally:
        for bar in [*fit_bars, *tiles]:
            bar.close()
    typer.echo(f"model: {summary.checkpoint}")
    if steps == "fit":
        return 0
    for name, reason in summary.failed.items():
        typer.echo(f"failed: {name}: {reason}")
    done = len(summary.refined) + len(summary.skipped)
    typer.echo(
        f"{done + len(summary.failed)} tomograms: {done} refined "
        f"({len(summary.skipped)} before this run), {len(summary.failed)} failed"
    )
    for path in summary.outputs.values():
        typer.echo(f"wrote {path}")
    return len(summary.failed)


def _run_score(record: Path, volumes: list[Path], labels: list[str] | None) -> None:
    """Score volumes against the held-out views of `record`; table, CSV and figure."""
    from deepdewedge.pipeline.heldout import score_heldout

    stem = Path(record).name.removesuffix("_reconstruct.json")
    csv_path = Path(volumes[-1]).parent / f"{stem}_heldout_score.csv"
    figure = csv_path.with_suffix(".png")
    rows = score_heldout(record, volumes, labels=labels, csv_path=csv_path, figure_path=figure)
    typer.echo("| volume | held-out views: mean CC | mean FRC |")
    typer.echo("|---|---|---|")
    for row in rows:
        typer.echo(f"| {row['label']} | {row['mean_cc']:.4f} | {row['mean_frc']:.4f} |")
    typer.echo(f"wrote {csv_path}\nwrote {figure}")


@app.command("demo")
@_friendly
def demo_cmd(
    output_dir: Annotated[Path, typer.Option(help="Where to write the demo.")] = Path("ddw_demo"),
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    num_epochs: Annotated[
        int | None,
        typer.Option(help=_help("Length of each fit in epochs.", "num_epochs", DEMO["num_epochs"])),
    ] = None,
) -> None:
    """Simulate a small tomogram, run FBP, noise2noise-only and DeepDeWedge, report CC."""
    from deepdewedge.demo import run_demo

    run_demo(output_dir, seed=seed, num_epochs=num_epochs, echo=typer.echo)


@app.command("evaluate")
@_friendly
def evaluate_cmd(
    volume: Annotated[
        list[Path], typer.Option(help="Volume to evaluate (MRC); repeat to compare several.")
    ],
    ground_truth: Annotated[Path, typer.Option(help="Ground-truth volume (MRC), same shape.")],
    mw_angle: Annotated[
        float, typer.Option(help="Full opening angle of the missing wedge in degrees.")
    ],
    voxel_size_angstrom: Annotated[
        float | None, typer.Option(help="Voxel size in Å; default: from the MRC headers.")
    ] = None,
    particles: Annotated[
        Path | None,
        typer.Option(
            help="Particle list: CSV with z_px,y_px,x_px[,box_px] or 'z y x' lines; "
            "default: none, no per-particle metrics."
        ),
    ] = None,
    box_size: Annotated[
        int | None, typer.Option(help="Particle box edge in px; default: the box_px column.")
    ] = None,
    json_file: Annotated[
        Path | None,
        typer.Option("--json", help="Write metrics and FSC curves (JSON); default: not written."),
    ] = None,
    csv_file: Annotated[
        Path | None,
        typer.Option(
            "--csv", help="Write one row of metrics per volume (CSV); default: not written."
        ),
    ] = None,
    figure: Annotated[
        Path | None, typer.Option(help="Write the FSC curves (PNG); default: not written.")
    ] = None,
    label: Annotated[
        list[str] | None,
        typer.Option(help="Name of each --volume, in order; default: the file names."),
    ] = None,
) -> None:
    """Compare volumes with a ground truth: CC (all, outside, inside the wedge) and FSC."""
    from deepdewedge.pipeline.evaluation import evaluate, metrics_table

    rows = evaluate(
        volume,
        ground_truth,
        mw_angle_deg=mw_angle,
        voxel_size_angstrom=voxel_size_angstrom,
        particles=particles,
        box_size_px=box_size,
        labels=label,
        json_path=json_file,
        csv_path=csv_file,
        figure_path=figure,
    )
    typer.echo(metrics_table(rows))
    for path in (json_file, csv_file, figure):
        if path is not None:
            typer.echo(f"wrote {path}")


@app.command("score-heldout")
@_friendly
def score_heldout_cmd(
    record: Annotated[
        Path,
        typer.Option(help="The *_reconstruct.json of a ddw reconstruct --holdout run."),
    ],
    volume: Annotated[
        list[Path],
        typer.Option(help="Volume to score (MRC) from that reconstruction; repeat for several."),
    ],
    label: Annotated[
        list[str] | None,
        typer.Option(help="Name of each --volume, in order; default: the file names."),
    ] = None,
) -> None:
    """Score volumes without ground truth: reprojections against the held-out views (CC, FRC).

    Writes {stem}_heldout_score.csv (one row per volume and view) and .png (mean FRC) beside
    the last volume.
    """
    _run_score(record, volume, label)


def main() -> None:  # pragma: no cover - console entry point
    """Entry point."""
    app(prog_name="ddw")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
