"""A fit killed with SIGKILL at an arbitrary moment resumes to the same losses."""

import os
import signal
import subprocess
import sys
import time

import mrcfile
import numpy as np
import pytest

EPOCHS = 8


def _ddw(*args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return [sys.executable, "-m", "deepdewedge.cli", *map(str, args)], env


def _fit_args(project, *extra):
    return (
        "fit-model",
        "--project-dir",
        project,
        "--unet-params-dict",
        "{chans: 4, num_downsample_layers: 1}",
        "--num-epochs",
        EPOCHS,
        "--batch-size",
        2,
        "--update-subtomo-missing-wedges-every-n-epochs",
        3,
        "--check-val-every-n-epochs",
        2,
        "--interpolation",
        "linear",
        *extra,
    )


def _prepare(tmp_path, project):
    rng = np.random.default_rng(0)
    signal_ = rng.standard_normal((16, 24, 24)).astype(np.float32)
    for i in (0, 1):
        with mrcfile.new(tmp_path / f"t{i}.mrc", overwrite=True) as mrc:
            mrc.set_data(signal_ + rng.standard_normal(signal_.shape).astype(np.float32))
    cmd, env = _ddw(
        "prepare-data",
        "--project-dir",
        project,
        "--tomo0-files",
        tmp_path / "t0.mrc",
        "--tomo1-files",
        tmp_path / "t1.mrc",
        "--subtomo-size",
        8,
        "--val-fraction",
        0.2,
        "--subtomo-extraction-strides",
        4,
        "--subtomo-extraction-strides",
        8,
        "--subtomo-extraction-strides",
        8,
    )
    subprocess.run(cmd, env=env, check=True, capture_output=True)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _prepare(tmp_path, straight)
    _prepare(tmp_path, killed)
    cmd, env = _ddw(*_fit_args(straight))
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    expected = (straight / "logs/losses.csv").read_text()

    cmd, env = _ddw(*_fit_args(killed))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    csv = killed / "logs/losses.csv"
    deadline = time.monotonic() + 120
    # Kill while epochs are running: after at least 3 epochs are on disk, mid-way.
    while time.monotonic() < deadline and proc.poll() is None:
        if csv.exists() and len(csv.read_text().splitlines()) >= 4:
            time.sleep(0.05 * (os.getpid() % 7))  # an arbitrary moment inside an epoch
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the fit ended before it could be killed"
    cmd, env = _ddw(*_fit_args(killed, "--resume"))
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (killed / "logs/losses.csv").read_text() == expected
    assert not list((killed / "logs").rglob(".*.tmp"))  # no half-written file left behind
