"""``ddw evaluate`` in-process: outputs, their contents, and one-line errors for bad input."""

import csv
import json
import math
import warnings

import mrcfile
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from deepdewedge.cli import app
from deepdewedge.evaluate.metrics import evaluate_volume
from deepdewedge.fourier import apply_fourier_mask, missing_wedge_mask

runner = CliRunner()
SHAPE = (32, 40, 40)
CENTRES = [(10, 12, 12), (20, 28, 14), (16, 20, 28), (2, 2, 2)]  # the last box leaves
KEYS = {
    "cc",
    "cc_outside_wedge",
    "cc_inside_wedge",
    "fsc_0143_angstrom",
    "fsc_05_angstrom",
    "fsc_inside_wedge_0143_angstrom",
    "particle_fsc_0143_angstrom",
    "particle_fsc_05_angstrom",
    "particle_fsc_inside_wedge_0143_angstrom",
    "n_particles",
}


def _write(path, data, voxel_size=10.0):
    with warnings.catch_warnings(), mrcfile.new(path, overwrite=True) as mrc:
        warnings.simplefilter("ignore")
        mrc.set_data(np.asarray(data, dtype=np.float32))
        if voxel_size is not None:
            mrc.voxel_size = voxel_size
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    rng = np.random.default_rng(0)
    gt = np.zeros(SHAPE, dtype=np.float32)
    blob = rng.standard_normal((12, 12, 12)).astype(np.float32)
    for z, y, x in CENTRES[:3]:
        gt[z - 6 : z + 6, y - 6 : y + 6, x - 6 : x + 6] += blob
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    wedged = apply_fourier_mask(torch.from_numpy(gt), missing_wedge_mask(SHAPE, mw_angle_deg=60))
    files = {
        "gt": _write(root / "gt.mrc", gt),
        "fbp": _write(root / "fbp.mrc", wedged.numpy() + 0.5 * noise),
        "ddw": _write(root / "ddw.mrc", gt + 0.2 * noise),
        "no_voxel": _write(root / "no_voxel.mrc", gt, voxel_size=None),
        "small": _write(root / "small.mrc", gt[:, :, :32]),
        "constant": _write(root / "constant.mrc", np.full(SHAPE, 3.0)),
    }
    particles = root / "particles.csv"
    lines = ["particle,template,z_px,y_px,x_px,phi_deg,theta_deg,psi_deg,box_px"]
    lines += [f"{i},blob,{z},{y},{x},0,0,0,12" for i, (z, y, x) in enumerate(CENTRES)]
    particles.write_text("\n".join(lines) + "\n")
    files["particles"] = particles
    return root, files, gt


def _invoke(*args):
    return runner.invoke(app, ["evaluate", *(str(a) for a in args)])


