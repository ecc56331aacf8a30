"""One model for tomograms of different tilt ranges: each its own wedge, or the common one.

Simulates ``--n`` tomograms (blob phantoms, SNR 1/4, 48 × 96 × 96, tilt ranges -60…60,
-50…65 and -55…55 in turn, 3° steps) and fits one DeepDeWedge model on all of them twice per
seed: with each sub-tomogram masked by its own tomogram's missing wedge (the default), and
with every sub-tomogram masked by the wedge all tomograms share (the widest one, as before).
Each fitted model refines every tomogram; the table gives the CC with the ground truth per
tilt range, mean over seeds (± spread), and the full tomograms' CC for reference.

Writes ``dataset_wedges.csv`` into ``--output`` (default ``benchmarks/dataset_wedges_results``).
About 5 minutes per seed and variant on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import torch

from deepdewedge import pipeline
from deepdewedge.config import step_config
from deepdewedge.evaluate.metrics import correlation_coefficient
from deepdewedge.io.mrc import read_volume, write_volume
from deepdewedge.pipeline.common import write_csv
from deepdewedge.simulate import simulate_tomogram

TILT_RANGES = [(-60.0, 60.0), (-50.0, 65.0), (-55.0, 55.0)]
FIT = {
    "unet_params_dict": {"chans": 8, "num_downsample_layers": 2},
    "adam_params_dict": {"lr": 1e-3},
    "batch_size": 8,
    "check_val_every_n_epochs": 5,
    "update_subtomo_missing_wedges_every_n_epochs": 10,
    "save_model_every_n_epochs": None,
}


def simulate(root: Path, n: int) -> list[dict]:
    tomograms = []
    for i in range(n):
        lo, hi = TILT_RANGES[i % len(TILT_RANGES)]
        sim = simulate_tomogram(
            (48, 96, 96),
            tilt_range_deg=(lo, hi),
            tilt_step_deg=3.0,
            snr=0.25,
            filter="hamming",
            full_filter="sirt",
            generator=torch.Generator().manual_seed(100 + i),
        )
        angles = sim["tilt_angles_deg"]
        files = {
            k: write_volume(root / f"TS_{i}_{k}.mrc", sim[k].numpy(), voxel_size=10.0)
            for k in ("ground_truth", "tomo0", "tomo1", "tomo_full")
        }
        tomograms.append({**files, "range": (float(angles.min()), float(angles.max()))})
    return tomograms


def run(root: Path, tomograms: list[dict], *, own: bool, seed: int, epochs: int) -> list[float]:
    """CC with the ground truth of each tomogram refined by one model fitted on all."""
    ranges = [t["range"] for t in tomograms]
    common = (max(r[0] for r in ranges), min(r[1] for r in ranges))
    shared = {"project_dir": root, "seed": seed, "subtomo_size": 32}
    halves = {
        "tomo0_files": [t["tomo0"] for t in tomograms],
        "tomo1_files": [t["tomo1"] for t in tomograms],
    }
    pipeline.prepare_data(
        step_config(
            "prepare_data",
            overrides={
                **shared,
                **halves,
                "tilt_ranges_deg": ranges if own else [common] * len(ranges),
                "subtomo_extraction_strides": [16, 32, 32],
                "val_fraction": 0.1,
                "overwrite": True,
            },
        )
    )
    fitted = pipeline.fit_model(
        step_config(
            "fit_model", overrides={**shared, **FIT, "num_epochs": epochs, "overwrite": True}
        )
    )
    refined = pipeline.refine_tomogram(
        step_config(
            "refine_tomogram",
            overrides={
                **shared,
                **halves,
                "model_checkpoint_file": fitted["checkpoint"],
                "subtomo_overlap": 8,
                "overwrite": True,
            },
        )
    )
    return [
        correlation_coefficient(read_volume(path)[0], read_volume(t["ground_truth"])[0])
        for path, t in zip(refined, tomograms, strict=True)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("benchmarks/dataset_wedges_results"))
    parser.add_argument("--n", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    root = args.output.resolve()
    if root.exists():
        shutil.rmtree(root)
    tomograms = simulate(root / "data", args.n)
    rows = []
    for seed in range(args.seeds):
        for own in (True, False):
            label = "own wedge" if own else "common wedge"
            ccs = run(root / f"{label.replace(' ', '_')}_{seed}", tomograms, own=own, seed=seed,
                      epochs=args.epochs)  # fmt: skip
            for t, cc in zip(tomograms, ccs, strict=True):
                rows.append({"seed": seed, "variant": label, "range": t["range"], "cc": cc})
            print(f"seed {seed}, {label}: " + ", ".join(f"{cc:.3f}" for cc in ccs), flush=True)
    write_csv(root / "dataset_wedges.csv", rows)
    fbp = {}
    for t in tomograms:
        cc = correlation_coefficient(
            read_volume(t["tomo_full"])[0], read_volume(t["ground_truth"])[0]
        )
        fbp.setdefault(t["range"], []).append(cc)
    print("\n| tilt range | full tomogram | own wedge | common wedge |\n|---|---|---|---|")
    for tilt_range in sorted(fbp, key=lambda r: r[1] - r[0], reverse=True):
        cells = []
        for label in ("own wedge", "common wedge"):
            # Mean over the tomograms of this range per seed, then over seeds.
            per_seed = [
                np.mean([r["cc"] for r in rows if r["seed"] == s and r["variant"] == label
                         and r["range"] == tilt_range])
                for s in range(args.seeds)
            ]  # fmt: skip
            cells.append(f"{np.mean(per_seed):.3f} ± {np.std(per_seed):.3f}")
        lo, hi = tilt_range
        print(f"| {lo:g}…{hi:g}° | {np.mean(fbp[tilt_range]):.3f} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
