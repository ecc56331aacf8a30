"""Reconstruction quality against ground truth: FBP, noise2noise-only and DeepDeWedge.

The experiment of the paper's section 2.2.3 (figure 5), at a size a CPU runs in under an hour.
For each tilt-series SNR in {1/2, 1/4, 1/6} and each seed:

1. ``ddw simulate``: an ice slab with macromolecules (the shipped templates) at random
   orientations, vesicles, a membrane sheet and gold beads at 10 Å/voxel, projected over ±60°
   in 2° steps (a 60° missing wedge), with Gaussian noise at the given SNR; no CTF, as in the
   paper.
2. ``ddw reconstruct``: even/odd split, Hamming-filtered back-projection (the paper's FBP
   for this experiment) of the full tilt series and of both halves.
3. ``ddw prepare-data`` once, then ``ddw fit-model`` twice with the same U-Net, optimiser,
   sub-tomograms and number of epochs:

   * noise2noise-only (``rotate: false, wedge_mask: false``), the cryoCARE-like baseline,
     refined from its checkpoint of lowest validation loss (early stopping, as the paper
     needed for cryoCARE) by averaging the refined halves;
   * DeepDeWedge, refined from its last epoch, both by averaging the refined halves (the
     default of ``ddw refine-tomogram``) and from the full tomogram (the paper's step 3).

4. ``ddw evaluate`` of the FBP and of each refined tomogram against the ground truth: CC
   (eq. 6), CC outside and inside the missing wedge, and the average per-particle 0.143-FSC,
   overall and inside the missing wedge.

Prints a table of mean and range (best, worst) over the seeds, and writes ``quality.csv``
(one row per SNR, seed and method), ``quality_summary.csv`` and ``quality.png`` into
``--output`` (default ``benchmarks/quality_results``).

Run: ``python benchmarks/quality.py`` (CPU profile: 64×128×128 voxels, 32³ sub-tomograms,
U-Net with 8 channels and 2 down-samplings, 40 epochs, 3 seeds). ``--profile gpu`` runs a
larger setting (128×320×320, 64³ sub-tomograms, 32 channels, 3 down-samplings, 200 epochs)
on a GPU, ``--profile demo`` the demo's smaller one (48×96×96, 30 epochs); ``--seeds 1
--snr 0.25`` make quick checks. ``--holdout every:4`` leaves every fourth view out of all
tomograms and adds the score without ground truth (``ddw score-heldout``: CC and FRC of each
method's reprojections with the held-out views), and a table of whether it orders the methods
as the CC with the ground truth does.
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import numpy as np
import torch

from deepdewedge import pipeline
from deepdewedge.config import step_config
from deepdewedge.pipeline.common import save_figure, write_csv
from deepdewedge.pipeline.evaluation import evaluate
from deepdewedge.pipeline.heldout import score_heldout
from deepdewedge.pipeline.simulation import simulate, simulate_config

PROFILES = {
    "demo": {
        "shape": (48, 96, 96),
        "subtomo_size": 32,
        "strides": [16, 16, 16],
        "unet": {"chans": 8, "num_downsample_layers": 2},
        "epochs": 30,
        "batch_size": 8,
        "lr": 1e-3,
        "overlap": 8,
        "update_every": 10,
        "gpu": None,
    },
    "cpu": {
        "shape": (64, 128, 128),
        "subtomo_size": 32,
        "strides": [16, 24, 24],
        "unet": {"chans": 8, "num_downsample_layers": 2},
        "epochs": 40,
        "batch_size": 8,
        "lr": 1e-3,
        "overlap": 8,
        "update_every": 10,
        "gpu": None,
    },
    "gpu": {
        "shape": (128, 320, 320),
        "subtomo_size": 64,
        "strides": [32, 32, 32],
        "unet": {"chans": 32, "num_downsample_layers": 3},
        "epochs": 200,
        "batch_size": 8,
        "lr": 4e-4,
        "overlap": 16,
        "update_every": 10,
        "gpu": 0,
    },
}
METHODS = ("FBP", "noise2noise-only", "DeepDeWedge", "DeepDeWedge (full)")
METRICS = (
    "cc",
    "cc_outside_wedge",
    "cc_inside_wedge",
    "particle_fsc_0143_angstrom",
    "particle_fsc_inside_wedge_0143_angstrom",
)
MW_ANGLE_DEG = 60.0


def run_one(
    snr: float, seed: int, profile: dict, root: Path, holdout: str | None = None
) -> list[dict]:
    """Simulate, reconstruct, fit both ways, refine and evaluate; one row per method.

    With `holdout`, those views are left out of every tomogram, and each method is also
    scored by its reprojections against them (``heldout_cc``, ``heldout_frc``).
    """
    timings = {}
    started = time.perf_counter()
    d, h, w = profile["shape"]
    sim = simulate(
        simulate_config(
            output_dir=root / "simulation",
            thickness_px=d,
            height_px=h,
            width_px=w,
            tilt_step_deg=2.0,
            snr=snr,
            seed=seed,
            overwrite=True,
        )
    )
    timings["simulate"] = time.perf_counter() - started

    t0 = time.perf_counter()
    tomos = pipeline.reconstruct(
        step_config(
            "reconstruct",
            overrides={
                "project_dir": root,
                "tilt_series": sim["tilt_series"],
                "tilt_angles": sim["tilt_angles"],
                "mdoc": sim["mdoc"],
                "thickness": d,
                "filter": "hamming",
                "full_filter": "hamming",  # the paper's FBP, and the input of its step 3
                "holdout": holdout,
                "overwrite": True,
            },
        )
    )
    timings["reconstruct"] = time.perf_counter() - t0

    shared = {"project_dir": root, "seed": seed, "subtomo_size": profile["subtomo_size"]}
    halves = {"tomo0_files": [tomos["tomo0"]], "tomo1_files": [tomos["tomo1"]]}
    pipeline.prepare_data(
        step_config(
            "prepare_data",
            overrides={
                **shared,
                **halves,
                "subtomo_extraction_strides": profile["strides"],
                "val_fraction": 0.1,
                "overwrite": True,
            },
        )
    )
    refined = {"FBP": tomos["full"]}
    for method, switches, checkpoint in (
        ("noise2noise-only", {"rotate": False, "wedge_mask": False}, "best_checkpoint"),
        ("DeepDeWedge", {}, "checkpoint"),
    ):
        t0 = time.perf_counter()
        logdir = root / f"logs_{method}"
        fitted = pipeline.fit_model(
            step_config(
                "fit_model",
                overrides={
                    **shared,
                    "logdir": logdir,
                    "gpu": profile["gpu"],
                    "unet_params_dict": profile["unet"],
                    "adam_params_dict": {"lr": profile["lr"]},
                    "num_epochs": profile["epochs"],
                    "batch_size": profile["batch_size"],
                    "check_val_every_n_epochs": 1,
                    "save_model_every_n_epochs": None,
                    "update_subtomo_missing_wedges_every_n_epochs": profile["update_every"],
                    "overwrite": True,
                    **switches,
                },
            )
        )
        jobs = {method: halves}
        if method == "DeepDeWedge":
            jobs["DeepDeWedge (full)"] = {"tomo_files": [tomos["full"]]}
        for name, inputs in jobs.items():
            (refined[name],) = pipeline.refine_tomogram(
                step_config(
                    "refine_tomogram",
                    overrides={
                        **shared,
                        **inputs,
                        "gpu": profile["gpu"],
                        "model_checkpoint_file": fitted[checkpoint],
                        "subtomo_overlap": profile["overlap"],
                        "output_dir": root / "refined" / name.replace(" ", "_"),
                        "overwrite": True,
                    },
                )
            )
        timings[method] = time.perf_counter() - t0

    rows = evaluate(
        [refined[m] for m in METHODS],
        sim["ground_truth"],
        mw_angle_deg=MW_ANGLE_DEG,
        particles=sim["particles"],
        labels=list(METHODS),
        json_path=root / "metrics.json",
        figure_path=root / "fsc.png",
    )
    seconds = time.perf_counter() - started
    print(
        f"SNR {snr:.3g} seed {seed}: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
        + f", total {seconds:.0f} s",
        flush=True,
    )
    heldout = {}
    if holdout is not None:
        scores = score_heldout(tomos["record"], [refined[m] for m in METHODS], labels=METHODS)
        heldout = {row["label"]: row for row in scores}
    out = []
    for row in rows:
        record = {"snr": snr, "seed": seed, "method": row["label"]}
        record |= {m: row[m] for m in (*METRICS, "n_particles")}
        if heldout:
            record["heldout_cc"] = heldout[row["label"]]["mean_cc"]
            record["heldout_frc"] = heldout[row["label"]]["mean_frc"]
        record["seconds"] = seconds
        out.append(record)
    return out


def summarise(rows: list[dict]) -> list[dict]:
    """Mean, best and worst over seeds for each SNR and method."""
    summary = []
    for snr in sorted({r["snr"] for r in rows}, reverse=True):
        for method in METHODS:
            group = [r for r in rows if r["snr"] == snr and r["method"] == method]
            if not group:
                continue
            entry = {"snr": snr, "method": method, "seeds": len(group)}
            for metric in METRICS:
                values = np.array([r[metric] for r in group], dtype=float)
                values = values[np.isfinite(values)]
                if len(values) == 0:
                    entry |= {metric: math.nan, f"{metric}_min": math.nan}
                    entry[f"{metric}_max"] = math.nan
                    continue
                entry[metric] = float(values.mean())
                entry[f"{metric}_min"] = float(values.min())
                entry[f"{metric}_max"] = float(values.max())
            summary.append(entry)
    return summary


def ranking_agreement(rows: list[dict]) -> str:
    """Per run, the methods ordered by ground-truth CC and by the held-out score."""
    lines = ["| SNR | seed | by CC with ground truth | by held-out CC | same order |"]
    lines.append("|---|---|---|---|---|")
    agree = total = 0
    for snr, seed in sorted({(r["snr"], r["seed"]) for r in rows}, key=lambda k: (-k[0], k[1])):
        run = [r for r in rows if r["snr"] == snr and r["seed"] == seed]
        by_cc = [r["method"] for r in sorted(run, key=lambda r: -r["cc"])]
        by_heldout = [r["method"] for r in sorted(run, key=lambda r: -r["heldout_cc"])]
        same = by_cc == by_heldout
        agree, total = agree + same, total + 1
        lines.append(
            f"| 1/{1 / snr:.0f} | {seed} | {' > '.join(by_cc)} | {' > '.join(by_heldout)} "
            f"| {'yes' if same else 'no'} |"
        )
    return "\n".join(lines) + f"\n\nsame order in {agree} of {total} runs"


def markdown(summary: list[dict]) -> str:
    header = ["SNR", "method", *METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in summary:
        cells = [f"1/{1 / entry['snr']:.0f}", entry["method"]]
        for metric in METRICS:
            mean, lo, hi = (entry[metric], entry[f"{metric}_min"], entry[f"{metric}_max"])
            fmt = ".0f" if "fsc" in metric else ".3f"
            if not math.isfinite(mean):
                cells.append("n/a")
            elif entry["seeds"] > 1:
                cells.append(f"{mean:{fmt}} ({lo:{fmt}}–{hi:{fmt}})")
            else:
                cells.append(f"{mean:{fmt}}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(summary: list[dict], path: Path) -> None:
    """One panel per metric against SNR, markers at the mean, bars from worst to best."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {
        "cc": "CC",
        "cc_outside_wedge": "CC outside the missing wedge",
        "cc_inside_wedge": "CC inside the missing wedge",
        "particle_fsc_0143_angstrom": "particle 0.143-FSC (Å)",
        "particle_fsc_inside_wedge_0143_angstrom": "particle 0.143-FSC inside wedge (Å)",
    }
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.4))
    snrs = sorted({e["snr"] for e in summary}, reverse=True)
    for ax, metric in zip(axes, METRICS, strict=True):
        for i, method in enumerate(METHODS):
            entries = [e for e in summary if e["method"] == method]
            if not entries:
                continue
            x = np.arange(len(entries)) + (i - 1.5) * 0.08
            mean = np.array([e[metric] for e in entries])
            err = np.array(
                [
                    [m - e[f"{metric}_min"], e[f"{metric}_max"] - m]
                    for e, m in zip(entries, mean, strict=True)
                ]
            ).T
            ax.errorbar(x, mean, yerr=err, fmt="o", capsize=3, label=method)
        ax.set_xticks(range(len(snrs)), [f"1/{1 / s:.0f}" for s in snrs])
        ax.set_xlabel("tilt-series SNR")
        ax.set_title(titles[metric], fontsize=10)
        if "fsc" in metric:
            ax.invert_yaxis()  # lower is better: better stays on top, as for CC
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def read_rows(path: Path) -> list[dict]:
    """Rows of an earlier, possibly interrupted run, or none."""
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for key, value in row.items():
            if key != "method" and value != "":
                row[key] = int(value) if key in ("seed", "n_particles") else float(value)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--snr", type=float, nargs="+", default=[1 / 2, 1 / 4, 1 / 6])
    parser.add_argument("--seeds", type=int, default=3, help="runs per SNR (seeds 0, 1, ...)")
    parser.add_argument("--epochs", type=int, default=None, help="override the profile's")
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("quality_results"))
    parser.add_argument(
        "--holdout",
        default=None,
        help="hold views out (every:N or highest:K) and score each method by reprojection",
    )
    args = parser.parse_args(argv)
    profile = dict(PROFILES[args.profile])
    if args.epochs is not None:
        profile["epochs"] = args.epochs
    args.output.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if profile["gpu"] is not None else "CPU"
    print(
        f"profile {args.profile} on {device} ({torch.get_num_threads()} threads): "
        f"{profile['shape']} voxels, sub-tomograms {profile['subtomo_size']}³, "
        f"U-Net {profile['unet']}, {profile['epochs']} epochs",
        flush=True,
    )
    rows = read_rows(args.output / "quality.csv")
    done = {(r["snr"], r["seed"]) for r in rows}
    started = time.perf_counter()
    # Seeds outermost, so that an interrupted run has covered every SNR; finished runs found
    # in quality.csv are kept and not repeated.
    for seed in range(args.seeds):
        for snr in args.snr:
            if (snr, seed) in done:
                continue
            root = args.output / f"snr{snr:.3f}_seed{seed}"
            rows += run_one(snr, seed, profile, root, holdout=args.holdout)
            write_csv(args.output / "quality.csv", rows)
    summary = summarise(rows)
    write_csv(args.output / "quality_summary.csv", summary)
    figure(summary, args.output / "quality.png")
    print(f"\n{markdown(summary)}\n")
    if args.holdout is not None and all("heldout_cc" in r for r in rows):
        print(f"{ranking_agreement(rows)}\n")
    print(f"total {time.perf_counter() - started:.0f} s; results in {args.output}")


if __name__ == "__main__":
    main()