def test_two_volumes_write_json_csv_and_figure(data, tmp_path):
    root, files, gt = data
    out = tmp_path / "out"
    result = _invoke(
        "--volume", files["fbp"], "--volume", files["ddw"], "--ground-truth", files["gt"],
        "--mw-angle", 60, "--particles", files["particles"], "--box-size", 16,
        "--label", "FBP", "--label", "DeepDeWedge",
        "--json", out / "metrics.json", "--csv", out / "metrics.csv",
        "--figure", out / "fsc.png",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    table = result.output.splitlines()
    assert table[0].split()[0] == "volume"
    assert table[1].startswith("FBP") and table[2].startswith("DeepDeWedge")

    record = json.loads((out / "metrics.json").read_text())
    assert [row["label"] for row in record["results"]] == ["FBP", "DeepDeWedge"]
    assert record["voxel_size_angstrom"] == 10.0 and record["box_size_px"] == 16
    assert "deepdewedge_version" in record and "command_line" in record
    fbp, ddw = record["results"]
    for row in (fbp, ddw):
        assert KEYS <= set(row)
        assert row["n_particles"] == 3 and row["n_particles_skipped"] == 1
    # The reconstruction closer to the ground truth scores better everywhere.
    assert ddw["cc"] > fbp["cc"] and ddw["cc_outside_wedge"] > fbp["cc_outside_wedge"]
    assert ddw["cc_inside_wedge"] > 0.5 > abs(fbp["cc_inside_wedge"])
    assert ddw["particle_fsc_0143_angstrom"] <= fbp["particle_fsc_0143_angstrom"]
    # The same numbers as the Python API.
    expected = evaluate_volume(
        _read(files["ddw"]),
        gt,
        mw_angle_deg=60,
        voxel_size_angstrom=10.0,
        particles_zyx=CENTRES,
        box_size_px=16,
    ).metrics
    for key in KEYS:
        assert ddw[key] == pytest.approx(expected[key])
    curves = record["curves"]["DeepDeWedge"]
    assert set(curves) == {"fsc", "fsc_inside_wedge", "particle_fsc", "particle_fsc_inside_wedge"}
    assert len(curves["fsc"]["fsc"]) == len(curves["fsc"]["frequencies_per_angstrom"]) == 16

    with open(out / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["label"] for r in rows] == ["FBP", "DeepDeWedge"]
    assert KEYS <= set(rows[0])
    assert float(rows[1]["cc"]) == pytest.approx(ddw["cc"], rel=1e-5)
    assert (out / "fsc.png").read_bytes().startswith(b"\x89PNG")
    assert not list(out.glob(".*.tmp"))


def test_defaults_voxel_size_from_the_header_and_names_from_the_files(data, tmp_path):
    _, files, _ = data
    result = _invoke(
        "--volume", files["ddw"], "--ground-truth", files["gt"], "--mw-angle", 60,
        "--particles", files["particles"], "--json", tmp_path / "m.json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "m.json").read_text())
    assert record["voxel_size_angstrom"] == 10.0
    assert record["box_size_px"] == 12  # from the box_px column
    row = record["results"][0]
    assert row["label"] == "ddw" and row["n_particles"] == 3
    assert row["fsc_0143_angstrom"] >= 20.0  # never finer than Nyquist


def test_without_particles_and_with_an_undefined_metric(data, tmp_path):
    root, files, gt = data
    wedged = _write(
        tmp_path / "wedged.mrc",
        apply_fourier_mask(torch.from_numpy(gt), missing_wedge_mask(SHAPE, mw_angle_deg=60)),
    )
    result = _invoke(
        "--volume", wedged, "--ground-truth", files["gt"], "--mw-angle", 60,
        "--voxel-size-angstrom", 5, "--json", tmp_path / "m.json", "--csv", tmp_path / "m.csv",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "n/a" in result.output  # CC inside the wedge is undefined
    row = json.loads((tmp_path / "m.json").read_text())["results"][0]
    assert row["cc_inside_wedge"] is None  # strict JSON: null, not NaN
    assert row["cc_outside_wedge"] == pytest.approx(1.0, abs=1e-6)
    assert "particle_fsc_0143_angstrom" not in row
    assert not math.isnan(row["fsc_0143_angstrom"])
    assert next(csv.DictReader(open(tmp_path / "m.csv")))["cc_inside_wedge"] == ""


def test_an_asymmetric_wedge_splits_inside_and_outside_by_the_tilt_range(data):
    from deepdewedge.pipeline.evaluation import evaluate

    _, files, gt = data
    vol = mrcfile.read(files["fbp"])
    (row,) = evaluate([files["fbp"]], files["gt"], mw_angle_deg=65, tilt_range_deg=(-50, 65))
    want = evaluate_volume(vol, gt, voxel_size_angstrom=10.0, tilt_range_deg=(-50, 65)).metrics
    assert row["cc_inside_wedge"] == pytest.approx(want["cc_inside_wedge"], rel=1e-6)
    symmetric = evaluate_volume(vol, gt, voxel_size_angstrom=10.0, mw_angle_deg=65).metrics
    assert row["cc_inside_wedge"] != pytest.approx(symmetric["cc_inside_wedge"], rel=1e-3)


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("missing volume", "absent.mrc: no such file"),
        ("shape mismatch", "small.mrc: shape (32, 40, 32)"),
        ("no voxel size", "no_voxel.mrc: no voxel size"),
        ("box too large", "particles.csv: box size 48 voxels is larger than the volume"),
        ("no particles inside", "outside.csv: none of the 2 particles"),
        ("bad particle list", "bad.csv: the header has no column x_px"),
        ("label count", "--label: given 2 times for 1 volumes"),
        ("mw angle", "--mw-angle 180.0"),
        ("figure format", "fsc.bmp: unknown figure format"),
        ("constant volume", "constant.mrc: every voxel is 3"),
    ],
)
def test_bad_input_is_one_line(data, tmp_path, case, needle):
    root, files, _ = data
    base = ["--ground-truth", files["gt"], "--mw-angle", 60]
    outside = tmp_path / "outside.csv"
    outside.write_text("z_px,y_px,x_px\n0,0,0\n31,39,39\n")
    bad = tmp_path / "bad.csv"
    bad.write_text("z_px,y_px,xx\n1,2,3\n")
    args = {
        "missing volume": ["--volume", root / "absent.mrc", *base],
        "shape mismatch": ["--volume", files["small"], *base],
        "no voxel size": [
            "--volume", files["no_voxel"], "--ground-truth", files["no_voxel"], "--mw-angle", 60,
        ],
        "box too large": [
            "--volume", files["ddw"], *base, "--particles", files["particles"], "--box-size", 48,
        ],
        "no particles inside": [
            "--volume", files["ddw"], *base, "--particles", outside, "--box-size", 12,
        ],
        "bad particle list": ["--volume", files["ddw"], *base, "--particles", bad],
        "label count": ["--volume", files["ddw"], *base, "--label", "a", "--label", "b"],
        "mw angle": ["--volume", files["ddw"], "--ground-truth", files["gt"], "--mw-angle", 180],
        "figure format": ["--volume", files["ddw"], *base, "--figure", tmp_path / "fsc.bmp"],
        "constant volume": ["--volume", files["ddw"], "--volume", files["constant"], *base],
    }[case]  # fmt: skip
    before = set(tmp_path.rglob("*"))
    result = _invoke(*args, "--json", tmp_path / "out" / "m.json")
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert needle in lines[0] and "; " in lines[0]
    assert set(tmp_path.rglob("*")) == before  # nothing written


def _read(path):
    with mrcfile.open(path, permissive=True) as mrc:
        return np.array(mrc.data, dtype=np.float32)
