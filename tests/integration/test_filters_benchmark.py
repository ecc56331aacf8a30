"""benchmarks/filters.py --quick: every filter evaluated in both parts, the CSV written."""

import csv
import importlib.util
import math
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "filters.py"


def test_quick_run_writes_every_filter(tmp_path, capsys):
    # Tiny fits gain nothing from a second thread and lose much when the cores are busy.
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("filters_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    summary = module.main(["--quick", "--output", str(tmp_path)])
    with open(tmp_path / "filters.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    parts = {part: [r["filter"] for r in rows if r["part"] == part] for part in ("full", "halves")}
    assert parts == {"full": list(module.FULL_FILTERS), "halves": list(module.HALVES_FILTERS)}
    assert all(math.isfinite(float(r[m])) for r in rows for m in module.METRICS)
    full = {e["filter"]: e["cc"] for e in summary if e["part"] == "full"}
    assert full["hamming"] > full["ramp"]  # noise dominates the ramp-filtered tomogram
    assert "| 1/4 | sirt-10 | 1 |" in capsys.readouterr().out
