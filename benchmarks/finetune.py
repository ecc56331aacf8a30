"""Fine-tuning: CC against epochs of a fit from scratch and of one started from another model.

Simulates two different samples (blob phantoms, SNR 1/4, the demo's size, seeds 0 and 1),
fits DeepDeWedge on sample B for ``--epochs`` epochs, then fits on sample A twice with the
same settings and seed: from scratch, and with ``init_from`` the model of sample B. Every
``--every`` epochs each fit's checkpoint refines sample A and is scored by its CC with the
ground truth; epoch 0 of the second fit is model B applied to sample A as it is.

Prints the table of CC against epochs and the first epoch at which the started fit reaches
the CC the fit from scratch has after all its epochs. Writes ``finetune.csv`` into
``--output`` (default ``benchmarks/finetune_results``). About 20 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from deepdewedge import pipeline
from deepdewedge.config import DEMO, step_config
from deepdewedge.evaluate.metrics import correlation_coefficient
from deepdewedge.io.mrc import read_volume, write_volume
from deepdewedge.pipeline.common import write_csv
from deepdewedge.simulate import simulate_tomogram


def sample(root: Path, seed: int) -> dict[str, Path]:
    sim = simulate_tomogram(
        DEMO["shape_zyx"],
        snr=DEMO["snr"],
        filter=DEMO["filter"],
        full_filter=DEMO["full_filter"],
        generator=torch.Generator().manual_seed(seed),
    )
    return {
        name: write_volume(root / f"{name}.mrc", sim[name].numpy(), voxel_size=DEMO["voxel_size"])
        for name in ("ground_truth", "tomo0", "tomo1")
    }


def fit(project: Path, data: dict[str, Path], epochs: int, every: int, init_from=None) -> Path:
    shared = {"project_dir": project, "seed": 0, "subtomo_size": DEMO["subtomo_size"]}
    pipeline.prepare_data(
        step_config(
            "prepare_data",
            overrides={
                **shared,
                "tomo0_files": [data["tomo0"]],
                "tomo1_files": [data["tomo1"]],
                "subtomo_extraction_strides": DEMO["strides"],
                "val_fraction": 0.1,
                "overwrite": True,
            },
        )
    )
    overrides = {
        **shared,
        "unet_params_dict": DEMO["unet"],
        "adam_params_dict": {"lr": DEMO["lr"]},
        "num_epochs": epochs,
        "batch_size": DEMO["batch_size"],
        "check_val_every_n_epochs": every,
        "save_model_every_n_epochs": every,
        "update_subtomo_missing_wedges_every_n_epochs": 10,
        "overwrite": True,
    }
    if init_from is not None:
        overrides["init_from"] = init_from
    result = pipeline.fit_model(step_config("fit_model", overrides=overrides))
    return result["checkpoint"].parent


def score(project: Path, data: dict[str, Path], checkpoint: Path, truth) -> float:
    (path,) = pipeline.refine_tomogram(
        step_config(
            "refine_tomogram",
            overrides={
                "project_dir": project,
                "tomo0_files": [data["tomo0"]],
                "tomo1_files": [data["tomo1"]],
                "model_checkpoint_file": checkpoint,
                "subtomo_overlap": 8,
                "overwrite": True,
            },
        )
    )
    return correlation_coefficient(read_volume(path)[0], truth)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("benchmarks/finetune_results"))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--every", type=int, default=3)
    args = parser.parse_args()
    root = args.output.resolve()
    if root.exists():
        shutil.rmtree(root)
    a, b = sample(root / "sample_a", 0), sample(root / "sample_b", 1)
    truth, _ = read_volume(a["ground_truth"])
    model_b = fit(root / "fit_b", b, args.epochs, args.epochs) / "latest.ckpt"
    curves: dict[str, dict[int, float]] = {"scratch": {}, "init_from": {}}
    curves["init_from"][0] = score(root / "fit_a_init", a, model_b, truth)
    for label, init in (("scratch", None), ("init_from", model_b)):
        project = root / f"fit_a_{label}"
        checkpoints = fit(project, a, args.epochs, args.every, init_from=init)
        for path in sorted(checkpoints.glob("epoch=*.ckpt")):
            epoch = int(path.stem.split("=")[1]) + 1
            curves[label][epoch] = score(project, a, path, truth)
    epochs = sorted(set(curves["scratch"]) | set(curves["init_from"]))
    rows = [
        {"epoch": e, "scratch": curves["scratch"].get(e), "init_from": curves["init_from"].get(e)}
        for e in epochs
    ]
    write_csv(root / "finetune.csv", rows)
    print("| epochs | CC from scratch | CC from the model of another sample |\n|---|---|---|")
    for row in rows:
        cells = [f"{row[k]:.3f}" if row[k] is not None else "" for k in ("scratch", "init_from")]
        print(f"| {row['epoch']} | {cells[0]} | {cells[1]} |")
    final = curves["scratch"][max(curves["scratch"])]
    reached = [e for e in sorted(curves["init_from"]) if curves["init_from"][e] >= final]
    if reached:
        print(
            f"\nfrom scratch: CC {final:.3f} after {max(curves['scratch'])} epochs; started from "
            f"the other sample's model: the same CC after {reached[0]} epochs "
            f"({max(curves['scratch']) / max(reached[0], 1):.1f}x fewer)"
        )
    else:
        print(f"\nstarted from the other sample's model, the fit never reached {final:.3f}")


if __name__ == "__main__":
    main()
