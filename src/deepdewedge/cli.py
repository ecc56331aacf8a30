"""The ``ddw`` command line: parse, validate, call the pipeline, report."""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
import yaml
from tqdm import tqdm

from deepdewedge import pipeline
from deepdewedge.config import read_config_file, step_config
from deepdewedge.fit.loop import Callbacks
from deepdewedge.io.mrc import InputError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="DeepDeWedge: self-supervised denoising and missing-wedge filling for cryo-ET.",
)

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="YAML config (sections shared, prepare_data, "
        "fit_model, refine_tomogram); options given here override it.",
    ),
]
ProjectOpt = Annotated[Path | None, typer.Option(help="Project directory.")]
Tomo0Opt = Annotated[list[Path] | None, typer.Option(help="Half tomogram(s) 0 (MRC).")]
Tomo1Opt = Annotated[list[Path] | None, typer.Option(help="Half tomogram(s) 1 (MRC).")]
SizeOpt = Annotated[int | None, typer.Option(help="Edge of the sub-tomograms in voxels.")]
MwOpt = Annotated[float | None, typer.Option(help="Full opening angle of the missing wedge (°).")]
GpuOpt = Annotated[list[int] | None, typer.Option(help="GPU index; omit to run on the CPU.")]
SeedOpt = Annotated[int | None, typer.Option(help="Random seed.")]


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
        except torch.OutOfMemoryError:
            typer.echo("error: out of GPU memory; lower batch_size (or subtomo_size)", err=True)
            raise typer.Exit(code=1) from None
        except KeyboardInterrupt:
            resumable = func.__name__ in ("fit_model_cmd", "run_cmd")
            typer.echo(
                "interrupted" + ("; resume fitting with --resume" if resumable else ""), err=True
            )
            raise typer.Exit(code=130) from None

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


def _run_refine(config_file: Path | None, overrides: dict[str, Any]) -> None:
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


