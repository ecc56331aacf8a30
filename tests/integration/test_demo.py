from typer.testing import CliRunner

from deepdewedge.cli import app


def test_demo_command_runs_and_reports(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--output-dir", str(tmp_path), "--num-epochs", "1"])
    assert result.exit_code == 0, result.output
    for name in ("FBP", "noise2noise-only", "DeepDeWedge"):
        assert name in result.output
    assert (tmp_path / "demo_orthoslices.png").stat().st_size > 10_000
    assert list((tmp_path / "deepdewedge" / "refined_tomograms").glob("*_refined.mrc"))
    assert (tmp_path / "deepdewedge" / "logs" / "loss_curve.png").exists()
