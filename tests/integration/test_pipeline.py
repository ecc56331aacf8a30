"""The three steps through the CLI, in-process, on tiny tomograms."""

import json

import mrcfile
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from deepdewedge import fit_model, prepare_data, refine_tomogram
from deepdewedge.cli import app
from deepdewedge.config import step_config
from deepdewedge.io.checkpoint import load_checkpoint

runner = CliRunner()
UNET = "{chans: 4, num_downsample_layers: 1}"


def _write(path, data, voxel_size=7.5):
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.asarray(data, dtype=np.float32))
        mrc.voxel_size = voxel_size
    return path


@pytest.fixture
def halves(tmp_path):
    rng = np.random.default_rng(0)
    signal = rng.standard_normal((20, 28, 24)).astype(np.float32)
    t0 = _write(tmp_path / "tomo0.mrc", signal + rng.standard_normal(signal.shape))
    t1 = _write(tmp_path / "tomo1.mrc", signal + rng.standard_normal(signal.shape))
    return t0, t1


def _invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def _prepare(tmp_path, halves, *extra):
    t0, t1 = halves
    return _invoke(
        "prepare-data",
        "--project-dir",
        tmp_path / "proj",
        "--tomo0-files",
        t0,
        "--tomo1-files",
        t1,
        "--subtomo-size",
        8,
        "--val-fraction",
        0.2,
        "--subtomo-extraction-strides",
        6,
        "--subtomo-extraction-strides",
        6,
        "--subtomo-extraction-strides",
        6,
        *extra,
    )


def _fit(tmp_path, epochs, *extra):
    return _invoke(
        "fit-model",
        "--project-dir",
        tmp_path / "proj",
        "--subtomo-size",
        8,
        "--unet-params-dict",
        UNET,
        "--num-epochs",
        epochs,
        "--batch-size",
        4,
        "--update-subtomo-missing-wedges-every-n-epochs",
        2,
        "--check-val-every-n-epochs",
        1,
        "--interpolation",
        "linear",
        *extra,
    )


def test_prepare_fit_refine_cli(tmp_path, halves):
    result = _prepare(tmp_path, halves)
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "proj/subtomos/metadata.json").read_text())
    assert meta["bank_size"] == 8 + 2 * 3  # ceil((√3 - 1) · 8 / 2) = 3
    fit0 = np.load(tmp_path / "proj/subtomos/fitting/subtomo0.npy")
    val0 = np.load(tmp_path / "proj/subtomos/val/subtomo0.npy")
    assert fit0.shape[1:] == (14, 14, 14) and len(val0) >= 1
    # Validation windows do not overlap fitting windows.
    starts = {s["split"]: [] for s in meta["subtomos"]}
    for s in meta["subtomos"]:
        starts[s["split"]].append(s["start_zyx"])
    for v in starts["val"]:
        for f in starts["fitting"]:
            assert any(abs(a - b) >= 8 for a, b in zip(v, f, strict=True))

    result = _fit(tmp_path, 3)
    assert result.exit_code == 0, result.output
    ckpts = tmp_path / "proj/logs/checkpoints"
    assert (ckpts / "latest.ckpt").exists() and list(ckpts.glob("best-val-*.ckpt"))
    lines = (tmp_path / "proj/logs/losses.csv").read_text().splitlines()
    assert lines[0] == "epoch,fitting_loss,val_loss" and len(lines) == 4
    assert (tmp_path / "proj/logs/loss_curve.png").stat().st_size > 5_000

    result = _invoke(
        "refine-tomogram",
        "--project-dir",
        tmp_path / "proj",
        "--tomo0-files",
        halves[0],
        "--tomo1-files",
        halves[1],
        "--subtomo-size",
        8,
        "--subtomo-overlap",
        4,
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "proj/refined_tomograms/tomo0+tomo1_refined.mrc"
    with mrcfile.open(out) as mrc:
        assert mrc.data.shape == (20, 28, 24)
        assert mrc.voxel_size.x == pytest.approx(7.5)
        assert np.isfinite(mrc.data).all()
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["deepdewedge_version"] and record["seconds"] > 0
    assert len(record["inputs"]) == 3 and all(
        len(v["sha256"]) == 64 for v in record["inputs"].values()
    )
    # The half-difference map: refined tomo0 minus refined tomo1, beside the average.
    with (
        mrcfile.open(tmp_path / "proj/refined_tomograms/tomo0+tomo1_halfdiff.mrc") as diff,
        mrcfile.open(out) as avg,
    ):
        assert diff.data.shape == avg.data.shape and np.abs(diff.data).max() > 0
    assert (tmp_path / "proj/refined_tomograms/tomo0+tomo1_qc.png").stat().st_size > 10_000
    again = _invoke(
        "refine-tomogram",
        "--project-dir",
        tmp_path / "proj",
        "--tomo0-files",
        halves[0],
        "--tomo1-files",
        halves[1],
    )
    assert again.exit_code == 1 and "--overwrite" in again.output


def test_resume_continues_to_the_same_losses(tmp_path, halves):
    assert _prepare(tmp_path, halves).exit_code == 0
    assert _fit(tmp_path, 5).exit_code == 0
    straight = (tmp_path / "proj/logs/losses.csv").read_text()
    assert _fit(tmp_path, 3, "--overwrite").exit_code == 0  # a fresh run, stopped early
    result = _fit(tmp_path, 5, "--resume")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "proj/logs/losses.csv").read_text() == straight


