"""`ddw reconstruct` from a raw stack and an alignment: every format, and the real fixture."""

from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch
from alignment_writers import (
    write_aretomo_aln,
    write_imod_xf,
    write_imod_xtilt,
    write_relion_star,
    write_tlt,
    write_warp_xml,
)
from typer.testing import CliRunner

from deepdewedge.cli import app
from deepdewedge.evaluate.metrics import correlation_coefficient
from deepdewedge.io.geometry import TiltSeriesGeometry
from deepdewedge.reconstruct.preprocess import align_tilts, rotate_about_x
from deepdewedge.simulate import project, simulate_phantom

runner = CliRunner()
ANGLES = np.arange(-60.0, 60.1, 4.0)
PIXEL = 5.0
FIXTURE = Path(__file__).parents[1] / "data" / "empiar10499"
# Geometry only: the formats differ in what they carry besides it (dose, defocus).
GEOMETRY_ONLY = ["--no-dose-filter", "--no-erase-gold", "--filter", "hamming"]


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _raw_views(aligned: torch.Tensor, geometry: TiltSeriesGeometry) -> torch.Tensor:
    """The raw views whose alignment by ``geometry`` gives ``aligned``, shape `(n, h, w)`."""
    forward = geometry.raw_position_matrix()
    inverse = np.zeros_like(forward)
    linear = np.linalg.inv(forward[:, :, :2])
    inverse[:, :, :2] = linear
    inverse[:, :, 2] = -np.einsum("nij,nj->ni", linear, forward[:, :, 2])
    return align_tilts(aligned, torch.from_numpy(inverse))


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    gt = simulate_phantom((24, 64, 64), generator=torch.Generator().manual_seed(5))
    rng = np.random.default_rng(0)
    n = ANGLES.size
    geometry = TiltSeriesGeometry(
        tilt_angle_deg=ANGLES,
        tilt_axis_angle_deg=-6.0 + rng.uniform(-1, 1, n),
        shift_x_px=rng.uniform(-5, 5, n),
        shift_y_px=rng.uniform(-5, 5, n),
        pre_exposure_e_per_a2=3.0 * np.argsort(np.argsort(np.abs(ANGLES), kind="stable")),
    )
    aligned = project(gt, torch.from_numpy(ANGLES)).to(torch.float32)
    views = _raw_views(aligned, geometry)
    with mrcfile.new(root / "ts.mrc") as mrc:
        mrc.set_data(views.numpy())
        mrc.voxel_size = PIXEL
    with mrcfile.new(root / "aligned.mrc") as mrc:
        mrc.set_data(aligned.numpy())
        mrc.voxel_size = PIXEL
    write_tlt(root / "ts.tlt", ANGLES)
    files = {
        "imod": [
            "--alignment",
            write_imod_xf(root / "ts.xf", geometry),
            "--tilt-angles",
            root / "ts.tlt",
        ],
        "aretomo": ["--alignment", write_aretomo_aln(root / "ts.aln", geometry)],
        "warp": ["--alignment", write_warp_xml(root / "ts.xml", geometry, PIXEL)],
        "relion": ["--alignment", write_relion_star(root / "ts.star", geometry, PIXEL)],
    }
    return root, gt.numpy(), geometry, files


