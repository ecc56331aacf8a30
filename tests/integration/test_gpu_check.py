"""benchmarks/gpu_check.py: the smoke run, the time budget, failures noted in their rows."""

import csv
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPT = BENCHMARKS / "gpu_check.py"
COLUMNS = [
    "section",
    "config",
    "subtomo",
    "chans",
    "depth",
    "batch",
    "status",
    "samples_per_s",
    "step_ms",
    "tflops",
    "peak_fraction",
    "epoch_s",
    "projected_fit_h",
    "peak_gpu_mb",
    "seconds",
    "host_rss_peak_mb",
    "note",
]
# What each section measures on the CPU (no GPU memory there).
MEASURED = {
    "peak": ["tflops", "peak_fraction", "seconds"],
    "fit": ["samples_per_s", "step_ms", "tflops", "peak_fraction", "epoch_s", "projected_fit_h"],
    "wedge": ["seconds"],
    "refine": ["seconds", "host_rss_peak_mb"],
}
VARIANTS = ["bf16", "bf16+channels_last", "fp32", "fp32+channels_last"]
SMOKE_FITS = {(v + c, b) for b in ("2", "3") for v in VARIANTS for c in ("", "+compile")}


def _read(path):
    lines = path.read_text().splitlines()
    header = [line for line in lines if line.startswith("#")]
    table = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    return header, table


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu_check

    return gpu_check


@pytest.mark.slow
def test_smoke_run_measures_every_configuration(tmp_path):
    output = tmp_path / "check.csv"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| section | config |" in result.stdout
    header, rows = _read(output)
    assert list(rows[0]) == COLUMNS
    text = "\n".join(header)
    for entry in ("device: cpu", f"torch {torch.__version__}", "CUDA", "command:"):
        assert entry in text
    sections = [row["section"] for row in rows]
    assert sections.count("peak") == sections.count("wedge") == sections.count("refine") == 1
    fits = [(row["config"], row["batch"]) for row in rows if row["section"] == "fit"]
    assert len(fits) == len(set(fits)) and set(fits) == SMOKE_FITS
    for row in rows:
        if "compile" in row["config"]:
            assert row["status"] == "skipped: compile not tried on the CPU"
            continue
        assert row["status"] == "ok", row
        for column in MEASURED[row["section"]]:
            value = float(row[column])
            assert math.isfinite(value) and value > 0, (row["config"], column, value)


def test_failures_are_noted_and_the_run_goes_on(gpu_check, tmp_path, monkeypatch):
    def fake_fit(size, chans, batch, steps, device, variant):
        if "channels_last" in variant:
            raise RuntimeError("no kernel for this layout\nsecond line")
        return {"samples_per_s": 10.0, "step_ms": 100.0 * batch}

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("out of memory")

    monkeypatch.setattr(gpu_check, "measure_ours", fake_fit)
    monkeypatch.setattr(gpu_check, "measure_wedge_update", lambda *args: {"seconds": 2.0})
    monkeypatch.setattr(gpu_check, "measure_refinement", out_of_memory)
    output = tmp_path / "check.csv"

    assert gpu_check.main(["--smoke", "--output", str(output)]) == 1

    _, rows = _read(output)
    by_config = {(row["section"], row["config"], row["batch"]): row for row in rows}
    failed = by_config[("fit", "bf16+channels_last", "2")]
    assert failed["status"] == "failed: RuntimeError: no kernel for this layout"
    assert by_config[("refine", "pair 32×64×64", "2")]["status"] == "skipped: out of memory"
    fp32 = by_config[("fit", "fp32", "3")]
    assert fp32["status"] == "ok"
    # 150 sub-tomograms at 10 samples/s; 1000 epochs and 99 wedge updates, each measured on
    # 8 bank crops in 2 s and scaled to 150.
    assert float(fp32["epoch_s"]) == pytest.approx(15.0)
    hours = (1000 * 15.0 + 99 * 2.0 * 150 / 8) / 3600
    assert float(fp32["projected_fit_h"]) == pytest.approx(hours, rel=1e-3)


def test_budget_stops_a_running_measurement_and_skips_the_rest(gpu_check, tmp_path, monkeypatch):
    def slow_matmul(*args):
        time.sleep(30)

    monkeypatch.setattr(gpu_check, "measure_matmul", slow_matmul)
    output = tmp_path / "check.csv"
    started = time.perf_counter()

    assert gpu_check.main(["--smoke", "--budget-s", "1", "--output", str(output)]) == 0

    assert time.perf_counter() - started < 20
    header, rows = _read(output)
    assert rows[0]["section"] == "peak" and rows[0]["status"] == "skipped: budget"
    assert rows[0]["note"].startswith("stopped after")
    statuses = {row["status"] for row in rows[1:]}
    assert statuses == {"skipped: budget", "skipped: compile not tried on the CPU"}
    assert any("bf16 peak reference: none" in line for line in header)
