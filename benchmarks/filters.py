"""Reconstruction filters against ground truth: the full tomogram, and the halves for fitting.

``ddw reconstruct`` filters the halves tomo0/tomo1 that DeepDeWedge fits on (``--filter``)
and the full tomogram a user opens in a viewer (``--full-filter``): ramp, hamming or the
SIRT-like sirt. The best filter for one need not be the best for the other: the network
denoises the halves itself. For each tilt-series SNR and seed:

1. ``ddw simulate``: the ice slab with macromolecules, vesicles, a sheet and gold of
   ``benchmarks/quality.py`` (10 Å/voxel, ±60° in 2° steps, a 60° missing wedge, no CTF).
2. ``ddw reconstruct`` (even/odd split) once per filter, the same for the halves and the
   full tomogram: ramp, hamming and sirt with 3, 5, 10 and 20 iterations.
3. Part "full": ``ddw evaluate`` of each full tomogram: CC with the ground truth (eq. 6),
   outside and inside the missing wedge.
4. Part "halves" (the SNRs of ``--halves-snr``): for ramp, hamming and sirt (10 iterations),
   ``ddw prepare-data``, ``ddw fit-model`` and ``ddw refine-tomogram`` (halves averaged,
   last epoch) with identical, demo-sized settings (U-Net of 8 channels and 2 down-samplings,
   32³ sub-tomograms), then ``ddw evaluate`` of the refined tomogram. CC is blind to the
   refined tomogram's intensity scale, so the filters are compared fairly.

Prints markdown tables (mean ± standard deviation over the seeds) and writes
``filters.csv`` (one row per part, SNR, seed and filter) and ``filters_summary.csv`` into
``--output`` (default ``benchmarks/filters_results``).

Run: ``OMP_NUM_THREADS=1 python benchmarks/filters.py`` (64×128×128 voxels, SNR 1/2, 1/4,
1/6 for the full tomogram and 1/4 for the halves, 3 seeds; a fit takes 3-6 min on one CPU
thread shared with other jobs, the full-tomogram part about a minute in all).
``--halves-snr 0.5 0.25 0.1667`` fits at every SNR; ``--parts full`` skips the fits;
``--quick`` runs one seed at SNR 1/4 at a tiny size, as a smoke test.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

from deepdewedge import pipeline
from deepdewedge.config import DEMO, step_config
from deepdewedge.pipeline.common import write_csv
from deepdewedge.pipeline.evaluation import evaluate
from deepdewedge.pipeline.simulation import simulate, simulate_config

# label: (filter, sirt_iterations)
FULL_FILTERS = {
    "ramp": ("ramp", 10),
    "hamming": ("hamming", 10),
    "sirt-3": ("sirt", 3),
    "sirt-5": ("sirt", 5),
    "sirt-10": ("sirt", 10),
    "sirt-20": ("sirt", 20),
}
HALVES_FILTERS = ("ramp", "hamming", "sirt-10")
METRICS = ("cc", "cc_outside_wedge", "cc_inside_wedge")
MW_ANGLE_DEG = 60.0
SIZES = {
    # The demo's network and optimiser on quality.py's CPU volume.
    "default": {
        "shape": (64, 128, 128),
        "voxel_angstrom": 10.0,
        "subtomo_size": DEMO["subtomo_size"],
        "strides": [16, 24, 24],
        "unet": DEMO["unet"],
        "epochs": DEMO["num_epochs"],
        "batch_size": DEMO["batch_size"],
        "lr": DEMO["lr"],
        "overlap": 8,
    },
    "quick": {
        "shape": (24, 48, 48),
        "voxel_angstrom": 25.0,  # so that every template fits in the thin ice
        "subtomo_size": 16,
        "strides": [8, 16, 16],
        "unet": {"chans": 4, "num_downsample_layers": 1, "drop_prob": 0.0},
        "epochs": 2,
        "batch_size": 4,
        "lr": 1e-3,
        "overlap": 4,
    },
}


def reconstruct_all(snr: float, seed: int, size: dict, root: Path) -> tuple[dict, dict]:
    """Simulate one tilt series and reconstruct it with every filter of ``FULL_FILTERS``.

    Returns the simulation's paths and, per filter label, the reconstruction's paths.
    """
    d, h, w = size["shape"]
    sim = simulate(
        simulate_config(
            output_dir=root / "simulation",
            thickness_px=d,
            height_px=h,
            width_px=w,
            voxel_size_angstrom=size["voxel_angstrom"],
            tilt_step_deg=2.0,
            snr=snr,
            seed=seed,
            overwrite=True,
        )
    )
    tomos = {}
    for label, (name, iterations) in FULL_FILTERS.items():
        tomos[label] = pipeline.reconstruct(
            step_config(
                "reconstruct",
                overrides={
                    "project_dir": root,
                    "tilt_series": sim["tilt_series"],
                    "tilt_angles": sim["tilt_angles"],
                    "mdoc": sim["mdoc"],
                    "thickness": d,
                    "filter": name,
                    "full_filter": name,
                    "sirt_iterations": iterations,
                    "output_dir": root / f"tomograms_{label}",
                    "overwrite": True,
                },
            )
        )
    return sim, tomos


def refine_halves(tomos: dict, seed: int, size: dict, root: Path) -> Path:
    """Prepare, fit and refine (halves averaged, last epoch); the refined tomogram's path."""
    shared = {"project_dir": root, "seed": seed, "subtomo_size": size["subtomo_size"]}
    halves = {"tomo0_files": [tomos["tomo0"]], "tomo1_files": [tomos["tomo1"]]}
    pipeline.prepare_data(
        step_config(
            "prepare_data",
            overrides={
                **shared,
                **halves,
                "subtomo_extraction_strides": size["strides"],
                "val_fraction": 0.1,
                "overwrite": True,
            },
        )
    )
    fitted = pipeline.fit_model(
        step_config(
            "fit_model",
            overrides={
                **shared,
                "unet_params_dict": size["unet"],
                "adam_params_dict": {"lr": size["lr"]},
                "num_epochs": size["epochs"],
                "batch_size": size["batch_size"],
                "check_val_every_n_epochs": 1,
                "save_model_every_n_epochs": None,
                "update_subtomo_missing_wedges_every_n_epochs": 10,
                "overwrite": True,
            },
        )
    )
    (refined,) = pipeline.refine_tomogram(
        step_config(
            "refine_tomogram",
            overrides={
                **shared,
                **halves,
                "model_checkpoint_file": fitted["checkpoint"],
                "subtomo_overlap": size["overlap"],
                "overwrite": True,
            },
        )
    )
    return refined


