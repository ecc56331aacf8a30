"""A real tilt series from raw stack to refined tomogram: EMPIAR-10499, tilt series 00254.

The data (raw stack in counts, IMOD ``.xf``/``.tlt``, Warp ``.xml``) come from the source
archive of ``warpylib==1.1.2`` on PyPI, fetched with pip unless ``--testdata`` points at its
``testdata/`` folder. The script measures what the real-data preprocessing of
``ddw reconstruct`` does, as a biologist would look at it:

1. **Geometry.** The same raw stack reconstructed with the IMOD ``.xf`` and with the Warp
   ``.xml`` made from it (bin 2, 360 unbinned pixels thick): CC between the two tomograms.
2. **Borders.** Bin 2 without preprocessing (counts back-projected as they are) and with the
   defaults: the ratio of the standard deviation in the outer 5% of the central xz slice to
   that of its inner half.
3. **DeepDeWedge.** Bin 4, even/odd halves by dose-symmetric order, noise2noise-only (best
   validation epoch) and DeepDeWedge (last epoch) fitted on the default halves, and
   DeepDeWedge fitted on halves with the gold left in. Gold streaks run along x at the beads'
   y, so they show as rows that stand out: the *bead-row contrast* is the mean standard
   deviation of the bead rows over the median of the other rows (each row taken over the
   central half in z and x); the bead rows are those where the full tomograms with and
   without gold erasure differ (mean squared difference above 10% of its largest value).
   1 means the bead rows look like any other row.

With ``--holdout every:4`` the script instead runs a fourth measurement only: bin 4, the
defaults, those views held out of every tomogram, noise2noise-only and DeepDeWedge fitted as
in 3., and each of the full tomogram (FBP), noise2noise-only and DeepDeWedge scored by its
reprojections against the held-out views (``ddw score-heldout``: mean CC and FRC), the score
for real data, where there is no ground truth. ``--variants`` adds networks and refinement
choices of the ablation (``benchmarks/ablation.py``) to that score: ``refinement``
(``mask_tile_wedges``, fitting statistics), ``residual``, ``bare`` (without
``affine_equivariant``), ``bare-residual``. A finished fit is reused.

Prints one table, writes ``real_data.csv``, ``real_data_orthoslices.png`` (FBP,
noise2noise-only, DeepDeWedge), ``real_data_gold.png`` (DeepDeWedge with and without gold
erasure) and ``real_data_borders.png`` into ``--output`` (default
``benchmarks/real_data_results``). About 35 minutes on 2 CPU cores; ``--epochs`` shortens it.
A fit whose refined tomogram is already in ``--output`` is not run again, so an interrupted
run continues where it stopped.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path

import mrcfile
import numpy as np

from deepdewedge import pipeline
from deepdewedge.config import step_config
from deepdewedge.evaluate.figures import orthoslice_figure
from deepdewedge.evaluate.metrics import correlation_coefficient
from deepdewedge.io.checkpoint import load_checkpoint
from deepdewedge.pipeline.common import save_figure, write_csv
from deepdewedge.pipeline.fitting import best_checkpoint

RAW_OFF = {"normalize_tilts": False, "taper_px": 0, "dose_filter": False, "erase_gold": False}
FIT = {
    "unet_params_dict": {"chans": 16, "num_downsample_layers": 2},
    "adam_params_dict": {"lr": 4e-4},
    "batch_size": 8,
    "check_val_every_n_epochs": 2,
    "save_model_every_n_epochs": None,
    "update_subtomo_missing_wedges_every_n_epochs": 10,
}


def fetch_testdata(folder: Path) -> Path:
    """The ``testdata/`` folder of warpylib 1.1.2's source archive, downloaded with pip."""
    target = folder / "warpylib-1.1.2" / "testdata"
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
            + ["warpylib==1.1.2", "-d", str(folder)],
            check=True,
        )
        with tarfile.open(folder / "warpylib-1.1.2.tar.gz") as archive:
            archive.extractall(folder, filter="data")
    return target


