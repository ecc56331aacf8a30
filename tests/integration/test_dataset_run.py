"""A whole dataset in one command: one fit, every tomogram refined, resumable, shardable."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import mrcfile
import numpy as np
import pytest
from typer.testing import CliRunner

from deepdewedge.cli import app
from deepdewedge.config import DatasetConfig
from deepdewedge.pipeline.dataset import DatasetCallbacks, run_dataset
from deepdewedge.pipeline.dataset_state import read_state, state_dir

SHAPE = (16, 24, 24)
CONFIG = """
prepare_data:
  subtomo_size: 8
  subtomo_extraction_strides: [8, 8, 8]
  val_fraction: 0.2
fit_model:
  unet_params_dict: {chans: 4, num_downsample_layers: 1}
  num_epochs: 2
  batch_size: 4
  interpolation: linear
  update_subtomo_missing_wedges_every_n_epochs: 1
  check_val_every_n_epochs: 1
refine_tomogram:
  batch_size: 4
"""


def _write(path, volume):
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(volume.astype(np.float32))
        mrc.voxel_size = 10.0


def _add_tomogram(folder, name, seed):
    rng = np.random.default_rng(seed)
    signal_ = rng.standard_normal(SHAPE)
    for half in (0, 1):
        _write(folder / f"{name}_tomo{half}.mrc", signal_ + 0.5 * rng.standard_normal(SHAPE))


@pytest.fixture
def dataset(tmp_path):
    folder = tmp_path / "halves"
    folder.mkdir()
    for i in range(4):
        _add_tomogram(folder, f"TS_{i:02d}", i)
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    return folder, config, tmp_path / "project"


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _refined_times(project):
    return {
        p.name: p.stat().st_mtime_ns for p in (project / "refined_tomograms").glob("*_refined.mrc")
    }


def test_fits_once_refines_all_and_resumes_without_redoing(dataset):
    folder, config, project = dataset
    # A truncated half: reported, and the others finish.
    broken = folder / "TS_02_tomo1.mrc"
    broken.write_bytes(broken.read_bytes()[:2000])
    result = _run("run", "--config", config, "--dataset", folder, "--project-dir", project)
    assert result.exit_code == 1, result.output
    assert "failed: TS_02:" in result.output and "TS_02_tomo1.mrc" in result.output
    state = read_state(project)
    statuses = {name: r["status"] for name, r in state["tomograms"].items()}
    assert statuses == {
        "TS_00": "refined",
        "TS_01": "refined",
        "TS_02": "failed",
        "TS_03": "refined",
    }
    assert state["fit"]["status"] == "done" and "TS_02" not in state["fit"]["fit_on"]
    with open(project / "tomograms.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["status"] for r in rows] == ["refined", "refined", "failed", "refined"]
    assert "TS_02_tomo1.mrc" in rows[2]["error"]
    report = (project / "report.html").read_text()
    assert all(f"TS_0{i}" in report for i in range(4))
    refined = project / "refined_tomograms" / "TS_00_refined.mrc"
    with mrcfile.open(refined, permissive=True) as mrc:
        assert mrc.data.shape == SHAPE and float(mrc.voxel_size.x) == pytest.approx(10.0)
    before = _refined_times(project)
    checkpoint = state["fit"]["checkpoint"]

    # The broken tomogram is fixed and a new one appears: only those two are refined, with
    # the same model; nothing finished is touched.
    _add_tomogram(folder, "TS_02", 2)
    _add_tomogram(folder, "TS_04", 4)
    result = _run("run", "--config", config, "--dataset", folder, "--project-dir", project)
    assert result.exit_code == 0, result.output
    assert "5 tomograms: 5 refined (3 before this run), 0 failed" in result.output
    after = _refined_times(project)
    assert {k: after[k] for k in before} == before
    assert set(after) == {f"TS_0{i}_refined.mrc" for i in range(5)}
    assert read_state(project)["fit"]["checkpoint"] == checkpoint


def test_a_run_stopped_while_refining_continues_where_it_stopped(dataset, monkeypatch):
    folder, config, project = dataset
    monkeypatch.setattr("deepdewedge.pipeline.dataset.REPORT_EVERY_S", 0.0)
    seen = []

    def stop_after_two(name, record):
        seen.append((name, record["status"]))
        if sum(status == "refined" for _, status in seen) == 2:
            raise KeyboardInterrupt

    settings = DatasetConfig(path=str(folder), project_dir=project)
    with pytest.raises(KeyboardInterrupt):
        run_dataset(
            settings, config_file=config, callbacks=DatasetCallbacks(tomogram=stop_after_two)
        )
    before = _refined_times(project)
    assert len(before) == 2
    # The table followed the run up to the stop.
    with open(project / "tomograms.csv") as handle:
        assert [r["status"] for r in csv.DictReader(handle)] == [
            "refined",
            "pending",
            "pending",
            "pending",
        ]
    summary = run_dataset(settings, config_file=config)
    assert sorted(summary.skipped) == ["TS_00", "TS_01"]
    assert sorted(summary.refined) == ["TS_02", "TS_03"]
    assert {k: v for k, v in _refined_times(project).items() if k in before} == before


def test_a_killed_dataset_run_resumes(dataset):
    folder, config, project = dataset
    command = [sys.executable, "-m", "deepdewedge.cli", "run", "--config", str(config)]
    command += ["--dataset", str(folder), "--project-dir", str(project)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    state = state_dir(project) / "state.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if state.exists() and '"refined"' in state.read_text():
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = {
        n for n, r in read_state(project)["tomograms"].items() if r["status"] == "refined"
    }
    before = _refined_times(project)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    records = read_state(project)["tomograms"]
    assert all(r["status"] == "refined" for r in records.values()) and len(records) == 4
    after = _refined_times(project)
    assert {f"{n}_refined.mrc" for n in done_before} <= set(before)
    assert all(after[f"{n}_refined.mrc"] == before[f"{n}_refined.mrc"] for n in done_before)


def test_two_shards_refine_every_tomogram_exactly_once(dataset):
    folder, config, project = dataset
    result = _run(
        "run",
        "--config",
        config,
        "--dataset",
        folder,
        "--project-dir",
        project,
        "--stop-after",
        "fit",
    )
    assert result.exit_code == 0, result.output
    assert not (project / "refined_tomograms").exists()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    shards = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "deepdewedge.cli",
                "refine-tomogram",
                "--config",
                str(config),
                "--dataset",
                str(folder),
                "--project-dir",
                str(project),
            ],
            env={
                **env,
                "SLURM_ARRAY_TASK_ID": str(k),
                "SLURM_ARRAY_TASK_MIN": "1",
                "SLURM_ARRAY_TASK_COUNT": "2",
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for k in (1, 2)
    ]
    for shard in shards:
        output, _ = shard.communicate(timeout=300)
        assert shard.returncode == 0, output
    files = sorted(state_dir(project).glob("state*.json"))
    assert [f.name for f in files] == [
        "state.json",
        "state.shard-1-of-2.json",
        "state.shard-2-of-2.json",
    ]
    per_shard = [json.loads(f.read_text())["tomograms"] for f in files[1:]]
    assert set(per_shard[0]) == {"TS_00", "TS_02"} and set(per_shard[1]) == {"TS_01", "TS_03"}
    assert all(r["status"] == "refined" for records in per_shard for r in records.values())
    assert not (project / "report.html").exists()  # shards write no shared file
    # A run over the whole dataset merges: nothing is refined again.
    before = _refined_times(project)
    result = _run(
        "refine-tomogram", "--config", config, "--dataset", folder, "--project-dir", project
    )
    assert result.exit_code == 0, result.output
    assert "4 tomograms: 4 refined (4 before this run), 0 failed" in result.output
    assert _refined_times(project) == before
    assert (project / "report.html").exists()


def test_a_shard_without_a_fitted_model_says_what_to_run(dataset):
    folder, config, project = dataset
    result = _run(
        "run", "--config", config, "--dataset", folder, "--project-dir", project, "--shard", "1/2"
    )
    assert result.exit_code == 1
    assert "--stop-after fit" in result.output and len(result.output.strip().splitlines()) == 1


def test_a_relion5_project_gets_a_tomograms_star_of_refined_maps(tmp_path):
    project_root = tmp_path / "relion"
    job = project_root / "Tomograms" / "job010"
    rows = []
    for i, name in enumerate(["TS_1", "TS_2"]):
        rng = np.random.default_rng(i)
        signal_ = rng.standard_normal(SHAPE)
        for label in ("half1", "half2"):
            (job / "tomograms").mkdir(parents=True, exist_ok=True)
            _write(
                job / "tomograms" / f"rec_{name}_{label}.mrc", signal_ + rng.standard_normal(SHAPE)
            )
        series = job / "tilt_series" / f"{name}.star"
        series.parent.mkdir(exist_ok=True)
        series.write_text(
            f"data_{name}\n\nloop_\n_rlnTomoNominalStageTiltAngle #1\n_rlnTomoYTilt #2\n"
            + "".join(f"{a} {a + 0.5}\n" for a in range(-51, 64, 3))
        )
        rows.append(
            f"{name} 4.000 Tomograms/job010/tilt_series/{name}.star "
            f"Tomograms/job010/tomograms/rec_{name}_half1.mrc "
            f"Tomograms/job010/tomograms/rec_{name}_half2.mrc\n"
        )
    star = job / "tomograms.star"
    star.write_text(
        "\n# version 50001\n\ndata_global\n\nloop_\n_rlnTomoName #1\n_rlnTomoTomogramBinning #2\n"
        "_rlnTomoTiltSeriesStarFile #3\n_rlnTomoReconstructedTomogramHalf1 #4\n"
        "_rlnTomoReconstructedTomogramHalf2 #5\n" + "".join(rows)
    )
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    project = tmp_path / "project"
    result = _run("run", "--config", config, "--dataset", star, "--project-dir", project)
    assert result.exit_code == 0, result.output
    meta = json.loads((project / "subtomos" / "metadata.json").read_text())
    assert meta["tilt_range_deg"] == pytest.approx([-50.5, 63.5])
    assert meta["config"]["standardize_full_tomos"] is True
    copy = (project / "tomograms.star").read_text()
    for name in ("TS_1", "TS_2"):
        refined = project / "refined_tomograms" / f"{name}_refined.mrc"
        assert refined.exists() and str(refined) in copy
    assert copy.count("rec_TS_1_half1.mrc") == 1  # every other column kept


def test_the_file_lists_of_a_published_config_are_a_dataset(dataset):
    folder, config, project = dataset
    config.write_text(
        CONFIG
        + "dataset:\n  fit_on: 1\nshared:\n"
        + f"  tomo0_files: [{folder}/TS_00_tomo0.mrc, {folder}/TS_01_tomo0.mrc]\n"
        + f"  tomo1_files: [{folder}/TS_00_tomo1.mrc, {folder}/TS_01_tomo1.mrc]\n"
    )
    result = _run("run", "--config", config, "--project-dir", project)
    assert result.exit_code == 0, result.output
    state = read_state(project)
    assert state["fit"]["fit_on"] == ["TS_00"]
    assert {n: r["status"] for n, r in state["tomograms"].items()} == {
        "TS_00": "refined",
        "TS_01": "refined",
    }


def test_halves_of_different_voxel_size_or_shape_fail_that_tomogram_only(dataset):
    from deepdewedge.io.dataset import read_dataset
    from deepdewedge.pipeline.dataset import _checked

    folder, _, _ = dataset
    with mrcfile.open(folder / "TS_01_tomo1.mrc", mode="r+") as mrc:
        mrc.voxel_size = 5.0
    _write(folder / "TS_03_tomo1.mrc", np.zeros((16, 24, 20)))
    errors = {e.name: _checked(e).error for e in read_dataset(folder)}
    assert errors["TS_00"] is None and errors["TS_02"] is None
    assert "TS_01_tomo1.mrc: voxel size 5.000 Å differs from" in errors["TS_01"]
    assert "TS_03_tomo1.mrc: shape (16, 24, 20) differs from" in errors["TS_03"]


def test_a_folder_of_tilt_series_is_reconstructed_once_then_refined(tmp_path):
    import torch

    from deepdewedge.simulate import project, simulate_phantom

    folder = tmp_path / "tilt_series"
    folder.mkdir()
    angles = np.arange(-51.0, 61.0, 3.0)  # asymmetric: -51 .. 60
    rng = np.random.default_rng(0)
    for i in range(2):
        phantom = simulate_phantom((16, 32, 32), generator=torch.Generator().manual_seed(i))
        views = project(phantom, torch.from_numpy(angles)).numpy()
        _write(folder / f"TS_{i}.mrc", views + 0.3 * views.std() * rng.standard_normal(views.shape))
        (folder / f"TS_{i}.tlt").write_text("".join(f"{a:.2f}\n" for a in angles))
    config = tmp_path / "config.yaml"
    project_dir = tmp_path / "project"
    config.write_text(CONFIG)
    result = _run("run", "--config", config, "--dataset", folder, "--project-dir", project_dir)
    assert result.exit_code == 1
    assert "config.yaml: reconstruct: missing required key 'thickness'" in result.output
    config.write_text(
        CONFIG + "reconstruct:\n  thickness: 16\n  dose_filter: false\n  erase_gold: false\n"
    )
    result = _run("run", "--config", config, "--dataset", folder, "--project-dir", project_dir)
    assert result.exit_code == 0, result.output
    assert "reconstructing TS_0 (1 of 2)" in result.output
    tomograms = project_dir / "tomograms"
    records = {p: p.stat().st_mtime_ns for p in tomograms.glob("*_reconstruct.json")}
    assert len(records) == 2
    state = read_state(project_dir)
    assert state["tomograms"]["TS_1"]["tilt_range_deg"] == pytest.approx([-51.0, 60.0])
    assert all(r["status"] == "refined" for r in state["tomograms"].values())
    result = _run("run", "--config", config, "--dataset", folder, "--project-dir", project_dir)
    assert result.exit_code == 0 and "(2 before this run)" in result.output
    assert {p: p.stat().st_mtime_ns for p in tomograms.glob("*_reconstruct.json")} == records


def test_an_unexpected_error_in_one_tomogram_is_one_line_and_a_traceback_file(dataset, monkeypatch):
    import deepdewedge.pipeline.refining as refining

    folder, config, project = dataset
    original = refining.refine_tomogram

    def flaky(config, *, progress=None, names=None):
        if names == ["TS_01"]:
            raise RuntimeError("CUDA error: an illegal memory access\nwas encountered")
        return original(config, progress=progress, names=names)

    monkeypatch.setattr(refining, "refine_tomogram", flaky)
    settings = DatasetConfig(path=str(folder), project_dir=project)
    summary = run_dataset(settings, config_file=config)
    assert sorted(summary.refined) == ["TS_00", "TS_02", "TS_03"]
    reason = summary.failed["TS_01"]
    assert "\n" not in reason and "RuntimeError: CUDA error: an illegal memory access was" in reason
    details = state_dir(project) / "errors" / "TS_01.txt"
    assert str(details) in reason and "Traceback" in details.read_text()
