"""Peak host memory of ``ddw prepare-data`` and ``ddw fit-model`` against the number of tomograms.

For each number of tomograms N, writes N pairs of random half tomograms, then in a child
process (so that nothing else counts) prepares their sub-tomogram banks and fits a tiny U-Net
on them for two epochs, with a missing-wedge update at the second, on the CPU. A thread
samples ``/proc/self/status`` every few milliseconds and reports, above what the process
holds after its imports:

* the peak of ``RssAnon`` while preparing and while fitting: the process's own memory
  (arrays, tensors), which the operating system cannot drop; with banks loaded whole it
  grows with the banks, with banks written and read in pieces it does not;
* the peak of ``RssFile`` while fitting: pages of mapped files (the banks among them), which
  are page cache the operating system may drop; they are released after every batch.

Run: ``python benchmarks/bank_memory.py [--tomograms 2 8 32] [--shape D H W]
[--subtomo-size S] [--dir FOLDER]``. Linux only (``/proc``). With the defaults about two
minutes on two CPU cores; the N = 32 banks take about 1.3 GB of disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from memory_sampler import Sampler, status_kib

MIB = 1 << 20


def write_halves(folder: Path, n: int, shape: tuple[int, int, int]) -> list[tuple[Path, Path]]:
    """Write `n` pairs of half tomograms (signal plus independent noise) into `folder`."""
    import mrcfile

    rng = np.random.default_rng(0)
    pairs = []
    for i in range(n):
        signal = rng.standard_normal(shape, dtype=np.float32)
        pair = []
        for half in (0, 1):
            path = folder / f"t{i:03d}_tomo{half}.mrc"
            with mrcfile.new(path, overwrite=True) as mrc:
                mrc.set_data(signal + rng.standard_normal(shape, dtype=np.float32))
                mrc.voxel_size = 10.0
            pair.append(path)
        pairs.append((pair[0], pair[1]))
    return pairs


def _child(spec: dict) -> dict:
    """Prepare and fit as `spec` says, in this process; the peaks (MiB) above the imports."""
    import torch

    from deepdewedge import fit_model, prepare_data
    from deepdewedge.config import step_config

    torch.set_num_threads(spec["threads"])
    project = Path(spec["project"])
    shared = {"project_dir": project, "subtomo_size": spec["subtomo_size"], "seed": 0}
    prepare = step_config(
        "prepare_data",
        overrides={
            **shared,
            "tomo0_files": spec["tomo0_files"],
            "tomo1_files": spec["tomo1_files"],
            "val_fraction": 0.1,
            "overwrite": True,
        },
    )
    fit = step_config(
        "fit_model",
        overrides={
            **shared,
            "unet_params_dict": {"chans": 4, "num_downsample_layers": 1},
            "num_epochs": 2,
            "batch_size": spec["batch_size"],
            "update_subtomo_missing_wedges_every_n_epochs": 1,
            "check_val_every_n_epochs": 1,
            "interpolation": "linear",
            "precision": "32",
            "overwrite": True,
        },
    )
    sampler = Sampler()
    sampler.start()
    base = status_kib(Sampler.FIELDS)
    sampler.take()
    started = time.perf_counter()
    prepare_data(prepare)
    prepared = time.perf_counter()
    prepare_peak = sampler.take()
    fit_model(fit)
    fitted = time.perf_counter()
    fit_peak = sampler.take()
    sampler.done.set()
    sampler.join()
    bank_bytes = sum(f.stat().st_size for f in (project / "subtomos").rglob("*.npy"))
    return {
        "tomograms": len(spec["tomo0_files"]),
        "bank_mib": bank_bytes / MIB,
        "prepare_rss_anon_mib": (prepare_peak["RssAnon"] - base["RssAnon"]) / 1024,
        "fit_rss_anon_mib": (fit_peak["RssAnon"] - base["RssAnon"]) / 1024,
        "fit_rss_file_mib": (fit_peak["RssFile"] - base["RssFile"]) / 1024,
        "prepare_s": prepared - started,
        "fit_s": fitted - prepared,
    }


def measure(
    folder: Path,
    n: int,
    *,
    shape: tuple[int, int, int] = (48, 48, 48),
    subtomo_size: int = 16,
    batch_size: int = 4,
    threads: int = 1,
    env: dict[str, str] | None = None,
) -> dict:
    """Write `n` tomogram pairs into `folder`, prepare and fit them in a child process.

    Returns the child's record: ``tomograms``, ``bank_mib`` (the four bank files on disk),
    ``prepare_rss_anon_mib``, ``fit_rss_anon_mib``, ``fit_rss_file_mib`` (peaks above the
    child's memory after its imports), ``prepare_s`` and ``fit_s``. `env` is the child's
    environment (default: this one's).
    """
    folder.mkdir(parents=True, exist_ok=True)
    pairs = write_halves(folder, n, shape)
    spec = {
        "project": str(folder / "proj"),
        "tomo0_files": [str(p[0]) for p in pairs],
        "tomo1_files": [str(p[1]) for p in pairs],
        "subtomo_size": subtomo_size,
        "batch_size": batch_size,
        "threads": threads,
    }
    child_env = {**(os.environ if env is None else env), "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=child_env,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"child failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict]:
    """Print the table of peak memory against the number of tomograms; return its rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tomograms", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--shape", type=int, nargs=3, default=[48, 96, 96])
    parser.add_argument("--subtomo-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="keep the files here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(_child(json.loads(args.child))))
        return []
    root = args.dir or Path(tempfile.mkdtemp(prefix="ddw-bank-memory-"))
    rows = []
    try:
        for n in args.tomograms:
            rows.append(
                measure(
                    root / f"n{n}",
                    n,
                    shape=tuple(args.shape),
                    subtomo_size=args.subtomo_size,
                    batch_size=args.batch_size,
                    threads=args.threads,
                )
            )
            if args.dir is None:
                shutil.rmtree(root / f"n{n}")
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    d, h, w = args.shape
    print(
        f"tomograms {d}x{h}x{w}, subtomo_size {args.subtomo_size}, 2 epochs (one wedge "
        f"update), batch {args.batch_size}, {args.threads} threads; peaks above the imports\n"
    )
    print(
        "| tomograms | banks on disk (MiB) | prepare: peak RssAnon (MiB) | fit: peak RssAnon "
        "(MiB) | fit: peak RssFile (MiB) | prepare (s) | fit (s) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['tomograms']} | {r['bank_mib']:.0f} | {r['prepare_rss_anon_mib']:.0f} | "
            f"{r['fit_rss_anon_mib']:.0f} | {r['fit_rss_file_mib']:.0f} | "
            f"{r['prepare_s']:.1f} | {r['fit_s']:.1f} |"
        )
    return rows


if __name__ == "__main__":
    main()