def test_noise2noise_mode_and_python_api(tmp_path, halves):
    t0, t1 = halves
    prep = step_config(
        "prepare_data",
        overrides={
            "project_dir": tmp_path / "p",
            "tomo0_files": [t0],
            "tomo1_files": [t1],
            "subtomo_size": 8,
            "val_fraction": 0.0,
        },
    )
    assert prepare_data(prep)["n_val"] == 0
    cfg = step_config(
        "fit_model",
        overrides={
            "project_dir": tmp_path / "p",
            "num_epochs": 2,
            "batch_size": 2,
            "unet_params_dict": {"chans": 4, "num_downsample_layers": 1},
            "rotate": False,
            "wedge_mask": False,
        },
    )
    result = fit_model(cfg)
    assert len(result["history"]) == 2 and result["best_checkpoint"].name == "latest.ckpt"
    state = load_checkpoint(result["checkpoint"])
    assert state["config"]["rotate"] is False and state["unet_params"]["chans"] == 4
    assert state["subtomo_size"] == 8  # inherited from the prepared sub-tomograms
    ref = step_config(
        "refine_tomogram",
        overrides={
            "project_dir": tmp_path / "p",
            "tomo_files": [t0],
            "subtomo_overlap": 2,
        },
    )
    (path,) = refine_tomogram(ref)
    assert path.name == "tomo0_refined.mrc"


def _published_config(tmp_path, halves):
    """A config with every key of the published tutorial's layout."""
    t0, t1 = halves
    return {
        "shared": {
            "project_dir": str(tmp_path / "proj"),
            "tomo0_files": [str(t0)],
            "tomo1_files": [str(t1)],
            "subtomo_size": 8,
            "mw_angle": 60,
            "num_workers": 4,
            "gpu": None,
            "seed": 3,
        },
        "prepare_data": {
            "subtomo_extraction_strides": [6, 6, 6],
            "val_fraction": 0.2,
            "min_nonzero_mask_fraction_in_subtomo": 0.3,
            "pad_before_subtomo_extraction": False,
            "extract_larger_subtomos_for_rotating": True,
            "verbose": True,
        },
        "fit_model": {
            "unet_params_dict": {"chans": 4, "num_downsample_layers": 1, "drop_prob": 0.0},
            "adam_params_dict": {"lr": 4e-4},
            "num_epochs": 3,
            "batch_size": 4,
            "update_subtomo_missing_wedges_every_n_epochs": 1,
            "check_val_every_n_epochs": 1,
            "save_n_models_with_lowest_val_loss": 2,
            "save_model_every_n_epochs": 1,
            "save_n_models_with_lowest_fitting_loss": 1,
            "logger": "tensorboard",
            "resume_from_checkpoint": None,
        },
        "refine_tomogram": {
            "model_checkpoint_file": "./tutorial_data/fitted_model.ckpt",
            "subtomo_overlap": 2,
            "batch_size": 3,
            "return_tomos": False,
        },
    }


def test_run_with_published_config_layout(tmp_path, halves):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(_published_config(tmp_path, halves)))
    result = _invoke("run", "--config", path)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "proj/refined_tomograms/tomo0+tomo1_refined.mrc").exists()
    ckpts = tmp_path / "proj/logs/checkpoints"
    assert len(list(ckpts.glob("epoch=*.ckpt"))) == 3
    assert len(list(ckpts.glob("best-fit-*.ckpt"))) == 1
    assert len(list(ckpts.glob("best-val-*.ckpt"))) == 2
    # One input-bank state on disk, whatever the number of checkpoints and updates.
    assert [p.name for p in ckpts.glob("input_bank_*")] == ["input_bank_e00002.npy"]


def test_resume_refuses_banks_prepared_again(tmp_path, halves):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(_published_config(tmp_path, halves)))
    assert _invoke("run", "--config", path).exit_code == 0
    assert _invoke("prepare-data", "--config", path, "--overwrite").exit_code == 0
    result = _invoke("fit-model", "--config", path, "--resume", "--num-epochs", 5)
    assert result.exit_code == 1 and "prepared again" in result.output


def test_overwrite_keeps_the_old_fit_when_the_new_one_cannot_start(tmp_path, halves):
    assert _prepare(tmp_path, halves).exit_code == 0
    assert _fit(tmp_path, 1).exit_code == 0
    result = _fit(tmp_path, 1, "--overwrite", "--gpu", 7)
    assert result.exit_code == 1 and "gpu 7" in result.output
    assert (tmp_path / "proj/logs/checkpoints/latest.ckpt").exists()


