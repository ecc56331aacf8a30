"""A tiny DeepDeWedge run on a simulated phantom beats the FBP on ground truth."""

import torch

from deepdewedge import fit_model, prepare_data, refine_tomogram
from deepdewedge.config import step_config
from deepdewedge.evaluate.metrics import correlation_coefficient
from deepdewedge.io.mrc import read_volume, write_volume
from deepdewedge.simulate import simulate_tomogram


def test_fit_beats_fbp_on_ground_truth(tmp_path):
    sim = simulate_tomogram(
        (32, 64, 64), snr=0.25, tilt_step_deg=3.0, generator=torch.Generator().manual_seed(1)
    )
    files = {k: write_volume(tmp_path / f"{k}.mrc", sim[k].numpy()) for k in ("tomo0", "tomo1")}
    shared = {"project_dir": tmp_path / "project", "subtomo_size": 16, "seed": 0}
    prepare_data(
        step_config(
            "prepare_data",
            overrides={
                **shared,
                "tomo0_files": [files["tomo0"]],
                "tomo1_files": [files["tomo1"]],
                "subtomo_extraction_strides": [8, 8, 8],
                "val_fraction": 0.0,
            },
        )
    )
    fit_model(
        step_config(
            "fit_model",
            overrides={
                **shared,
                "unet_params_dict": {"chans": 8, "num_downsample_layers": 2},
                "adam_params_dict": {"lr": 1e-3},
                "num_epochs": 8,
                "batch_size": 8,
                "update_subtomo_missing_wedges_every_n_epochs": 5,
            },
        )
    )
    (path,) = refine_tomogram(
        step_config(
            "refine_tomogram",
            overrides={
                **shared,
                "tomo0_files": [files["tomo0"]],
                "tomo1_files": [files["tomo1"]],
                "subtomo_overlap": 4,
            },
        )
    )
    refined, _ = read_volume(path)
    gt = sim["ground_truth"].numpy()
    cc_fbp = correlation_coefficient(sim["tomo_full"], gt)
    cc_ddw = correlation_coefficient(refined, gt)
    # Measured: FBP 0.39, DeepDeWedge ~0.6 with cubic rotations.
    assert cc_ddw > cc_fbp + 0.1, (cc_fbp, cc_ddw)
