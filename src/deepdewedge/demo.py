"""Built-in demo: simulate a tomogram with ground truth and run the whole pipeline on it."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepdewedge import pipeline
from deepdewedge.config import DEMO, step_config
from deepdewedge.evaluate.figures import orthoslice_figure
from deepdewedge.evaluate.metrics import correlation_coefficient
from deepdewedge.io.mrc import read_volume, write_volume
from deepdewedge.simulate import simulate_tomogram

# Small enough for a few minutes on two CPU cores, large enough to show the method.


def run_demo(
    output_dir: Path,
    *,
    seed: int = 0,
    num_epochs: int | None = None,
    echo: Callable[[str], Any] = print,
) -> dict[str, float]:
    """Simulate, reconstruct, fit noise2noise-only and DeepDeWedge, refine, and compare.

    DeepDeWedge is refined from its last epoch, as in the paper (a fixed number of epochs; it
    does not overfit). noise2noise-only fitting overfits to the noise, so, as for cryoCARE in
    the paper's section 2.2.3, it is refined from its checkpoint of lowest validation loss
    (early stopping).

    Writes the simulated volumes, both projects, the refined tomograms and
    ``demo_orthoslices.png`` under `output_dir`, and returns the correlation coefficient of
    each reconstruction with the ground truth.
    """
    output_dir = Path(output_dir)
    epochs = num_epochs or DEMO["num_epochs"]
    t_start = time.perf_counter()
    echo(
        f"simulating a {DEMO['shape_zyx']} tomogram, tilts ±60°, SNR {DEMO['snr']}; filters: "
        f"{DEMO['filter']} (halves), {DEMO['full_filter']} (full tomogram, FBP)"
    )
    sim = simulate_tomogram(
        DEMO["shape_zyx"],
        snr=DEMO["snr"],
        filter=DEMO["filter"],
        full_filter=DEMO["full_filter"],
        generator=torch.Generator().manual_seed(seed),
    )
    data = output_dir / "data"
    files = {}
    for name in ("ground_truth", "tomo0", "tomo1", "tomo_full"):
        files[name] = write_volume(
            data / f"{name}.mrc", sim[name].numpy(), voxel_size=DEMO["voxel_size"]
        )
    timings = {"simulate": time.perf_counter() - t_start}

    results: dict[str, np.ndarray] = {}
    for method, switches, checkpoint in (
        ("noise2noise", {"rotate": False, "wedge_mask": False}, "best_checkpoint"),
        ("deepdewedge", {}, "checkpoint"),
    ):
        t0 = time.perf_counter()
        project = output_dir / method
        shared = {"project_dir": project, "seed": seed, "subtomo_size": DEMO["subtomo_size"]}
        pipeline.prepare_data(
            step_config(
                "prepare_data",
                overrides={
                    **shared,
                    "tomo0_files": [files["tomo0"]],
                    "tomo1_files": [files["tomo1"]],
                    "subtomo_extraction_strides": DEMO["strides"],
                    "val_fraction": 0.1,
                    "overwrite": True,
                },
            )
        )
        echo(f"fitting {method} for {epochs} epochs")
        fitted = pipeline.fit_model(
            step_config(
                "fit_model",
                overrides={
                    **shared,
                    "unet_params_dict": DEMO["unet"],
                    "adam_params_dict": {"lr": DEMO["lr"]},
                    "num_epochs": epochs,
                    "batch_size": DEMO["batch_size"],
                    "check_val_every_n_epochs": 1,
                    "save_model_every_n_epochs": None,
                    "update_subtomo_missing_wedges_every_n_epochs": 10,
                    "overwrite": True,
                    **switches,
                },
            )
        )
        (path,) = pipeline.refine_tomogram(
            step_config(
                "refine_tomogram",
                overrides={
                    **shared,
                    "tomo0_files": [files["tomo0"]],
                    "tomo1_files": [files["tomo1"]],
                    "model_checkpoint_file": fitted[checkpoint],
                    "subtomo_overlap": 8,
                    "overwrite": True,
                },
            )
        )
        results[method], _ = read_volume(path)
        timings[method] = time.perf_counter() - t0

    gt = sim["ground_truth"].numpy()
    volumes = {
        "ground truth": gt,
        "FBP": sim["tomo_full"].numpy(),
        "noise2noise-only": results["noise2noise"],
        "DeepDeWedge": results["deepdewedge"],
    }
    scores = {
        name: correlation_coefficient(vol, gt)
        for name, vol in volumes.items()
        if name != "ground truth"
    }
    figure = orthoslice_figure(volumes)
    figure.savefig(output_dir / "demo_orthoslices.png", dpi=100)
    echo("")
    echo("| reconstruction    | CC with ground truth |")
    echo("|-------------------|----------------------|")
    for name, cc in scores.items():
        echo(f"| {name:<17} | {cc:20.4f} |")
    echo("")
    echo(
        f"timings: simulate {timings['simulate']:.0f} s, noise2noise "
        f"{timings['noise2noise']:.0f} s, DeepDeWedge {timings['deepdewedge']:.0f} s, total "
        f"{time.perf_counter() - t_start:.0f} s"
    )
    echo(f"refined tomogram: {output_dir / 'deepdewedge' / 'refined_tomograms'}")
    echo(f"figure: {output_dir / 'demo_orthoslices.png'}")
    return scores
