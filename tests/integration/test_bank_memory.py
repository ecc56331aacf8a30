"""Preparing and fitting 8 tomograms takes no more memory than 2: banks stay in their files."""

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bank_memory.py"


def _benchmark():
    # The script imports its sibling memory_sampler, as it does when run from benchmarks/.
    if str(SCRIPT.parent) not in sys.path:
        sys.path.append(str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("bank_memory_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_memory_does_not_grow_with_the_number_of_tomograms(tmp_path):
    """48³ tomograms, 16³ sub-tomograms, a tiny U-Net, two epochs with a wedge update.

    The six extra tomograms add 27 MiB of banks. Loaded whole, as before, they added 56 MiB
    to the peak of preparing (the crops, then their concatenation) and 40 MiB to that of
    fitting (the banks, then a new input bank at the update); in files, under 5 MiB, the
    noise of the peaks. Batches of 4 keep that noise small.
    """
    bench = _benchmark()
    few, many = (bench.measure(tmp_path / f"n{n}", n, batch_size=4) for n in (2, 8))
    extra = many["bank_mib"] - few["bank_mib"]
    assert extra > 25
    for key in ("prepare_rss_anon_mib", "fit_rss_anon_mib", "fit_rss_file_mib"):
        assert many[key] - few[key] < 0.4 * extra, (key, few, many)