def edge_ratio(volume: np.ndarray) -> float:
    """Std of the outer 5% of x of the central xz slice over that of its inner half."""
    xz = volume[:, volume.shape[1] // 2, :]
    w = xz.shape[1]
    edge = max(1, int(0.05 * w))
    outer = np.concatenate([xz[:, :edge], xz[:, -edge:]], axis=1)
    return float(outer.std() / xz[:, w // 4 : 3 * w // 4].std())


def bead_rows(with_gold: np.ndarray, erased: np.ndarray) -> np.ndarray:
    """Rows (y) where erasing the gold changed the tomogram most, as a boolean mask."""
    change = ((with_gold - erased) ** 2).mean(axis=(0, 2))
    return change > 0.1 * change.max()


def bead_row_contrast(volume: np.ndarray, rows: np.ndarray) -> float:
    """Mean std of the bead rows over the median std of the others (central half in z, x)."""
    d, _, w = volume.shape
    profile = volume[d // 4 : 3 * d // 4, :, w // 4 : 3 * w // 4].std(axis=(0, 2))
    return float(profile[rows].mean() / np.median(profile[~rows]))


def reconstruct(testdata: Path, out: Path, *, bin: int, alignment: str = "xf", **options):
    """``ddw reconstruct`` of the raw stack with the .xf or the .xml alignment."""
    files = {
        "xf": {"alignment": testdata / "xf_import/00254.xf"},
        "xml": {"alignment": testdata / "xf_import/00254.xml"},
    }[alignment]
    config = step_config(
        "reconstruct",
        overrides={
            "tilt_series": testdata / "00254.stack.mrc",
            "tilt_angles": testdata / "xf_import/00254.tlt",
            "acquisition_scheme": "dose-symmetric",
            "bin": bin,
            "thickness": 360,
            "output_dir": out,
            "overwrite": True,
            **files,
            **options,
        },
    )
    return pipeline.reconstruct(config)


def fit_and_refine(tomos: dict, root: Path, *, epochs: int, methods: dict) -> dict:
    """Prepare once, fit each method, refine the halves with it; paths of the refined maps.

    `methods` maps a name to ``(fit options, checkpoint, refinements)``, the last mapping a
    label (added to the name; "" for the plain refinement) to refinement options.
    """
    shared = {"project_dir": root, "seed": 42, "subtomo_size": 32, "mw_angle": 60}
    halves = {"tomo0_files": [tomos["tomo0"]], "tomo1_files": [tomos["tomo1"]]}
    stem = "00254.stack_tomo0+00254.stack_tomo1_refined.mrc"
    jobs = {
        (method, label): root / "refined" / _label(method, label).replace(", ", "_") / stem
        for method, (_, _, refines) in methods.items()
        for label in refines
    }
    refined = {_label(m, label): path for (m, label), path in jobs.items()}
    if all(path.exists() for path in refined.values()):
        return refined
    if not (root / "subtomos" / "metadata.json").exists():
        pipeline.prepare_data(
            step_config(
                "prepare_data",
                overrides={
                    **shared,
                    **halves,
                    "subtomo_extraction_strides": [24, 32, 32],
                    "val_fraction": 0.1,
                    "overwrite": True,
                },
            )
        )
    for method, (switches, checkpoint, refines) in methods.items():
        todo = {label: opts for label, opts in refines.items() if not jobs[method, label].exists()}
        if not todo:
            continue
        logdir = root / f"logs_{method}"
        unet = {**FIT["unet_params_dict"], **switches.get("unet_params_dict", {})}
        config = step_config(
            "fit_model",
            overrides={
                **shared,
                **FIT,
                **switches,
                "unet_params_dict": unet,
                "num_epochs": epochs,
                "logdir": logdir,
                "overwrite": True,
            },
        )
        fitted = _finished_fit(logdir, config) or pipeline.fit_model(config)
        for label, options in todo.items():
            (refined[_label(method, label)],) = pipeline.refine_tomogram(
                step_config(
                    "refine_tomogram",
                    overrides={
                        **shared,
                        **halves,
                        **options,
                        "model_checkpoint_file": fitted[checkpoint],
                        "output_dir": jobs[method, label].parent,
                        "overwrite": True,
                    },
                )
            )
    return refined


def _finished_fit(logdir: Path, config) -> dict | None:
    """The checkpoints of a fit in `logdir` that ran all of `config`'s epochs with its
    network (same ``unet_params_dict``, e.g. not a bare U-Net of an earlier default), else
    None."""
    latest = logdir / "checkpoints" / "latest.ckpt"
    if not latest.exists():
        return None
    state = load_checkpoint(latest)
    network = config.unet_params_dict.model_dump(exclude={"in_chans", "out_chans"})
    if state["epoch"] != config.num_epochs - 1 or state.get("unet_params") != network:
        return None
    return {"checkpoint": latest, "best_checkpoint": best_checkpoint(latest.parent)}


def _label(method: str, label: str) -> str:
    return f"{method}, {label}" if label else method


PLAIN = {"": {}}
# Choices of docs/evaluation.md ("Ablation") on real data, by name of ``--variants``: methods
# added to the score, or refinements added to a method's (its fit is shared).
HELDOUT_VARIANTS = {
    "refinement": {
        "DeepDeWedge": (
            {},
            "checkpoint",
            {
                "mask_tile_wedges": {"mask_tile_wedges": True},
                "fitting statistics": {"recompute_normalization": False},
            },
        )
    },
    "residual": {
        "DeepDeWedge residual": ({"unet_params_dict": {"residual": True}}, "checkpoint", PLAIN)
    },
    "bare": {
        "DeepDeWedge bare": (
            {"unet_params_dict": {"affine_equivariant": False}},
            "checkpoint",
            {"": {}, "fitting statistics": {"recompute_normalization": False}},
        )
    },
    "bare-residual": {
        "DeepDeWedge bare residual": (
            {"unet_params_dict": {"affine_equivariant": False, "residual": True}},
            "checkpoint",
            {"": {}, "fitting statistics": {"recompute_normalization": False}},
        )
    },
}


def heldout_score(
    testdata: Path, out: Path, scheme: str, epochs: int, record, variants: Sequence[str] = ()
) -> None:
    """Bin 4 with `scheme` views held out: FBP, noise2noise-only and DeepDeWedge scored.

    With `variants`, also those of :data:`HELDOUT_VARIANTS`.
    """
    from deepdewedge.pipeline.heldout import score_heldout

    t0 = time.perf_counter()
    root = out / f"bin_4_holdout_{scheme.replace(':', '')}"
    tomos = reconstruct(testdata, root / "tomograms", bin=4, holdout=scheme)
    methods = {
        "noise2noise-only": ({"rotate": False, "wedge_mask": False}, "best_checkpoint", PLAIN),
        "DeepDeWedge": ({}, "checkpoint", PLAIN),
    }
    for variant in variants:
        for method, (switches, checkpoint, refines) in HELDOUT_VARIANTS[variant].items():
            if method in methods:
                refines = {**methods[method][2], **refines}
            methods[method] = (switches, checkpoint, refines)
    refined = fit_and_refine(tomos, root, epochs=epochs, methods=methods)
    volumes = {"FBP": tomos["full"], **refined}
    scores = score_heldout(
        tomos["record"],
        list(volumes.values()),
        labels=list(volumes),
        csv_path=out / "real_data_heldout_views.csv",
        figure_path=out / "real_data_heldout_frc.png",
    )
    seconds = time.perf_counter() - t0
    for row in scores:
        record(
            f"held out {scheme}: {row['label']}",
            "mean CC with held-out views",
            row["mean_cc"],
            seconds,
        )
        record(
            f"held out {scheme}: {row['label']}", "mean FRC with held-out views", row["mean_frc"], 0
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--testdata", type=Path, help="warpylib-1.1.2/testdata folder")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/real_data_results"))
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--holdout", help="only the held-out-view score, e.g. every:4")
    parser.add_argument(
        "--variants",
        nargs="*",
        default=[],
        choices=list(HELDOUT_VARIANTS),
        help="with --holdout: also score these networks and refinement choices",
    )
    args = parser.parse_args()
    out = args.output
    testdata = args.testdata or fetch_testdata(out / "download")
    rows = []

    def record(step: str, measure: str, value: float, seconds: float) -> None:
        rows.append({"step": step, "measure": measure, "value": value, "seconds": seconds})
        print(f"{step:<42} {measure:<34} {value:8.3f} {seconds:8.1f} s", flush=True)

    print(f"{'step':<42} {'measure':<34} {'value':>8} {'time':>10}")
    if args.holdout:
        heldout_score(testdata, out, args.holdout, args.epochs, record, args.variants)
        write_csv(out / "real_data_heldout.csv", rows)
        return
    volumes = {}
    for name, alignment, options in (
        ("bin 2, .xf, no preprocessing", "xf", RAW_OFF),
        ("bin 2, .xf, defaults", "xf", {}),
        ("bin 2, .xml, defaults", "xml", {}),
    ):
        t0 = time.perf_counter()
        written = reconstruct(
            testdata,
            out / name.replace(", ", "_").replace(" ", "_"),
            bin=2,
            alignment=alignment,
            **options,
        )
        volumes[name] = mrcfile.read(written["full"])
        record(
            name, "edge ratio of the xz slice", edge_ratio(volumes[name]), time.perf_counter() - t0
        )
    cc = correlation_coefficient(volumes["bin 2, .xf, defaults"], volumes["bin 2, .xml, defaults"])
    record("bin 2, .xf against .xml", "CC", cc, 0.0)
    save_figure(
        orthoslice_figure({k: volumes[k] for k in list(volumes)[:2]}),
        out / "real_data_borders.png",
    )

    full, refined = {}, {}
    for name, options, methods in (
        (
            "bin 4, defaults",
            {},
            {
                "noise2noise-only": (
                    {"rotate": False, "wedge_mask": False},
                    "best_checkpoint",
                    PLAIN,
                ),
                "DeepDeWedge": ({}, "checkpoint", PLAIN),
            },
        ),
        ("bin 4, gold kept", {"erase_gold": False}, {"DeepDeWedge": ({}, "checkpoint", PLAIN)}),
    ):
        t0 = time.perf_counter()
        root = out / name.replace(", ", "_").replace(" ", "_")
        tomos = reconstruct(testdata, root / "tomograms", bin=4, **options)
        full[name] = mrcfile.read(tomos["full"])
        paths = fit_and_refine(tomos, root, epochs=args.epochs, methods=methods)
        refined[name] = {method: mrcfile.read(path) for method, path in paths.items()}
        record(name, "methods fitted and refined", len(methods), time.perf_counter() - t0)
    rows_y = bead_rows(full["bin 4, gold kept"], full["bin 4, defaults"])
    for name in full:
        for method, volume in {"FBP": full[name], **refined[name]}.items():
            record(f"{name}: {method}", "bead-row contrast", bead_row_contrast(volume, rows_y), 0)
    shown = {"FBP": full["bin 4, defaults"], **refined["bin 4, defaults"]}
    save_figure(orthoslice_figure(shown), out / "real_data_orthoslices.png")
    gold = {
        "DeepDeWedge, gold kept": refined["bin 4, gold kept"]["DeepDeWedge"],
        "DeepDeWedge, gold erased": refined["bin 4, defaults"]["DeepDeWedge"],
    }
    save_figure(orthoslice_figure(gold), out / "real_data_gold.png")
    write_csv(out / "real_data.csv", rows)


if __name__ == "__main__":
    main()
