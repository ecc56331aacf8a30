"""Time and peak memory of weighted back-projection: our torch WBP against a plain NumPy one.

Cases (defaults): a 41-tilt (±60°, step 3°) stack of 1024 × 1024 random projections
reconstructed at bin 1 with thickness 300, and the same stack Fourier-binned to 256 × 256
(`deepdewedge.reconstruct.binning.bin_images`) reconstructed at bin 4 with thickness 75.
Implementations:

* ``torch``: `deepdewedge.reconstruct.backproject.weighted_backprojection` on the CPU, and on
  CUDA when ``torch.cuda.is_available()``;
* ``numpy``: the baseline below, written for this benchmark: each projection filtered with
  NumPy's FFT (the same ramp and angular weights), then voxel-driven back-projection with
  ``np.interp``, one call per tilt per y slab.

Every case runs in its own subprocess that loads its input from a ``.npy`` file, so the peak
resident memory (``VmHWM``) it reports is that case's alone; "extra" is the peak minus the
resident memory just before the reconstruction started (interpreter, libraries, input stack).
CUDA rows report ``torch.cuda.max_memory_allocated`` instead, and exclude the host-to-device
copy of the input. The NumPy baseline at bin 1 takes minutes; with ``--numpy-rows R`` it
back-projects only the first ``R`` y rows (into a fully allocated volume) and its time is
extrapolated linearly in the number of rows, which is exact up to timing noise since every row
costs the same; such rows are marked. Both implementations are checked against each
other on the bin-4 case (correlation coefficient of the volumes).

Run: ``python benchmarks/reconstruct.py [--quick] [--csv PATH] [--threads N]``. Prints a
markdown table and writes the same rows as CSV (default: next to this script).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N_TILTS = 41
TILT_RANGE_DEG = 60.0
FULL = {"size": 1024, "thickness": 300, "bin": 4}
QUICK = {"size": 256, "thickness": 76, "bin": 4}
COLUMNS = [
    "case",
    "implementation",
    "device",
    "stack",
    "volume",
    "seconds",
    "timing",
    "peak_mb",
    "extra_mb",
    "volume_mb",
]


# NumPy baseline -------------------------------------------------------------------------------


def numpy_ramp(n_fft: int) -> np.ndarray:
    """Band-limited ramp (Kak & Slaney kernel) on the rfft grid, `(n_fft // 2 + 1,)`."""
    m = np.fft.fftfreq(n_fft, d=1.0 / n_fft)
    kernel = np.zeros(n_fft)
    kernel[0] = 0.25
    odd = np.abs(m) % 2 == 1
    kernel[odd] = -1.0 / (np.pi * m[odd]) ** 2
    return np.fft.rfft(kernel).real


def numpy_angular_weights(angles_deg: np.ndarray) -> np.ndarray:
    order = np.argsort(angles_deg, kind="stable")
    gaps = np.diff(angles_deg[order])
    sorted_weights = np.deg2rad(0.5 * (np.r_[gaps[:1], gaps] + np.r_[gaps, gaps[-1:]]))
    weights = np.empty_like(sorted_weights)
    weights[order] = sorted_weights
    return weights


def numpy_filter(stack: np.ndarray, angles_deg: np.ndarray) -> np.ndarray:
    """Ramp-filter and weight each projection: `(n, h, w)` -> `(n, h, w + 2)` float32.

    Each row gets a zero column on either side, for the interpolation below.
    """
    n, h, w = stack.shape
    n_fft = max(64, 2 ** math.ceil(math.log2(2 * w)))
    response = numpy_ramp(n_fft)
    weights = numpy_angular_weights(angles_deg.astype(np.float64))
    filtered = np.zeros((n, h, w + 2), dtype=np.float32)
    for i in range(n):
        spectrum = np.fft.rfft(stack[i], n=n_fft, axis=-1) * response
        filtered[i, :, 1:-1] = np.fft.irfft(spectrum, n=n_fft, axis=-1)[:, :w] * weights[i]
    return filtered


def numpy_backproject(
    filtered: np.ndarray, angles_deg: np.ndarray, thickness: int, *, rows: int | None = None
) -> tuple[np.ndarray, float]:
    """Voxel-driven back-projection, `(n, h, w + 2)` -> `(thickness, h, w)` float32.

    Only the first ``rows`` y rows are back-projected when ``rows`` is given (the volume is
    still allocated and touched in full). Also returns the seconds spent allocating it.
    """
    n, h, w = filtered.shape[0], filtered.shape[1], filtered.shape[2] - 2
    theta = np.deg2rad(angles_deg.astype(np.float64))
    z = np.arange(thickness) - (thickness - 1) / 2
    x = np.arange(w) - (w - 1) / 2
    start = time.perf_counter()
    volume = np.empty((thickness, h, w), dtype=np.float32)
    volume.fill(0.0)
    allocation_s = time.perf_counter() - start
    slab = max(1, 2**22 // (thickness * w))
    stop = h if rows is None else min(h, rows)
    for y0 in range(0, stop, slab):
        y1 = min(stop, y0 + slab)
        s = y1 - y0
        # The slab's padded rows laid end to end, so one np.interp call serves all of them.
        row_starts = (w + 2) * np.arange(s, dtype=np.float64)[:, None, None]
        grid = np.arange(s * (w + 2), dtype=np.float64)
        accumulated = np.zeros((s, thickness, w), dtype=np.float64)
        for i in range(n):
            column = z[:, None] * np.sin(theta[i]) + x[None, :] * np.cos(theta[i])
            column = np.clip(column + (w - 1) / 2 + 1, 0.0, w + 1.0)
            queries = (column[None] + row_starts).ravel()
            values = np.interp(queries, grid, filtered[i, y0:y1].ravel())
            accumulated += values.reshape(s, thickness, w)
        volume[:, y0:y1, :] = accumulated.transpose(1, 0, 2)
    return volume, allocation_s


# One case, in a subprocess ---------------------------------------------------------------------


def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status in MiB (Linux), or None where there is none."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _start_peak() -> float:
    """Reset the peak-RSS mark if the OS allows it; return the baseline to subtract from it.

    ``ru_maxrss`` is not usable here: Linux carries the parent's peak over into a spawned child.
    ``VmHWM`` belongs to the child's own address space, and writing 5 to clear_refs resets it to
    the current RSS, so that the peak then measures the reconstruction alone.
    """
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _status_mb("VmRSS")
    except OSError:
        return _peak_mb()


def _peak_mb() -> float:
    peak = _status_mb("VmHWM")
    if peak is None:  # not Linux: the process's maximum RSS (kB on Linux, bytes on macOS)
        scale = 2**20 if sys.platform == "darwin" else 2**10
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale
    return peak


def run_case(spec: dict) -> dict:
    """Run one reconstruction as described by ``spec`` and return its measurements."""
    import torch

    from deepdewedge.reconstruct.backproject import weighted_backprojection

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    stack = np.load(spec["input"])
    angles = np.linspace(-TILT_RANGE_DEG, TILT_RANGE_DEG, stack.shape[0])
    thickness = spec["thickness"]
    result = {}
    if spec["implementation"] == "numpy":
        numpy_backproject(numpy_filter(stack[:, :2], angles), angles, 4)  # warm-up
        before = _start_peak()
        start = time.perf_counter()
        filtered = numpy_filter(stack, angles)
        filter_s = time.perf_counter() - start
        rows = spec.get("rows")
        volume, allocation_s = numpy_backproject(filtered, angles, thickness, rows=rows)
        seconds = time.perf_counter() - start
        if rows is not None and rows < stack.shape[1]:
            loop_s = seconds - filter_s - allocation_s
            seconds = filter_s + allocation_s + loop_s * stack.shape[1] / rows
            result["timing"] = f"back-projection extrapolated from {rows} of {stack.shape[1]} rows"
        result.update(peak_mb=_peak_mb(), extra_mb=_peak_mb() - before)
    else:
        device = torch.device(spec["device"])
        series = torch.from_numpy(stack).to(device)
        angles_t = torch.from_numpy(angles).to(device)
        weighted_backprojection(series[:, :2], angles_t, thickness=4)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() / 2**20
        else:
            before = _start_peak()
        start = time.perf_counter()
        volume = weighted_backprojection(series, angles_t, thickness=thickness)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2**20
            result.update(peak_mb=peak, extra_mb=peak - before)
        else:
            result.update(peak_mb=_peak_mb(), extra_mb=_peak_mb() - before)
        volume = volume.cpu().numpy()
    result.update(seconds=seconds, volume_mb=volume.nbytes / 2**20)
    if spec.get("save"):
        np.save(spec["save"], volume)
    return result


def spawn(spec: dict) -> dict:
    completed = subprocess.run(
        [sys.executable, __file__, "--case", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"case {spec} failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# Driver ---------------------------------------------------------------------------------------


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel() - a.mean()
    b = b.astype(np.float64).ravel() - b.mean()
    return float(a @ b / math.sqrt((a @ a) * (b @ b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 x 256 stack, thickness 76")
    parser.add_argument(
        "--csv", type=Path, default=Path(__file__).with_suffix(".csv"), help="CSV output path"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--numpy-rows",
        type=int,
        default=0,
        help="back-project only this many rows with NumPy at bin 1 and extrapolate (0: all)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return

    import torch

    from deepdewedge.reconstruct.binning import bin_images

    sizes = QUICK if args.quick else FULL
    size, thickness, factor = sizes["size"], sizes["thickness"], sizes["bin"]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        generator = torch.Generator().manual_seed(args.seed)
        stack = torch.randn(N_TILTS, size, size, generator=generator)
        start = time.perf_counter()
        binned = bin_images(stack, factor, method="fourier")
        binning_s = time.perf_counter() - start
        inputs = {1: Path(tmp) / "bin1.npy", factor: Path(tmp) / f"bin{factor}.npy"}
        np.save(inputs[1], stack.numpy())
        np.save(inputs[factor], binned.numpy())
        del stack, binned
        for case_bin, case_thickness in ((factor, thickness // factor), (1, thickness)):
            h = size // case_bin
            saved = {}
            for implementation, device in [("torch", d) for d in devices] + [("numpy", "cpu")]:
                spec = {
                    "implementation": implementation,
                    "device": device,
                    "input": str(inputs[case_bin]),
                    "thickness": case_thickness,
                    "threads": args.threads,
                }
                if implementation == "numpy" and case_bin == 1 and 0 < args.numpy_rows < h:
                    spec["rows"] = args.numpy_rows
                if case_bin == factor:
                    saved[(implementation, device)] = spec["save"] = str(
                        Path(tmp) / f"{implementation}-{device}.npy"
                    )
                result = spawn(spec)
                rows.append(
                    {
                        "case": f"bin {case_bin}",
                        "implementation": implementation,
                        "device": device,
                        "stack": f"{N_TILTS}x{h}x{h}",
                        "volume": f"{case_thickness}x{h}x{h}",
                        "seconds": round(result["seconds"], 3),
                        "timing": result.get("timing", "measured"),
                        "peak_mb": round(result["peak_mb"], 1),
                        "extra_mb": round(result["extra_mb"], 1),
                        "volume_mb": round(result["volume_mb"], 1),
                    }
                )
            if saved:
                reference = np.load(saved[("torch", "cpu")])
                agreement = {
                    f"{impl}-{dev}": correlation(np.load(path), reference)
                    for (impl, dev), path in saved.items()
                    if (impl, dev) != ("torch", "cpu")
                }

    threads = args.threads or torch.get_num_threads()
    print(
        f"## Weighted back-projection, {N_TILTS} tilts ±{TILT_RANGE_DEG:g}°, random projections "
        f"({threads} torch threads, {os.cpu_count()} CPUs)\n"
    )
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in COLUMNS) + " |")
    print(
        f"\nFourier binning {N_TILTS}x{size}x{size} -> {size // factor}x{size // factor}: "
        f"{binning_s:.3f} s. Agreement with torch-cpu at bin {factor} (CC): "
        + ", ".join(f"{k} {v:.6f}" for k, v in agreement.items())
    )
    print(
        "peak_mb: peak resident memory of the case's process (CUDA: peak allocated on the "
        "GPU); extra_mb: peak minus the memory held just before the reconstruction."
    )
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with args.csv.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"CSV: {args.csv}")


if __name__ == "__main__":
    main()