def run_case(snr: float, seed: int, size: dict, root: Path, *, halves: bool) -> list[dict]:
    """One SNR and seed: rows of part "full" and, with `halves`, of part "halves"."""
    started = time.perf_counter()
    sim, tomos = reconstruct_all(snr, seed, size, root)
    volumes = {("full", label): tomos[label]["full"] for label in FULL_FILTERS}
    seconds = {key: time.perf_counter() - started for key in volumes}
    if halves:
        for label in HALVES_FILTERS:
            t0 = time.perf_counter()
            volumes[("halves", label)] = refine_halves(
                tomos[label], seed, size, root / f"project_{label}"
            )
            seconds[("halves", label)] = time.perf_counter() - t0
    rows = evaluate(
        list(volumes.values()),
        sim["ground_truth"],
        mw_angle_deg=MW_ANGLE_DEG,
        labels=[f"{part} {label}" for part, label in volumes],
    )
    print(f"SNR {snr:.3g} seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
    return [
        {"part": part, "snr": snr, "seed": seed, "filter": label}
        | {m: row[m] for m in METRICS}
        | {"seconds": round(seconds[(part, label)], 1)}
        for (part, label), row in zip(volumes, rows, strict=True)
    ]


def summarise(rows: list[dict]) -> list[dict]:
    """Mean, standard deviation, min and max over seeds per part, SNR and filter."""
    summary = []
    for part in ("full", "halves"):
        for snr in sorted({r["snr"] for r in rows}, reverse=True):
            for label in FULL_FILTERS:
                group = [
                    r for r in rows if (r["part"], r["snr"], r["filter"]) == (part, snr, label)
                ]
                if not group:
                    continue
                entry = {"part": part, "snr": snr, "filter": label, "seeds": len(group)}
                for metric in METRICS:
                    values = np.array([r[metric] for r in group], dtype=float)
                    entry[metric] = float(values.mean())
                    entry[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
                    entry[f"{metric}_min"] = float(values.min())
                    entry[f"{metric}_max"] = float(values.max())
                summary.append(entry)
    return summary


def markdown(summary: list[dict], part: str) -> str:
    """One table of a part: mean ± standard deviation over seeds."""
    header = ["SNR", "filter", "seeds", "CC", "CC outside wedge", "CC inside wedge"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in (e for e in summary if e["part"] == part):
        cells = [f"1/{1 / entry['snr']:.0f}", entry["filter"], str(entry["seeds"])]
        cells += [f"{entry[m]:.3f} ± {entry[f'{m}_std']:.3f}" for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--snr", type=float, nargs="+", default=[1 / 2, 1 / 4, 1 / 6])
    parser.add_argument("--halves-snr", type=float, nargs="+", default=[1 / 4])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0, 1, ... per SNR")
    parser.add_argument(
        "--parts", nargs="+", choices=("full", "halves"), default=["full", "halves"]
    )
    parser.add_argument("--epochs", type=int, default=None, help="override the fits' epochs")
    parser.add_argument("--quick", action="store_true", help="1 seed, SNR 1/4, tiny sizes")
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("filters_results"))
    args = parser.parse_args(argv)
    size = dict(SIZES["quick" if args.quick else "default"])
    if args.epochs is not None:
        size["epochs"] = args.epochs
    if args.quick:
        args.snr, args.halves_snr, args.seeds = [1 / 4], [1 / 4], 1
    halves_snr = {round(s, 6) for s in args.halves_snr} if "halves" in args.parts else set()
    snrs = list(dict.fromkeys(args.snr + sorted(args.halves_snr, reverse=True)))
    args.output.mkdir(parents=True, exist_ok=True)
    print(
        f"{size['shape']} voxels, sub-tomograms {size['subtomo_size']}³, U-Net {size['unet']}, "
        f"{size['epochs']} epochs",
        flush=True,
    )
    rows: list[dict] = []
    started = time.perf_counter()
    # Seeds outermost, so that an interrupted run has covered every SNR.
    for seed in range(args.seeds):
        for snr in snrs:
            root = args.output / f"snr{snr:.3f}_seed{seed}"
            case = run_case(snr, seed, size, root, halves=round(snr, 6) in halves_snr)
            rows += [r for r in case if r["part"] == "halves" or snr in args.snr]
            write_csv(args.output / "filters.csv", rows)
    summary = summarise(rows)
    write_csv(args.output / "filters_summary.csv", summary)
    for part, title in (("full", "Full tomogram"), ("halves", "Refined from the halves")):
        if any(e["part"] == part for e in summary):
            print(f"\n{title} (CC with ground truth, mean ± sd over seeds)\n")
            print(markdown(summary, part))
    print(f"\ntotal {time.perf_counter() - started:.0f} s; results in {args.output}")
    if not math.isfinite(sum(e["cc"] for e in summary)):
        raise SystemExit("a CC is not finite")
    return summary


if __name__ == "__main__":
    main()