def _reconstruct(root, out, *args):
    result = _invoke(
        "reconstruct", "--tilt-series", root / "ts.mrc", "--thickness", 24,
        "--output-dir", out, *args,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return mrcfile.read(out / "ts_full.mrc")


def test_every_format_reconstructs_the_same_tomogram(raw, tmp_path):
    root, gt, _, files = raw
    volumes = {
        name: _reconstruct(root, tmp_path / name, *args, *GEOMETRY_ONLY)
        for name, args in files.items()
    }
    names = list(volumes)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert correlation_coefficient(volumes[a], volumes[b]) >= 0.99, (a, b)
    # The alignment is applied: against the ground truth the raw stack reconstructs about as
    # well as the aligned projections do, and far better than the raw stack taken as aligned.
    reference = _invoke(
        "reconstruct", "--tilt-series", root / "aligned.mrc", "--tilt-angles", root / "ts.tlt",
        "--thickness", 24, "--output-dir", tmp_path / "ref", *GEOMETRY_ONLY,
    )  # fmt: skip
    assert reference.exit_code == 0, reference.output
    ref_cc = correlation_coefficient(mrcfile.read(tmp_path / "ref" / "aligned_full.mrc"), gt)
    unaligned = _reconstruct(
        root, tmp_path / "unaligned", "--tilt-angles", root / "ts.tlt", *GEOMETRY_ONLY
    )
    cc = correlation_coefficient(volumes["imod"], gt)
    assert cc > 0.9 * ref_cc
    assert cc > correlation_coefficient(unaligned, gt) + 0.2


def test_dose_from_the_alignment_orders_the_halves_and_filters(raw, tmp_path):
    root, _, geometry, files = raw
    _reconstruct(root, tmp_path / "warp", *files["warp"])
    record = (tmp_path / "warp" / "ts_reconstruct.json").read_text()
    assert '"acquisition_order_from": "dose"' in record
    assert '"dose_filtered": true' in record
    # Dose-symmetric: the two halves alternate along the acquisition order.
    order = geometry.acquisition_order()
    import json

    views = json.loads(record)["views"]
    assert sorted(views["tomo0"] + views["tomo1"]) == list(range(1, ANGLES.size + 1))
    assert set(views["tomo0"]) == {int(i) + 1 for i in order[0::2]}


def test_x_tilt_is_undone(tmp_path):
    gt = simulate_phantom((24, 64, 64), generator=torch.Generator().manual_seed(6))
    alpha = 8.0
    # The specimen is tilted by R_x(α) before the tilt series is recorded.
    views = project(rotate_about_x(gt, -alpha), torch.from_numpy(ANGLES)).to(torch.float32)
    with mrcfile.new(tmp_path / "ts.mrc") as mrc:
        mrc.set_data(views.numpy())
    write_tlt(tmp_path / "ts.tlt", ANGLES)
    write_imod_xf(tmp_path / "ts.xf", TiltSeriesGeometry(tilt_angle_deg=ANGLES))
    common = ["--alignment", tmp_path / "ts.xf", "--tilt-angles", tmp_path / "ts.tlt"]
    cc = {}
    for name, x_tilt in (("plain", 0.0), ("right", alpha), ("wrong", -alpha)):
        geometry = TiltSeriesGeometry(
            tilt_angle_deg=ANGLES, x_tilt_deg=np.full(ANGLES.size, x_tilt)
        )
        xtilt = write_imod_xtilt(tmp_path / f"{name}.xtilt", geometry)
        volume = _reconstruct(
            tmp_path, tmp_path / name, *common, "--x-tilt-file", xtilt, *GEOMETRY_ONLY
        )
        cc[name] = correlation_coefficient(volume, gt.numpy())
    assert cc["right"] > cc["plain"] + 0.1 > cc["wrong"] + 0.2


def test_real_fixture_xf_and_warp_xml_agree(tmp_path):
    stack = FIXTURE / "00254_bin2.mrc"
    volumes = {}
    for name, args in (
        ("xf", ["--alignment", FIXTURE / "00254_bin2.xf", "--tilt-angles", FIXTURE / "00254.tlt"]),
        ("xml", ["--alignment", FIXTURE / "00254.xml"]),
    ):
        result = _invoke(
            "reconstruct", "--tilt-series", stack, "--thickness", 180, "--bin", 2,
            "--output-dir", tmp_path / name, "--no-erase-gold", *args,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        volumes[name] = mrcfile.read(tmp_path / name / "00254_bin2_full.mrc")
    assert volumes["xf"].shape == (90, 80, 80)
    assert correlation_coefficient(volumes["xf"], volumes["xml"]) >= 0.95


def test_bad_alignment_is_one_line_and_writes_nothing(raw, tmp_path):
    root, _, _, files = raw
    rows = files["imod"][1].read_text().splitlines()
    short = tmp_path / "short.xf"
    short.write_text("\n".join(rows[:-1]) + "\n")
    unknown = tmp_path / "ts.foo"
    unknown.write_text("1 2 3\n")
    for args, words in (
        (["--alignment", short, "--tilt-angles", root / "ts.tlt"], "transforms"),
        (["--alignment", unknown], "not a tilt-series alignment"),
    ):
        out = tmp_path / "out"
        result = _invoke(
            "reconstruct", "--tilt-series", root / "ts.mrc", "--thickness", 24,
            "--output-dir", out, *args,
        )  # fmt: skip
        assert result.exit_code != 0
        message = result.output.strip().splitlines()[-1]
        assert message.startswith("error: ") and words in message and str(args[1]) in message
        assert not out.exists()


def _edge_ratio(volume):
    """Std of the outer 5% of x of the central xz slice over that of its inner half."""
    xz = volume[:, volume.shape[1] // 2, :]
    w = xz.shape[1]
    edge = max(1, int(0.05 * w))
    outer = np.concatenate([xz[:, :edge], xz[:, -edge:]], axis=1)
    return outer.std() / xz[:, w // 4 : 3 * w // 4].std()


def test_real_fixture_preprocessing_removes_border_arcs_and_gold(tmp_path):
    common = [
        "--tilt-series", FIXTURE / "00254_bin2.mrc", "--alignment", FIXTURE / "00254.xml",
        "--thickness", 180,
    ]  # fmt: skip
    result = _invoke(
        "reconstruct", *common, "--output-dir", tmp_path / "as_is", "--no-normalize-tilts",
        "--taper-px", 0, "--no-dose-filter", "--no-erase-gold",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    result = _invoke("reconstruct", *common, "--output-dir", tmp_path / "default")
    assert result.exit_code == 0, result.output
    as_is = mrcfile.read(tmp_path / "as_is" / "00254_bin2_full.mrc")
    default = mrcfile.read(tmp_path / "default" / "00254_bin2_full.mrc")
    assert _edge_ratio(default) <= 1.5 < _edge_ratio(as_is)
    import json

    record = json.loads((tmp_path / "default" / "00254_bin2_reconstruct.json").read_text())
    # Warp's .xml carries the dose: the halves follow it, and the views are exposure-filtered.
    assert record["acquisition_order_from"] == "dose" and record["dose_filtered"]
    # About 20 beads of 8.7 nm (4.3 px of 20 Å) per view in this crop's field of view.
    assert record["gold_beads_erased"] >= 41 * 3
    assert record["gold_diameter_px"] == pytest.approx(4.3, rel=0.2)
    assert (tmp_path / "default" / "00254_bin2_gold.png").read_bytes().startswith(b"\x89PNG")
