"""One bounded run on a GPU: fitting speed, share of the bf16 peak, epoch time, memory, refinement.

At the paper's sizes (96³ sub-tomograms, a U-Net with 64 channels and 3 down-sampling
layers, batch 5 and 16) it measures, in this order of priority:

* **peak**: a large bf16 matmul (TFLOP/s), and the reference peak: the vendor's dense bf16
  figure for a known device (``speed.BF16_PEAK_TFLOPS``), else the measured matmul;
* **fit**: samples/s of the whole fitting step (``speed.measure_ours``: device-side rotation
  of both halves, extra wedge on the input, forward, masked Fourier loss, backward, Adam) in
  bf16 autocast and fp32, with and without ``channels_last``, then with ``torch.compile``;
  the U-Net's TFLOP/s (FLOPs of one step from ``torch.utils.flop_counter``) and its share of
  the reference peak; the time of one epoch of the paper's 150 sub-tomograms and of a whole
  fit (1000 epochs with a wedge update every 10, as ``ddw fit-model`` does by default, no
  validation); peak GPU memory (``torch.cuda.max_memory_allocated``, reset per run);
* **wedge**: the periodic missing-wedge update of the input bank of 150 sub-tomograms
  (``fill_missing_wedges``, then the new input statistics), as the fit loop does it;
* **refine**: ``ddw refine-tomogram``'s library path on a random 300×1024×1024 pair of half
  tomograms written as MRC to a temporary folder, with the fitted-size network, in a child
  process (``refine_memory.py``): seconds, peak host RSS and peak GPU memory.

Every measurement has a warm-up and a bounded number of timed repeats. A configuration that
fails (an error, or out of memory) is noted in its row and the run goes on. A global time
budget (``--budget-s``) bounds the whole run: a measurement still running when it ends is
stopped, and the remaining ones are marked ``skipped: budget``.

``--smoke`` runs the same code on the CPU at tiny sizes (16³ sub-tomograms, 4 channels,
batch 2 and 3, a 32×64×64 pair, one thread) in a few seconds; ``torch.compile`` is not tried
on the CPU.

Run: ``python benchmarks/gpu_check.py [--smoke] [--budget-s 480] [--output CSV]``. Prints one
markdown table and writes it as CSV (default ``benchmarks/gpu_check_results/gpu_check.csv``,
``gpu_check_smoke.csv`` with ``--smoke``) under ``#`` header lines naming the device, the
versions of torch, CUDA and cuDNN, and the command line. The exit status is 1 if a
configuration failed, else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# speed.py lies beside this script, whose folder Python puts first on the module path.
from speed import (
    MW_ANGLE_DEG,
    _device_name,
    _markdown,
    _model,
    _sync,
    device_peak_tflops,
    measure_ours,
    training_flops_per_sample,
)

from deepdewedge import __version__
from deepdewedge.config import FitModelConfig
from deepdewedge.fit.bank import bank_size
from deepdewedge.fit.loop import Banks, FitSettings, model_input_statistics
from deepdewedge.fit.wedge_update import fill_missing_wedges
from deepdewedge.fourier import missing_wedge_mask
from deepdewedge.io.atomic import atomic_write
from deepdewedge.model.denormals import flush_denormals

# The U-Net of speed.py's measurements (``speed._model``) has 3 down-sampling layers.
DEPTH = 3
# The paper fits on 150 sub-tomograms; the fit's defaults give the epochs and update period.
N_SUBTOMOS = 150
NUM_EPOCHS = FitModelConfig.model_fields["num_epochs"].default
UPDATE_EVERY = FitModelConfig.model_fields["update_subtomo_missing_wedges_every_n_epochs"].default
PAPER_BATCH = FitModelConfig.model_fields["batch_size"].default

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
FIT_VARIANTS = ["bf16", "bf16+channels_last", "fp32", "fp32+channels_last"]


@dataclass(frozen=True)
class Sizes:
    """What one run measures."""

    subtomo: int
    chans: int
    batches: tuple[int, ...]
    steps: int  # timed steps per fitting configuration, after speed.py's 2 warm-up steps
    wedge_subtomos: int  # bank crops in the timed wedge update
    refine_shape: tuple[int, int, int]
    refine_batch: int
    matmul_n: int
    matmul_repeats: int


PAPER = Sizes(
    subtomo=96,
    chans=64,
    batches=(PAPER_BATCH, 16),
    steps=8,
    wedge_subtomos=N_SUBTOMOS,
    refine_shape=(300, 1024, 1024),
    refine_batch=8,
    matmul_n=8192,
    matmul_repeats=50,
)
SMOKE = Sizes(
    subtomo=16,
    chans=4,
    batches=(2, 3),
    steps=2,
    wedge_subtomos=8,
    refine_shape=(32, 64, 64),
    refine_batch=2,
    matmul_n=256,
    matmul_repeats=5,
)


# Budget ------------------------------------------------------------------------------------------


class BudgetExceeded(Exception):
    """The global time budget ran out during a measurement."""


class Budget:
    """Seconds left of the run's time budget."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`BudgetExceeded` in the block once `seconds` have passed (main thread)."""
    if (
        not hasattr(signal, "setitimer")
        or threading.current_thread() is not threading.main_thread()
    ):
        yield
        return

    def _expire(signum: int, frame: Any) -> None:
        raise BudgetExceeded

    previous = signal.signal(signal.SIGALRM, _expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _free(device: torch.device) -> None:
    """Release what earlier measurements left behind and restart the peak-memory count."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_measurement(
    row: dict[str, Any], measure: Callable[[], dict[str, Any]], budget: Budget, device: torch.device
) -> None:
    """Fill `row` with `measure()`, or note why not: the budget, out of memory, an error."""
    if budget.left() <= 0:
        row["status"] = "skipped: budget"
        return
    _free(device)
    started = time.perf_counter()
    try:
        with deadline(budget.left()):
            result = measure()
        row.update(result)
        row["status"] = "ok"
    except BudgetExceeded:
        row["status"] = "skipped: budget"
        row["note"] = f"stopped after {time.perf_counter() - started:.0f} s"
    except torch.OutOfMemoryError:
        row["status"] = "skipped: out of memory"
    except Exception as err:  # one configuration must not end the run
        if budget.left() <= 0:  # the deadline, wrapped by a library (e.g. the compiler)
            row["status"] = "skipped: budget"
            row["note"] = f"stopped after {time.perf_counter() - started:.0f} s"
        else:
            first_line = (str(err).strip().splitlines() or [""])[0][:160]
            row["status"] = f"failed: {type(err).__name__}: {first_line}"
    finally:
        if "compile" in row["config"]:
            torch._dynamo.reset()  # drop the compiled graphs and what they hold
    batch = "" if row["batch"] is None else f", batch {row['batch']}"
    print(
        f"{row['section']} {row['config']}{batch}: {row['status']} "
        f"({time.perf_counter() - started:.1f} s)",
        file=sys.stderr,
    )


# Measurements ------------------------------------------------------------------------------------


def measure_matmul(n: int, repeats: int, device: torch.device) -> dict[str, Any]:
    """TFLOP/s of an `(n, n) @ (n, n)` bf16 matmul, after 3 warm-up products."""
    generator = torch.Generator(device).manual_seed(0)
    a, b = (
        torch.randn(n, n, generator=generator, device=device, dtype=torch.bfloat16)
        for _ in range(2)
    )
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    seconds = time.perf_counter() - start
    return {"tflops": 2 * n**3 * repeats / seconds / 1e12, "seconds": seconds}


def measure_fit(sizes: Sizes, batch: int, variant: str, device: torch.device) -> dict[str, Any]:
    """Samples/s, step time and peak GPU memory of the fitting step (``speed.measure_ours``)."""
    return measure_ours(sizes.subtomo, sizes.chans, batch, sizes.steps, device, variant)


def measure_wedge_update(sizes: Sizes, batch: int, device: torch.device) -> dict[str, Any]:
    """Seconds of one missing-wedge update of the input bank, as the fit loop does it.

    The loop fills the wedges of the model-input bank (``fill_missing_wedges``, without
    autocast) and then recomputes the model inputs' statistics over the bank. The warm-up
    updates one batch of crops.
    """
    model = _model(sizes.chans, device)
    big = bank_size(sizes.subtomo)
    generator = torch.Generator(device).manual_seed(0)
    n = sizes.wedge_subtomos
    crops0, crops1 = (
        torch.randn(n, big, big, big, generator=generator, device=device) for _ in range(2)
    )
    settings = FitSettings(
        subtomo_size=sizes.subtomo,
        mw_angle=MW_ANGLE_DEG,
        num_epochs=1,
        batch_size=batch,
        adam_params={},
        seed=0,
        device=device,
    )
    mw_mask = missing_wedge_mask((sizes.subtomo,) * 3, mw_angle_deg=MW_ANGLE_DEG, device=device)

    def update(k: int) -> None:
        filled = fill_missing_wedges(
            model,
            crops0[:k],
            mw_angle_deg=MW_ANGLE_DEG,
            size_multiple=model.size_multiple,
            batch_size=batch,
            device=device,
        )
        stats = model_input_statistics(Banks(fit0=filled, fit1=crops1[:k]), settings, mw_mask)
        model.set_normalization(*stats)

    update(min(batch, n))
    _sync(device)
    _free(device)
    start = time.perf_counter()
    update(n)
    _sync(device)
    row: dict[str, Any] = {"seconds": time.perf_counter() - start}
    if device.type == "cuda":
        row["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row


def measure_refinement(sizes: Sizes, budget: Budget, device: torch.device) -> dict[str, Any]:
    """Refine a random pair of halves with ``refine_memory.py`` in a child process."""
    script = Path(__file__).with_name("refine_memory.py")
    overlap = math.ceil(sizes.subtomo / 3)  # the default subtomo_overlap of refine-tomogram
    with tempfile.TemporaryDirectory(prefix="ddw-gpu-check-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(script), "--dir", tmp, "--json", str(out)]
        cmd += ["--shape", *map(str, sizes.refine_shape), "--subtomo-size", str(sizes.subtomo)]
        cmd += ["--overlap", str(overlap), "--batch-size", str(sizes.refine_batch)]
        cmd += ["--chans", str(sizes.chans), "--depth", str(DEPTH)]
        if device.type == "cuda":
            cmd += ["--gpu", str(device.index or 0)]
        threads = str(torch.get_num_threads())
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        _run_child(cmd, env, timeout_s=budget.left())
        result = json.loads(out.read_text())
    row: dict[str, Any] = {"seconds": result["seconds"]}
    row["host_rss_peak_mb"] = result["peak VmHWM (ru_maxrss), incl. mapped file pages"] * 1.048576
    anon = result["peak RssAnon - RssAnon before"] * 1.048576
    row["note"] = f"host memory of its own (RssAnon) grew by {anon:.0f} MB; overlap {overlap}"
    if "peak GPU memory allocated (per GPU)" in result:
        row["peak_gpu_mb"] = result["peak GPU memory allocated (per GPU)"] * 1.048576
    return row


def _run_child(cmd: list[str], env: dict[str, str], *, timeout_s: float) -> None:
    """Run `cmd` in its own process group; kill the group when time runs out or on error."""
    child = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = child.communicate(timeout=max(timeout_s, 1e-3))
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        raise BudgetExceeded from None
    except BaseException:  # e.g. BudgetExceeded from the deadline
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        raise
    if child.returncode != 0:
        raise RuntimeError(f"refine_memory.py exited with {child.returncode}: {stderr[-500:]}")


# The run ----------------------------------------------------------------------------------------


def plan(sizes: Sizes, device: torch.device) -> tuple[list[dict[str, Any]], list[int]]:
    """Rows in display order, and the order in which to measure them (most useful first)."""
    common = {"subtomo": sizes.subtomo, "chans": sizes.chans, "depth": DEPTH}
    matmul = f"bf16 matmul {sizes.matmul_n}³"
    rows: list[dict[str, Any]] = [{"section": "peak", "config": matmul, "batch": None}]
    for batch in sizes.batches:
        for variant in FIT_VARIANTS:
            for compiled in (False, True):
                config = variant + ("+compile" if compiled else "")
                rows.append({"section": "fit", "config": config, "batch": batch} | common)
    wedge = f"fill {sizes.wedge_subtomos} bank crops {bank_size(sizes.subtomo)}³, statistics"
    rows.append({"section": "wedge", "config": wedge, "batch": sizes.batches[0]} | common)
    refine = "pair " + "×".join(map(str, sizes.refine_shape))
    rows.append({"section": "refine", "config": refine, "batch": sizes.refine_batch} | common)
    for row in rows:
        row["status"] = "pending"
        if "compile" in row["config"] and device.type != "cuda":
            row["status"] = "skipped: compile not tried on the CPU"
        if row["config"].startswith("bf16") and row["section"] == "fit":
            if device.type == "cuda" and not torch.cuda.is_bf16_supported():
                row["status"] = "skipped: no bf16 on this GPU"

    def priority(i: int) -> tuple[int, int, int]:
        row = rows[i]
        rank = {"peak": 0, "fit": 1, "wedge": 2, "refine": 3}[row["section"]]
        if "compile" in row["config"]:
            rank = 4  # compiling takes minutes: only with the time left at the end
            return (rank, row["config"].startswith("fp32"), sizes.batches.index(row["batch"]))
        return (rank, 0, i)

    return rows, sorted(range(len(rows)), key=priority)


def run(sizes: Sizes, device: torch.device, budget: Budget, flops: float) -> list[dict[str, Any]]:
    """Measure every planned row within the budget; return the rows in display order.

    `flops` is the U-Net's arithmetic of one training step per sample.
    """
    rows, order = plan(sizes, device)
    peak_table = device_peak_tflops(device)
    measures: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
        "peak": lambda row: measure_matmul(sizes.matmul_n, sizes.matmul_repeats, device),
        "fit": lambda row: measure_fit(sizes, row["batch"], row["config"], device),
        "wedge": lambda row: measure_wedge_update(sizes, row["batch"], device),
        "refine": lambda row: measure_refinement(sizes, budget, device),
    }
    with flush_denormals():  # as ddw fit-model and refine-tomogram do on the CPU
        for i in order:
            row = rows[i]
            if row["status"] == "pending":
                run_measurement(row, lambda row=row: measures[row["section"]](row), budget, device)

    matmul = rows[0]
    peak = peak_table or (matmul["tflops"] if matmul["status"] == "ok" else None)
    if matmul["status"] == "ok":
        matmul["peak_fraction"] = matmul["tflops"] / peak
    wedge = next(r for r in rows if r["section"] == "wedge")
    update_s = None
    if wedge["status"] == "ok":
        update_s = wedge["seconds"] * N_SUBTOMOS / sizes.wedge_subtomos
    n_updates = len(range(UPDATE_EVERY, NUM_EPOCHS, UPDATE_EVERY)) if UPDATE_EVERY else 0
    for row in rows:
        if row["section"] != "fit" or row["status"] != "ok":
            continue
        row["tflops"] = row["samples_per_s"] * flops / 1e12
        if peak is not None:
            row["peak_fraction"] = row["tflops"] / peak
        row["epoch_s"] = N_SUBTOMOS / row["samples_per_s"]
        projected_s = NUM_EPOCHS * row["epoch_s"] + n_updates * (update_s or 0.0)
        row["projected_fit_h"] = projected_s / 3600
        if update_s is None and n_updates:
            row["note"] = "projection without wedge updates (not measured)"
    return rows


def header_lines(
    sizes: Sizes, device: torch.device, rows: list[dict[str, Any]], flops: float
) -> list[str]:
    """The `#` lines above the table: device, versions, settings, reference peak, command."""
    peak_table = device_peak_tflops(device)
    if peak_table is not None:
        reference = f"{peak_table:g} TFLOP/s, dense bf16 data-sheet figure of this device"
    elif rows[0]["status"] == "ok":
        reference = f"{rows[0]['tflops']:.3g} TFLOP/s, the measured bf16 matmul (unknown device)"
    else:
        reference = "none (unknown device, matmul not measured)"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    device_line = f"device: {_device_name(device)}"
    if device.type == "cuda":
        memory_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
        device_line += f", {memory_gib:.0f} GiB"
    return [
        device_line,
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {cudnn}, "
        f"deepdewedge {__version__}, Python {sys.version.split()[0]}",
        f"bf16 peak reference: {reference}",
        f"U-Net training step: {flops / 1e12:.3g} TFLOP per sample "
        f"({sizes.subtomo}³, {sizes.chans} channels, {DEPTH} down-sampling layers)",
        f"fit: 2 warm-up + {sizes.steps} timed steps; epoch = {N_SUBTOMOS} sub-tomograms; "
        f"projection = {NUM_EPOCHS} epochs with a wedge update every {UPDATE_EVERY}, "
        "no validation",
        f"command: {' '.join(sys.argv)}",
    ]


def write_table(path: Path, header: list[str], rows: list[dict[str, Any]]) -> None:
    """Write `rows` as CSV under `#` header lines, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as handle:
        handle.writelines(f"# {line}\n" for line in header)
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({c: row.get(c) for c in COLUMNS} for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--device", default=None, help="default: cuda if present (cpu: --smoke)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="time budget of the run")
    parser.add_argument("--output", type=Path, default=None, help="CSV file of the table")
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.output is None:
        name = "gpu_check_smoke.csv" if args.smoke else "gpu_check.csv"
        args.output = Path(__file__).with_name("gpu_check_results") / name
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    sizes = SMOKE if args.smoke else PAPER
    budget = Budget(args.budget_s)

    threads = torch.get_num_threads()
    benchmark = torch.backends.cudnn.benchmark
    if args.smoke and device.type == "cpu":
        torch.set_num_threads(1)  # a shared CPU makes several threads far slower than one
    # As ddw fit-model: cuDNN picks its fastest 3D convolutions once per shape.
    torch.backends.cudnn.benchmark = benchmark or device.type == "cuda"
    try:
        flops = training_flops_per_sample(sizes.subtomo, sizes.chans)
        rows = run(sizes, device, budget, flops)
        header = header_lines(sizes, device, rows, flops)
    finally:
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = benchmark
    write_table(args.output, header, rows)
    print("\n".join(f"# {line}" for line in header))
    print(_markdown([{c: row.get(c) for c in COLUMNS} for row in rows]))
    print(f"wrote {args.output}", file=sys.stderr)
    return 1 if any(row["status"].startswith("failed") for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
