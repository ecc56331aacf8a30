"""Peak host memory of ``ddw refine-tomogram`` on a large pair of half tomograms.

Writes two random float32 half tomograms (default 256×512×512, 256 MiB each) in a child
process, saves a small untrained U-Net as a checkpoint, refines the pair with the library path
of ``ddw refine-tomogram`` (average and half-difference map, QC figure, record) on the CPU, and
reports, against the size of one tomogram:

* ``VmHWM`` (= ``ru_maxrss``): the peak resident set, which counts the pages of the
  memory-mapped input and output files that the process has touched;
* the peak of ``RssAnon``, sampled every 10 ms: the process's own memory (arrays, tensors,
  Python, the libraries), which the operating system cannot drop or write back to the files;
* the peak of ``RssFile``, sampled likewise: mapped file pages, which are page cache the
  operating system writes back and drops under memory pressure.

The baselines are taken after the imports and the model are loaded, just before refining.

Run: ``python benchmarks/refine_memory.py [--shape D H W] [--subtomo-size S] [--overlap O]
[--batch-size B] [--dir FOLDER]``. The files (about five tomograms' worth of disk) go to
FOLDER, which is kept, or to a temporary folder, which is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from memory_sampler import Sampler, status_kib

from deepdewedge.config import UNetParams, step_config
from deepdewedge.io.checkpoint import save_checkpoint
from deepdewedge.io.mrc import new_volume
from deepdewedge.pipeline.fitting import build_model
from deepdewedge.pipeline.refining import refine_tomogram

MIB = 1 << 20


def make_halves(folder: Path, shape: tuple[int, int, int]) -> None:
    """Write tomo0.mrc and tomo1.mrc (signal plus independent noise), slab by slab."""
    rng = np.random.default_rng(0)
    for name in ("tomo0", "tomo1"):
        with new_volume(folder / f"{name}.mrc", shape, voxel_size=10.0) as data:
            for z in range(0, shape[0], 8):
                slab = data[z : z + 8]
                signal = np.sin(np.arange(z, z + len(slab)) / 7.0)[:, None, None]
                slab[:] = signal + rng.standard_normal(slab.shape, dtype=np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[256, 512, 512])
    parser.add_argument("--subtomo-size", type=int, default=64)
    parser.add_argument("--overlap", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--chans", type=int, default=4)
    parser.add_argument("--depth", type=int, default=1, help="down-sampling layers")
    parser.add_argument("--gpu", type=int, nargs="*", default=None, help="GPU indices")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--dir", type=Path, default=None, help="keep the files here")
    parser.add_argument("--make-halves", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_halves:
        make_halves(args.dir, tuple(args.shape))
        return
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        measure(args, args.dir)
        return
    folder = Path(tempfile.mkdtemp(prefix="ddw-refine-memory-"))
    try:
        measure(args, folder)
    finally:
        shutil.rmtree(folder)


def measure(args: argparse.Namespace, folder: Path) -> None:
    """Write the halves and a model into `folder`, refine them and print the table."""
    shape = tuple(args.shape)
    # In a child process, so that writing the inputs does not count in this one's peak.
    subprocess.run(
        [sys.executable, __file__, "--make-halves", "--dir", str(folder), "--shape"]
        + [str(n) for n in shape],
        check=True,
    )
    unet = UNetParams(chans=args.chans, num_downsample_layers=args.depth).model_dump(
        exclude={"in_chans", "out_chans"}
    )
    torch.manual_seed(0)
    state = {
        "unet_params": unet,
        "model_state": build_model(unet).state_dict(),
        "subtomo_size": args.subtomo_size,
    }
    checkpoint = save_checkpoint(folder / "model.ckpt", state)
    config = step_config(
        "refine_tomogram",
        overrides={
            "project_dir": folder / "proj",
            "model_checkpoint_file": checkpoint,
            "tomo0_files": [folder / "tomo0.mrc"],
            "tomo1_files": [folder / "tomo1.mrc"],
            "subtomo_overlap": args.overlap,
            "batch_size": args.batch_size,
            "gpu": args.gpu,
            "overwrite": True,
        },
    )

    base = status_kib(("VmRSS", "RssAnon", "RssFile"))
    sampler = Sampler(interval_s=0.01)
    sampler.start()
    started = time.perf_counter()
    refine_tomogram(config)  # type: ignore[arg-type]
    seconds = time.perf_counter() - started
    gpu_peak_mib = None
    if args.gpu:
        gpu_peak_mib = max(torch.cuda.max_memory_allocated(i) for i in args.gpu) / MIB
    sampler.done.set()
    sampler.join()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

    tomo_mib = 4 * int(np.prod(shape)) / MIB
    rows = [
        ("one tomogram (float32)", tomo_mib),
        ("VmRSS before refining", base["VmRSS"] / 1024),
        ("RssAnon before refining", base["RssAnon"] / 1024),
        ("peak VmHWM (ru_maxrss), incl. mapped file pages", peak_kib / 1024),
        ("peak RssAnon", sampler.peak["RssAnon"] / 1024),
        ("peak RssAnon - RssAnon before", (sampler.peak["RssAnon"] - base["RssAnon"]) / 1024),
        ("peak RssFile (mapped file pages)", sampler.peak["RssFile"] / 1024),
    ]
    print(
        f"refined {shape[0]}x{shape[1]}x{shape[2]} halves in {seconds:.1f} s "
        f"(tiles {args.subtomo_size}, overlap {args.overlap}, batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads)\n"
    )
    if gpu_peak_mib is not None:
        rows.append(("peak GPU memory allocated (per GPU)", gpu_peak_mib))
    if args.json is not None:
        record = {"shape": list(shape), "seconds": seconds, "tomogram_mib": tomo_mib}
        record |= {name: mib for name, mib in rows}
        args.json.write_text(json.dumps(record))
    print("| quantity | MiB | × one tomogram |\n|---|---:|---:|")
    for name, mib in rows:
        print(f"| {name} | {mib:.0f} | {mib / tomo_mib:.2f} |")


if __name__ == "__main__":
    main()
