"""``ddw reconstruct --holdout`` and ``ddw score-heldout``: a score without ground truth."""

import json

import mrcfile
import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from deepdewedge.cli import app
from deepdewedge.io.mrc import InputError
from deepdewedge.pipeline.heldout import score_heldout
from deepdewedge.simulate import add_noise, project, simulate_phantom
from tests.messages import assert_one_line

runner = CliRunner()
ANGLES = np.arange(-60.0, 60.1, 3.0)


def _write(path, data):
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.asarray(data, dtype=np.float32))
        mrc.voxel_size = 10.0
    return path


@pytest.fixture(scope="module")
def reconstructed(tmp_path_factory):
    root = tmp_path_factory.mktemp("heldout")
    gt = simulate_phantom((24, 40, 64), generator=torch.Generator().manual_seed(3))
    ts = add_noise(
        project(gt, torch.from_numpy(ANGLES)), snr=0.5, generator=torch.Generator().manual_seed(0)
    )
    (root / "ts.tlt").write_text("\n".join(f"{a:.2f}" for a in ANGLES) + "\n")
    args = ["reconstruct", "--tilt-series", _write(root / "ts.mrc", ts)]
    args += ["--tilt-angles", root / "ts.tlt", "--thickness", 24, "--output-dir", root / "out"]
    result = runner.invoke(app, [str(a) for a in [*args, "--holdout", "every:4"]])
    assert result.exit_code == 0, result.output
    _write(root / "truth.mrc", gt)
    _write(root / "noise.mrc", torch.randn(gt.shape, generator=torch.Generator().manual_seed(1)))
    return root


def test_held_out_views_are_left_out_and_written(reconstructed):
    out = reconstructed / "out"
    record = json.loads((out / "ts_reconstruct.json").read_text())
    held = record["heldout"]
    assert held["scheme"] == "every:4" and len(held["views"]) == 10
    assert held["tilt_angles_deg"] == pytest.approx(ANGLES[np.array(held["views"]) - 1])
    assert record["n_tilts_used"] == 31
    in_halves = set(record["views"]["tomo0"]) | set(record["views"]["tomo1"])
    assert len(in_halves) == 31 and not in_halves & set(held["views"])
    with mrcfile.open(out / "ts_heldout.mrc") as mrc:
        assert mrc.data.shape == (10, 40, 64)


def test_score_ranks_the_truth_above_the_reconstruction_above_noise(reconstructed):
    out = reconstructed / "out"
    volumes = [reconstructed / "truth.mrc", out / "ts_full.mrc", reconstructed / "noise.mrc"]
    rows = score_heldout(
        out / "ts_reconstruct.json",
        volumes,
        labels=["truth", "full", "noise"],
        csv_path=reconstructed / "score.csv",
        figure_path=reconstructed / "score.png",
    )
    cc = {row["label"]: row["mean_cc"] for row in rows}
    assert cc["truth"] > cc["full"] > cc["noise"] + 0.1
    assert (reconstructed / "score.png").stat().st_size > 0
    assert len((reconstructed / "score.csv").read_text().splitlines()) == 1 + 3 * 10


def test_command_line(reconstructed):
    out = reconstructed / "out"
    result = runner.invoke(
        app,
        ["score-heldout", "--record", str(out / "ts_reconstruct.json")]
        + ["--volume", str(out / "ts_full.mrc"), "--label", "FBP"],
    )
    assert result.exit_code == 0, result.output
    assert "| FBP |" in result.output
    assert (out / "ts_heldout_score.csv").exists() and (out / "ts_heldout_score.png").exists()


def test_run_scores_the_full_and_the_refined_tomogram(reconstructed, tmp_path):
    config = {
        "shared": {"project_dir": str(tmp_path / "proj"), "subtomo_size": 16, "seed": 0},
        "reconstruct": {
            "tilt_series": str(reconstructed / "ts.mrc"),
            "tilt_angles": str(reconstructed / "ts.tlt"),
            "thickness": 24,
            "holdout": "highest:4",
        },
        "prepare_data": {"subtomo_extraction_strides": [8, 12, 16], "val_fraction": 0.0},
        "fit_model": {
            "unet_params_dict": {"chans": 4, "num_downsample_layers": 2},
            "num_epochs": 1,
            "batch_size": 4,
        },
        "refine_tomogram": {"subtomo_overlap": 4},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["run", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert "| full |" in result.output and "| refined |" in result.output
    lines = (tmp_path / "proj/refined_tomograms/ts_heldout_score.csv").read_text().splitlines()
    assert len(lines) == 1 + 2 * 4
    # The most tilted views were held out, so the wedge fitted for is that of -54..54°.
    meta = json.loads((tmp_path / "proj/subtomos/metadata.json").read_text())
    assert meta["tilt_range_deg"] == pytest.approx([-54.0, 54.0])


def test_a_record_without_held_out_views_is_one_line(reconstructed, tmp_path):
    record = tmp_path / "ts_reconstruct.json"
    record.write_text(json.dumps({"heldout": None}))
    with pytest.raises(InputError) as err:
        score_heldout(record, [reconstructed / "truth.mrc"])
    assert "--holdout" in assert_one_line(err, record)


def test_a_volume_of_another_reconstruction_is_one_line(reconstructed, tmp_path):
    other = _write(tmp_path / "other.mrc", np.zeros((24, 40, 48)))
    with pytest.raises(InputError) as err:
        score_heldout(reconstructed / "out/ts_reconstruct.json", [other])
    assert_one_line(err, other)