def test_command_line_dict_options_merge_with_the_file(tmp_path, halves):
    config = step_config(
        "fit_model",
        config_file=_write_yaml(tmp_path, _published_config(tmp_path, halves)),
        overrides={"unet_params_dict": {"chans": 6}},
    )
    assert config.unet_params_dict.chans == 6
    assert config.unet_params_dict.num_downsample_layers == 1  # kept from the file


def _write_yaml(tmp_path, content):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


@pytest.mark.parametrize(
    ("section", "content", "message"),
    [
        ("fit_model", {"num_epoch": 3}, "unknown key 'fit_model.num_epoch'"),
        ("fit_model", {"batch_size": "five"}, "batch_size"),
        ("banana", {}, "unknown section 'banana'"),
        ("fit_model", {"unet_params_dict": {"chans": 4, "depth": 2}}, "depth"),
    ],
)
def test_invalid_config_fails_with_one_line(tmp_path, section, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"shared": {"project_dir": str(tmp_path)}, section: content}))
    result = _invoke("fit-model", "--config", path)
    assert result.exit_code == 1
    err = result.output.strip().splitlines()
    assert len(err) == 1 and message in err[0] and str(path) in err[0]


def test_mismatched_halves_and_oversized_subtomo(tmp_path, halves):
    bad = _write(tmp_path / "small.mrc", np.zeros((20, 28, 20)))
    result = _invoke(
        "prepare-data",
        "--project-dir",
        tmp_path / "p",
        "--tomo0-files",
        halves[0],
        "--tomo1-files",
        bad,
        "--subtomo-size",
        8,
    )
    assert result.exit_code == 1 and "small.mrc" in result.output and "shape" in result.output
    result = _invoke(
        "prepare-data",
        "--project-dir",
        tmp_path / "p",
        "--tomo0-files",
        halves[0],
        "--tomo1-files",
        halves[1],
        "--subtomo-size",
        32,
    )
    assert result.exit_code == 1 and "smaller than subtomo_size" in result.output


def test_refuses_to_overwrite_prepared_data(tmp_path, halves):
    assert _prepare(tmp_path, halves).exit_code == 0
    result = _prepare(tmp_path, halves)
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert _prepare(tmp_path, halves, "--overwrite").exit_code == 0


def test_seed_makes_fit_reproducible(tmp_path, halves):
    assert _prepare(tmp_path, halves).exit_code == 0
    assert _fit(tmp_path, 2).exit_code == 0
    first = (tmp_path / "proj/logs/losses.csv").read_text()
    assert _fit(tmp_path, 2, "--overwrite").exit_code == 0
    assert (tmp_path / "proj/logs/losses.csv").read_text() == first
    # The input normalisation is that of the model inputs: the extra wedge and the
    # interpolation of these white-noise halves remove power, so the spread is below the raw.
    scale = load_checkpoint(tmp_path / "proj/logs/checkpoints/latest.ckpt")["model_state"][
        "input_scale"
    ].item()
    raw = np.load(tmp_path / "proj/subtomos/fitting/subtomo0.npy")[:, 3:11, 3:11, 3:11].std()
    assert 0.2 * raw < scale < 0.95 * raw


def test_refuses_to_discard_an_existing_fit(tmp_path, halves):
    assert _prepare(tmp_path, halves).exit_code == 0
    assert _fit(tmp_path, 1).exit_code == 0
    before = (tmp_path / "proj/logs/checkpoints/latest.ckpt").read_bytes()
    result = _fit(tmp_path, 1)
    assert result.exit_code == 1 and "--resume" in result.output and "--overwrite" in result.output
    assert (tmp_path / "proj/logs/checkpoints/latest.ckpt").read_bytes() == before


def test_standardize_full_tomos(tmp_path, halves):
    assert _prepare(tmp_path, halves, "--standardize-full-tomos").exit_code == 0
    bank = np.load(tmp_path / "proj/subtomos/fitting/subtomo1.npy")[:, 3:11, 3:11, 3:11]
    assert abs(bank.mean()) < 0.1 and bank.std() == pytest.approx(1.0, abs=0.1)


def test_refine_rejects_mismatched_halves(tmp_path, halves):
    assert _prepare(tmp_path, halves).exit_code == 0
    assert _fit(tmp_path, 1).exit_code == 0
    bad = _write(tmp_path / "small.mrc", np.zeros((20, 28, 20)))
    result = _invoke(
        "refine-tomogram",
        "--project-dir",
        tmp_path / "proj",
        "--tomo0-files",
        halves[0],
        "--tomo1-files",
        bad,
    )
    assert result.exit_code == 1 and "small.mrc" in result.output.splitlines()[-1]
    assert not (tmp_path / "proj/refined_tomograms").exists()