@app.command("simulate")
@_friendly
def simulate_cmd(
    output_dir: Annotated[Path | None, typer.Option(help="Folder for the simulated data.")] = None,
    thickness_px: Annotated[
        int | None, typer.Option(help="Ground-truth thickness (z), i.e. the tomogram's.")
    ] = None,
    height_px: Annotated[int | None, typer.Option(help="Image height (y).")] = None,
    width_px: Annotated[int | None, typer.Option(help="Image width (x).")] = None,
    voxel_size_angstrom: Annotated[float | None, typer.Option()] = None,
    ice_thickness_px: Annotated[int | None, typer.Option()] = None,
    templates: Annotated[
        list[str] | None,
        typer.Option(help="Macromolecule to use (repeat for several); default: all."),
    ] = None,
    n_particles: Annotated[int | None, typer.Option(help="Particles in the field of view.")] = None,
    n_vesicles: Annotated[int | None, typer.Option()] = None,
    n_sheets: Annotated[int | None, typer.Option(help="Flat membrane patches.")] = None,
    n_beads: Annotated[int | None, typer.Option(help="Gold beads.")] = None,
    bead_radius_angstrom: Annotated[float | None, typer.Option()] = None,
    tilt_min_deg: Annotated[float | None, typer.Option()] = None,
    tilt_max_deg: Annotated[float | None, typer.Option()] = None,
    tilt_step_deg: Annotated[float | None, typer.Option()] = None,
    acquisition_scheme: Annotated[
        str | None, typer.Option(help="dose-symmetric or sequential.")
    ] = None,
    dose_per_tilt_e_per_a2: Annotated[float | None, typer.Option()] = None,
    snr: Annotated[
        float | None, typer.Option(help="var(signal) / var(noise) of the tilt series.")
    ] = None,
    ctf: Annotated[bool | None, typer.Option(help="Modulate the images by the CTF.")] = None,
    defocus_um: Annotated[float | None, typer.Option(help="Underfocus at the tilt axis.")] = None,
    voltage_kv: Annotated[float | None, typer.Option()] = None,
    spherical_aberration_mm: Annotated[float | None, typer.Option()] = None,
    amplitude_contrast: Annotated[float | None, typer.Option()] = None,
    defocus_gradient: Annotated[
        bool | None, typer.Option(help="Defocus varies across tilted images.")
    ] = None,
    n_frames: Annotated[
        int | None, typer.Option(help="Dose-fractionated frames per tilt; writes even/odd sums.")
    ] = None,
    seed: SeedOpt = None,
    overwrite: Annotated[bool | None, typer.Option(help="Replace an existing simulation.")] = None,
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
    project_dir: ProjectOpt = None,
    tilt_series: Annotated[
        Path | None, typer.Option(help="Tilt series (MRC stack): raw with --alignment, or aligned.")
    ] = None,
    alignment: Annotated[
        Path | None,
        typer.Option(
            help="Alignment of the raw stack: IMOD .xf (with --tilt-angles), AreTomo .aln, "
            "Warp .xml or RELION-5 tilt-series .star; the format is recognised from the file."
        ),
    ] = None,
    tilt_angles: Annotated[
        Path | None, typer.Option(help="IMOD .tlt or .rawtlt file (where the alignment has none).")
    ] = None,
    x_tilt_file: Annotated[Path | None, typer.Option(help="IMOD .xtilt file.")] = None,
    mdoc: Annotated[
        Path | None, typer.Option(help="SerialEM .mdoc: angles, acquisition order, dose, defocus.")
    ] = None,
    even_frames: Annotated[Path | None, typer.Option(help="Even-frame sums (MRC stack).")] = None,
    odd_frames: Annotated[Path | None, typer.Option(help="Odd-frame sums (MRC stack).")] = None,
    split: Annotated[str | None, typer.Option(help="even-odd, frames or random.")] = None,
    random_fraction: Annotated[float | None, typer.Option()] = None,
    acquisition_scheme: Annotated[
        str | None, typer.Option(help="sequential or dose-symmetric (without an .mdoc).")
    ] = None,
    pixel_size_angstrom: Annotated[
        float | None, typer.Option(help="Pixel size of the stack; default: from its header.")
    ] = None,
    bin: Annotated[int | None, typer.Option(help="Binning factor.")] = None,
    binning_method: Annotated[str | None, typer.Option(help="fourier or average.")] = None,
    thickness: Annotated[
        int | None, typer.Option(help="Tomogram thickness in unbinned pixels.")
    ] = None,
    tilt_axis_offset_px: Annotated[float | None, typer.Option()] = None,
    exclude_views: Annotated[
        list[int] | None, typer.Option(help="View to leave out (1-based, repeat for several).")
    ] = None,
    filter: Annotated[str | None, typer.Option(help="ramp, hamming or sirt.")] = None,
    sirt_iterations: Annotated[int | None, typer.Option()] = None,
    defocus_file: Annotated[
        Path | None,
        typer.Option(help="IMOD .defocus, CTFFIND output, or one defocus per line in µm."),
    ] = None,
    ctf_correction: Annotated[str | None, typer.Option(help="phase-flip or none.")] = None,
    wiener_deconvolution: Annotated[bool | None, typer.Option()] = None,
    voltage_kv: Annotated[float | None, typer.Option()] = None,
    spherical_aberration_mm: Annotated[float | None, typer.Option()] = None,
    amplitude_contrast: Annotated[float | None, typer.Option()] = None,
    normalize_tilts: Annotated[
        bool | None, typer.Option(help="Scale each view to zero mean, unit std (default on).")
    ] = None,
    log_counts: Annotated[
        bool | None, typer.Option(help="Take the log of the counts before normalising.")
    ] = None,
    taper_px: Annotated[
        int | None,
        typer.Option(help="Fade the view borders over this many unbinned pixels (0: off)."),
    ] = None,
    dose_filter: Annotated[
        bool | None, typer.Option(help="Exposure filter where each view's dose is known.")
    ] = None,
    erase_gold: Annotated[
        bool | None, typer.Option(help="Erase gold fiducials where they are found (default on).")
    ] = None,
    gold_diameter_nm: Annotated[
        float | None, typer.Option(help="Gold bead diameter in nm; default: measured.")
    ] = None,
    write_aligned_stack: Annotated[
        bool | None, typer.Option(help="Also write the preprocessed, aligned, binned stack.")
    ] = None,
    output_dir: Annotated[Path | None, typer.Option()] = None,
    gpu: GpuOpt = None,
    seed: SeedOpt = None,
    overwrite: Annotated[bool | None, typer.Option(help="Replace existing tomograms.")] = None,
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
    project_dir: ProjectOpt = None,
    tomo_files: Annotated[list[Path] | None, typer.Option(help="Tomogram(s) to mask.")] = None,
    density_percentage: Annotated[
        float | None, typer.Option(help="Percentage of voxels kept for their local density.")
    ] = None,
    std_percentage: Annotated[
        float | None,
        typer.Option(
            help="Percentage of voxels kept for their local structure (standard deviation)."
        ),
    ] = None,
    sigma_px: Annotated[float | None, typer.Option(help="Smoothing width in voxels.")] = None,
    bin_factor: Annotated[int | None, typer.Option(help="Compute on a binned copy.")] = None,
    z_crop: Annotated[
        float | None, typer.Option(help="Fraction of slices removed at the top and at the bottom.")
    ] = None,
    auto_z: Annotated[
        bool | None, typer.Option(help="Remove the empty ice above and below the sample.")
    ] = None,
    polarity: Annotated[str | None, typer.Option(help="both, dark or bright.")] = None,
    output_dir: Annotated[Path | None, typer.Option()] = None,
    overwrite: Annotated[bool | None, typer.Option(help="Replace existing masks.")] = None,
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
    project_dir: ProjectOpt = None,
    tomo0_files: Tomo0Opt = None,
    tomo1_files: Tomo1Opt = None,
    mask_files: Annotated[list[Path] | None, typer.Option(help="Binary mask(s) (MRC).")] = None,
    subtomo_size: SizeOpt = None,
    mw_angle: MwOpt = None,
    subtomo_extraction_strides: Annotated[
        list[int] | None, typer.Option(help="Strides z y x (give three times).")
    ] = None,
    min_nonzero_mask_fraction_in_subtomo: Annotated[float | None, typer.Option()] = None,
    val_fraction: Annotated[float | None, typer.Option()] = None,
    standardize_full_tomos: Annotated[bool | None, typer.Option()] = None,
    seed: SeedOpt = None,
    overwrite: Annotated[bool | None, typer.Option(help="Replace prepared data.")] = None,
) -> None:
    """Extract paired sub-tomogram banks from half tomograms (sliding window, √3 margin)."""
    _run_prepare(config, {k: v for k, v in locals().items() if k != "config"})


