"""`ddw simulate`: files written as real data, ground truth that `ddw reconstruct` lines up with."""

import csv
import json

import mrcfile
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from deepdewedge import __version__
from deepdewedge.cli import app
from deepdewedge.evaluate.metrics import correlation_coefficient
from deepdewedge.io.tilts import read_mdoc, read_tilt_angles
from deepdewedge.rotation import rotate_and_crop
from deepdewedge.simulate import euler_zyz_to_matrix, load_templates

runner = CliRunner()
HEADER = [
    "particle",
    "template",
    "z_px",
    "y_px",
    "x_px",
    "phi_deg",
    "theta_deg",
    "psi_deg",
    "box_px",
]
SMALL = (
    "--thickness-px",
    32,
    "--height-px",
    48,
    "--width-px",
    48,
    "--voxel-size-angstrom",
    20,
    "--n-particles",
    6,
    "--tilt-step-deg",
    4,
)


def _invoke(*args):
    return runner.invoke(app, ["simulate", *[str(a) for a in args]])


def _error_line(result):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def _read(path):
    with mrcfile.open(path, permissive=True) as mrc:
        return np.asarray(mrc.data), float(mrc.voxel_size.x)


def test_simulate_writes_a_complete_data_set_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "sim"
    result = _invoke("--output-dir", out, *SMALL, "--n-frames", 2, "--seed", 3)
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.iterdir()}
    assert names == {
        "ts.mrc",
        "ts.tlt",
        "ts.mrc.mdoc",
        "ts_even.mrc",
        "ts_odd.mrc",
        "ground_truth.mrc",
        "particles.csv",
        "simulation.json",
    }
    stack, pixel = _read(out / "ts.mrc")
    gt, voxel = _read(out / "ground_truth.mrc")
    even, _ = _read(out / "ts_even.mrc")
    odd, _ = _read(out / "ts_odd.mrc")
    angles = read_tilt_angles(out / "ts.tlt")
    assert stack.shape == (31, 48, 48) and gt.shape == (32, 48, 48)
    assert pixel == pytest.approx(20.0) and voxel == pytest.approx(20.0)
    np.testing.assert_allclose(angles, np.arange(-60.0, 60.1, 4.0))
    np.testing.assert_allclose(even + odd, stack, rtol=0, atol=1e-5)
    # The .mdoc gives the angles and the dose-symmetric order (0, +4, +8, -4, -8, ...).
    mdoc = read_mdoc(out / "ts.mrc.mdoc")
    np.testing.assert_allclose(mdoc.angles_deg, angles)
    first = angles[np.argsort(mdoc.acquisition_order)[:5]]
    np.testing.assert_allclose(first, [0.0, 4.0, 8.0, -4.0, -8.0])
    assert mdoc.defocus_um is None  # no CTF simulated, so none to correct
    # The particle table has the agreed header and one row per recorded particle.
    with open(out / "particles.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == HEADER
    record = json.loads((out / "simulation.json").read_text())
    assert len(rows) - 1 == record["n_particles"] == 6
    assert record["seed"] == 3 and record["deepdewedge_version"] == __version__
    assert record["config"]["n_frames"] == 2
    assert record["measured_snr"] == pytest.approx(0.25, rel=0.05)
    assert "--thickness 32" in record["reconstruct_command"]
    # Each row's template, turned by its angles, is where the row says.
    templates = load_templates(20.0)
    for row in rows[1:]:
        t = templates[row[1]]
        z, y, x = (int(v) for v in row[2:5])
        angles_deg = torch.tensor([float(v) for v in row[5:8]], dtype=torch.float64)
        assert int(row[8]) == t.box_px
        expected = rotate_and_crop(
            t.density[None], euler_zyz_to_matrix(angles_deg)[None].float(), t.box_px
        )[0].numpy()
        half = (t.box_px - 1) // 2
        padded = np.pad(gt, half)
        cut = padded[z : z + t.box_px, y : y + t.box_px, x : x + t.box_px]
        axis = np.arange(t.box_px) - half
        ball = axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2
        inside = ball <= t.radius_px**2
        assert correlation_coefficient(cut[inside], expected[inside]) > 0.98

    again = _invoke("--output-dir", out, *SMALL)
    assert "--overwrite" in _error_line(again)
    assert _read(out / "ts.mrc")[0].shape == stack.shape  # untouched
    replaced = _invoke("--output-dir", out, *SMALL, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert not (out / "ts_even.mrc").exists() or (out / "ts_even.mrc").stat().st_size > 0


def test_reconstruction_of_the_simulated_stack_matches_the_ground_truth(tmp_path):
    sim = tmp_path / "sim"
    result = _invoke(
        "--output-dir",
        sim,
        "--thickness-px",
        48,
        "--height-px",
        64,
        "--width-px",
        64,
        "--snr",
        1000,
        "--tilt-step-deg",
        2,
        "--acquisition-scheme",
        "sequential",
    )
    assert result.exit_code == 0, result.output
    rec = runner.invoke(
        app,
        [
            "reconstruct",
            "--tilt-series",
            str(sim / "ts.mrc"),
            "--mdoc",
            str(sim / "ts.mrc.mdoc"),
            "--thickness",
            "48",
            "--full-filter",
            "ramp",  # sharp, so that a one-voxel shift shows
            "--output-dir",
            str(tmp_path / "rec"),
        ],
    )
    assert rec.exit_code == 0, rec.output
    gt, _ = _read(sim / "ground_truth.mrc")
    full, voxel = _read(tmp_path / "rec" / "ts_full.mrc")
    assert full.shape == gt.shape and voxel == pytest.approx(10.0)
    inner = (slice(2, -2), slice(None), slice(2, -2))
    cc = correlation_coefficient(full[inner], gt[inner])
    assert cc > 0.7
    for axis in (0, 2):  # one voxel off in z or x is worse
        for shift in (-1, 1):
            shifted = np.roll(full, shift, axis)[inner]
            assert correlation_coefficient(shifted, gt[inner]) < cc - 0.02


def test_simulate_with_ctf_writes_defocus_for_reconstruct(tmp_path):
    out = tmp_path / "sim"
    result = _invoke("--output-dir", out, *SMALL, "--ctf", "--defocus-um", 2.5)
    assert result.exit_code == 0, result.output
    mdoc = read_mdoc(out / "ts.mrc.mdoc")
    np.testing.assert_allclose(mdoc.defocus_um, 2.5)
    assert json.loads((out / "simulation.json").read_text())["config"]["ctf"] is True


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--snr", -1), "--snr"),
        (("--snr", "nan"), "--snr"),
        (("--n-frames", 1), "n_frames"),
        (("--templates", "ribosome"), "ribosome"),
        (("--tilt-min-deg", 70, "--tilt-max-deg", 60), "tilt_min_deg"),
        (("--tilt-max-deg", 90), "--tilt-max-deg"),
        (("--acquisition-scheme", "random"), "--acquisition-scheme"),
        (("--voxel-size-angstrom", 0), "--voxel-size-angstrom"),
        (("--ice-thickness-px", 40, "--thickness-px", 32), "ice_thickness_px"),
        (("--thickness-px", 4), "--thickness-px"),
        (("--thickness-px", 16, "--voxel-size-angstrom", 10), "ice_thickness_px"),
    ],
)
def test_bad_arguments_give_one_line_errors(tmp_path, args, needle):
    out = tmp_path / "sim"
    line = _error_line(_invoke("--output-dir", out, *args))
    assert needle in line
    assert not out.exists()