@app.command("fit-model")
@_friendly
def fit_model_cmd(
    config: ConfigOpt = None,
    project_dir: ProjectOpt = None,
    subtomo_size: SizeOpt = None,
    mw_angle: MwOpt = None,
    unet_params_dict: Annotated[
        str | None,
        typer.Option(
            help="U-Net options, e.g. '{chans: 32, num_downsample_layers: 3, drop_prob: 0}'."
        ),
    ] = None,
    adam_params_dict: Annotated[
        str | None, typer.Option(help="Adam options, e.g. '{lr: 4e-4}'.")
    ] = None,
    num_epochs: Annotated[int | None, typer.Option()] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    update_subtomo_missing_wedges_every_n_epochs: Annotated[int | None, typer.Option()] = None,
    check_val_every_n_epochs: Annotated[int | None, typer.Option()] = None,
    save_model_every_n_epochs: Annotated[int | None, typer.Option()] = None,
    rotate: Annotated[
        bool | None, typer.Option(help="Random rotations (--no-rotate for noise2noise-only).")
    ] = None,
    wedge_mask: Annotated[
        bool | None,
        typer.Option(help="Extra wedge and masked loss (--no-wedge-mask for noise2noise-only)."),
    ] = None,
    interpolation: Annotated[str | None, typer.Option(help="cubic (default) or linear.")] = None,
    precision: Annotated[
        str | None, typer.Option(help="auto (bf16-mixed on GPUs, 32 on the CPU), 32 or bf16-mixed.")
    ] = None,
    gpu: GpuOpt = None,
    seed: SeedOpt = None,
    resume: Annotated[bool | None, typer.Option(help="Continue from latest.ckpt.")] = None,
    overwrite: Annotated[bool | None, typer.Option(help="Discard an existing fit.")] = None,
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
    project_dir: ProjectOpt = None,
    tomo0_files: Tomo0Opt = None,
    tomo1_files: Tomo1Opt = None,
    tomo_files: Annotated[
        list[Path] | None,
        typer.Option(help="Full tomogram(s) to refine instead of averaging refined halves."),
    ] = None,
    model_checkpoint_file: Annotated[
        Path | None,
        typer.Option(help="Checkpoint; default: best validation checkpoint of the project."),
    ] = None,
    subtomo_size: SizeOpt = None,
    subtomo_overlap: Annotated[int | None, typer.Option()] = None,
    mw_angle: MwOpt = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    recompute_normalization: Annotated[bool | None, typer.Option()] = None,
    output_dir: Annotated[Path | None, typer.Option()] = None,
    precision: Annotated[str | None, typer.Option()] = None,
    gpu: Annotated[
        list[int] | None,
        typer.Option(help="GPU index; repeat to split the tiles over several; omit for the CPU."),
    ] = None,
    overwrite: Annotated[bool | None, typer.Option(help="Replace refined tomograms.")] = None,
) -> None:
    """Apply a fitted model to whole tomograms in overlapping, blended tiles."""
    _run_refine(config, {k: v for k, v in locals().items() if k != "config"})


@app.command("run")
@_friendly
def run_cmd(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML config with all sections.")],
    overwrite: Annotated[
        bool, typer.Option(help="Replace prepared data and an existing fit.")
    ] = False,
) -> None:
    """Run (reconstruct,) prepare-data, fit-model and refine-tomogram from one config.

    With a ``reconstruct`` section the tomograms are first reconstructed from the tilt series
    and used as tomo0 and tomo1 by the other steps.
    """
    halves: dict[str, Any] = {}
    has_tilt_series = bool(read_config_file(config)["reconstruct"])
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
    _run_refine(
        config,
        {**halves, "model_checkpoint_file": checkpoint, "overwrite": overwrite or None},
    )


@app.command("demo")
@_friendly
def demo_cmd(
    output_dir: Annotated[Path, typer.Option(help="Where to write the demo.")] = Path("ddw_demo"),
    seed: Annotated[int, typer.Option()] = 0,
    num_epochs: Annotated[int | None, typer.Option(help="Fitting epochs per model.")] = None,
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
    mw_angle: Annotated[float, typer.Option(help="Full opening angle of the missing wedge (°).")],
    voxel_size_angstrom: Annotated[
        float | None, typer.Option(help="Voxel size in Å; default: from the MRC headers.")
    ] = None,
    particles: Annotated[
        Path | None,
        typer.Option(help="Particle list: CSV with z_px,y_px,x_px[,box_px] or 'z y x' lines."),
    ] = None,
    box_size: Annotated[
        int | None, typer.Option(help="Particle box edge in voxels; default: box_px column.")
    ] = None,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Write metrics and FSC curves (JSON).")
    ] = None,
    csv_file: Annotated[
        Path | None, typer.Option("--csv", help="Write one row of metrics per volume (CSV).")
    ] = None,
    figure: Annotated[Path | None, typer.Option(help="Write the FSC curves (PNG).")] = None,
    label: Annotated[
        list[str] | None, typer.Option(help="Name of each --volume, in order; default: file name.")
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


def main() -> None:  # pragma: no cover - console entry point
    """Entry point."""
    app(prog_name="ddw")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
