"""Fitting and refinement speed: our device-side pipeline against a reference-style one.

Sections, all measured in the same run on the same machine:

(a) **Fitting throughput** (samples/s) of one optimisation step (batch building, U-Net forward
    and backward, masked Fourier loss, Adam) for sub-tomograms of 64³ and 96³ and U-Nets of 32
    and 64 channels (3 down-sampling layers):

    * ``ours``: the sub-tomogram banks sit on the device; each batch is rotated in one
      batched cubic B-spline interpolation, the rotated wedge masks are computed analytically
      on rotated frequencies, the loss uses ``rfftn``, and on CUDA the U-Net runs under bf16
      autocast.
    * ``reference``: the data path of the published implementation, rewritten here for the
      comparison: a ``DataLoader`` whose workers rotate each enlarged (√2 margin) sub-tomogram
      pair and a voxelised, fft-shifted wedge mask with SciPy's cubic spline
      (``scipy.ndimage.affine_transform``, ``order=3``) on the CPU, one sample at a time, mask
      the input with a full ``fftn``, and hand the batch to the device, where the U-Net runs in
      fp32 and the loss uses a full ``fftn``.

(b) **Arithmetic**: the U-Net's FLOPs per sample for one training step (forward + backward,
    counted by ``torch.utils.flop_counter``) and, on a known GPU, the achieved fraction of its
    dense bf16 tensor-core peak.

(c) **Refinement**: wall time and peak host (``VmHWM``) and GPU memory of ``ddw
    refine-tomogram``'s library path for whole tomograms (default 256×512×512 and
    300×1024×1024, plus 464×928×928 with ``--large``), each in its own subprocess, with
    memory-mapped input and output.

(d) **Scaling** of fitting from 1 to 2 ranks (``torch.distributed``: gloo on CPU, nccl on GPUs).

Run: ``python benchmarks/speed.py [--quick] [--device cuda] [--csv PATH]``. ``--quick`` uses
small sizes that finish in a few minutes on a laptop CPU. Prints markdown tables and writes all
rows to one CSV (default: ``benchmarks/speed.csv``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from deepdewedge.fit.bank import bank_size
from deepdewedge.fit.batch import make_batch
from deepdewedge.fit.loss import loss_weights, masked_fourier_loss
from deepdewedge.fourier import missing_wedge_mask, wedge_test
from deepdewedge.model.denormals import flush_denormals
from deepdewedge.model.unet import DeWedgeModel
from deepdewedge.pipeline.common import write_csv
from deepdewedge.rotation import sample_rotations

MW_ANGLE_DEG = 60.0
# Dense bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets (without sparsity).
BF16_PEAK_TFLOPS = {
    "H200": 989.4,
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "A100": 312.0,
    "L40S": 362.1,
    "L40": 181.0,
}


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in BF16_PEAK_TFLOPS.items():
        if key in name:
            return peak
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# (a) reference-style data path ----------------------------------------------------------------


def _voxel_wedge_mask(size: int) -> np.ndarray:
    """Full-grid, fft-shifted wedge mask `(s, s, s)` (1 where the data were measured)."""
    k = (np.arange(size) - size // 2).astype(np.float64)
    kzyx = torch.from_numpy(np.stack(np.meshgrid(k, k, k, indexing="ij"), axis=-1))
    half = (180.0 - MW_ANGLE_DEG) / 2
    return wedge_test(kzyx, tilt_range_deg=(-half, half)).numpy().astype(np.float32)


def _rotate_cubic(volume: np.ndarray, rotmat: np.ndarray, size: int) -> np.ndarray:
    """Rotate `volume` (n, n, n) about its centre with a cubic spline, then centre-crop to s."""
    from scipy.ndimage import affine_transform

    centre = (np.array(volume.shape) - 1) / 2
    rotated = affine_transform(
        volume, rotmat.T, offset=centre - rotmat.T @ centre, order=3, mode="constant"
    )
    lo = (volume.shape[0] - size) // 2
    return rotated[lo : lo + size, lo : lo + size, lo : lo + size]


class ReferenceDataset(torch.utils.data.Dataset):
    """Per-sample CPU rotation of a sub-tomogram pair and of the voxel wedge mask."""

    def __init__(self, crops0: np.ndarray, crops1: np.ndarray, size: int, seed: int) -> None:
        self.crops0, self.crops1, self.size, self.seed = crops0, crops1, size, seed
        self.mask = _voxel_wedge_mask(size)

    def __len__(self) -> int:
        return 1 << 30

    def __getitem__(self, index: int):
        generator = torch.Generator().manual_seed(self.seed + index)
        rotmat = sample_rotations(1, generator=generator)[0].double().numpy()
        i = index % len(self.crops0)
        sub0 = _rotate_cubic(self.crops0[i], rotmat, self.size)
        sub1 = _rotate_cubic(self.crops1[i], rotmat, self.size)
        rot_mask = np.clip(_rotate_cubic(self.mask, rotmat, self.size), 0.0, 1.0)
        spectrum = np.fft.fftshift(np.fft.fftn(sub0))
        model_input = np.fft.ifftn(np.fft.ifftshift(spectrum * self.mask)).real
        return (
            torch.from_numpy(model_input.astype(np.float32))[None],
            torch.from_numpy(np.ascontiguousarray(sub1, dtype=np.float32))[None],
            torch.from_numpy(rot_mask),
        )


def reference_loss(output, target, mask, rot_mask) -> torch.Tensor:
    """Eq. (2) with a full complex FFT and fft-shifted voxel masks."""
    diff = (output - target)[:, 0]
    spectrum = torch.fft.fftshift(
        torch.fft.fftn(diff, dim=(-3, -2, -1), norm="ortho"), (-3, -2, -1)
    )
    weights = rot_mask * (mask + 2.0 * (1.0 - mask))
    return (weights * spectrum.abs().square()).sum(dim=(-3, -2, -1)).mean() / diff[0].numel()


# (a) measurement --------------------------------------------------------------------------------


def _model(chans: int, device: torch.device, channels_last: bool = False) -> DeWedgeModel:
    torch.manual_seed(0)
    model = DeWedgeModel(chans=chans, num_downsample_layers=3).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    return model


def _random_crops(n: int, size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    generator = torch.Generator().manual_seed(n * size)
    return torch.randn(n, size, size, size, generator=generator).to(device)


def measure_ours(
    size: int, chans: int, batch: int, steps: int, device: torch.device, variant: str
) -> dict:
    """Samples/s of our fitting step.

    `variant` is "fp32" or "bf16", optionally with "+channels_last" and/or "+compile".
    """
    model = _model(chans, device, channels_last="channels_last" in variant)
    network = torch.compile(model) if "compile" in variant else model
    optimizer = torch.optim.Adam(model.parameters(), lr=4e-4)
    bank = bank_size(size)
    crops0 = _random_crops(4 * batch, bank, device)
    crops1 = _random_crops(4 * batch + 1, bank, device)
    mw_mask = missing_wedge_mask((size,) * 3, mw_angle_deg=MW_ANGLE_DEG, device=device)
    generator = torch.Generator().manual_seed(0)
    use_bf16 = variant.startswith("bf16")

    def step() -> torch.Tensor:
        idx = torch.randint(len(crops0), (batch,), generator=generator)
        b = make_batch(
            crops0[idx.to(device)],
            crops1[idx.to(device)],
            subtomo_size=size,
            mw_mask=mw_mask,
            mw_angle_deg=MW_ANGLE_DEG,
            rotate=True,
            generator=generator,
        )
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            output = network(b.model_input)
        loss = masked_fourier_loss(output, b.target, loss_weights(mw_mask, b.rot_mw_mask))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return _time_steps(step, batch, steps, device)


def measure_reference(
    size: int, chans: int, batch: int, steps: int, device: torch.device, workers: int
) -> dict:
    """Samples/s of the reference-style pipeline: CPU workers rotate, the device fits in fp32."""
    model = _model(chans, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=4e-4)
    enlarged = math.ceil(size * math.sqrt(2))
    enlarged += enlarged % 2
    dataset = ReferenceDataset(
        _random_crops(4 * batch, enlarged).numpy(),
        _random_crops(4 * batch + 1, enlarged).numpy(),
        size,
        seed=0,
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers > 0 else None,
    )
    batches = iter(loader)
    mask = torch.from_numpy(dataset.mask).to(device)

    def step() -> torch.Tensor:
        model_input, target, rot_mask = (t.to(device, non_blocking=True) for t in next(batches))
        output = model(model_input)
        loss = reference_loss(output, target, mask, rot_mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return _time_steps(step, batch, steps, device)


def _time_steps(step, batch: int, steps: int, device: torch.device) -> dict:
    warmup = 2
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    float(loss)
    _sync(device)
    seconds = time.perf_counter() - start
    row = {"samples_per_s": steps * batch / seconds, "step_ms": 1e3 * seconds / steps}
    if device.type == "cuda":
        row["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row


def training_flops_per_sample(size: int, chans: int) -> float:
    """FLOPs of one forward + backward pass of the U-Net for one `(1, 1, s, s, s)` sample."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _model(chans, torch.device("meta"))
    x = torch.empty(1, 1, size, size, size, device="meta")
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return float(counter.get_total_flops())


def fitting_rows(args, device: torch.device) -> list[dict]:
    rows = []
    peak = device_peak_tflops(device)
    variants = ["fp32"]
    if device.type == "cuda":
        variants += ["bf16", "bf16+channels_last", "bf16+compile"]
    for size in args.sizes:
        for chans in args.chans:
            flops = training_flops_per_sample(size, chans)
            base = {"section": "fit", "device": _device_name(device), "subtomo": size}
            base |= {"chans": chans, "batch": args.batch, "tflop_per_sample": flops / 1e12}
            ref = measure_reference(size, chans, args.batch, args.steps, device, args.workers)
            rows.append(base | {"pipeline": f"reference ({args.workers} workers)"} | ref)
            for variant in variants:
                ours = measure_ours(size, chans, args.batch, args.steps, device, variant)
                ours["speedup"] = ours["samples_per_s"] / ref["samples_per_s"]
                if peak is not None:
                    achieved = ours["samples_per_s"] * flops / 1e12
                    ours["peak_fraction"] = achieved / peak
                rows.append(base | {"pipeline": f"ours {variant}"} | ours)
                print(
                    f"fit {size}³ chans {chans}: reference {ref['samples_per_s']:.3g}, "
                    f"ours {variant} {ours['samples_per_s']:.3g} samples/s",
                    file=sys.stderr,
                )
    return rows


# (c) refinement of whole tomograms ---------------------------------------------------------------


def refinement_rows(args, device: torch.device) -> list[dict]:
    """Run ``refine_memory.py`` (the pipeline's refinement of a pair of halves) per shape."""
    import json
    import subprocess

    script = Path(__file__).with_name("refine_memory.py")
    if args.quick:
        shapes, model = [(128, 256, 256), (256, 512, 512)], ["--chans", "4", "--depth", "1"]
    else:
        shapes = [(256, 512, 512), (300, 1024, 1024)] + ([(464, 928, 928)] if args.large else [])
        model = ["--chans", "64", "--depth", "3"]
    rows = []
    for shape in shapes:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            cmd = [sys.executable, str(script), "--dir", tmp, "--json", str(out)]
            cmd += ["--shape", *map(str, shape), "--subtomo-size", "96", "--overlap", "32"]
            cmd += ["--batch-size", str(args.refine_batch), *model]
            if device.type == "cuda":
                cmd += ["--gpu", *map(str, range(args.refine_gpus))]
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            result = json.loads(out.read_text())
        tomo_mib = result["tomogram_mib"]
        row = {"section": "refine", "device": _device_name(device), "subtomo": 96}
        row |= {"chans": int(model[1]), "batch": args.refine_batch}
        row |= {"tomogram": "×".join(map(str, shape)), "seconds": result["seconds"]}
        row |= {"tomogram_mb": tomo_mib * 1.048576}
        anon = result["peak RssAnon - RssAnon before"]
        row |= {"host_anon_peak_mb": anon * 1.048576, "host_anon_per_tomogram": anon / tomo_mib}
        peak = result["peak VmHWM (ru_maxrss), incl. mapped file pages"]
        row |= {"host_rss_peak_mb": peak * 1.048576, "host_rss_per_tomogram": peak / tomo_mib}
        if "peak GPU memory allocated (per GPU)" in result:
            row["peak_gpu_mb"] = result["peak GPU memory allocated (per GPU)"] * 1.048576
        rows.append(row)
        print(f"refine {row['tomogram']}: {row['seconds']:.1f} s", file=sys.stderr)
    return rows


# (d) scaling from 1 to 2 ranks ------------------------------------------------------------------


def scaling_rows(args, device: torch.device, workdir: Path) -> list[dict]:
    """Wall time of ``ddw fit-model`` under ``torchrun`` with 1 and 2 processes, same seed."""
    import subprocess

    from deepdewedge import prepare_data
    from deepdewedge.config import step_config
    from deepdewedge.io.mrc import write_volume
    from deepdewedge.simulate import simulate_tomogram

    size, chans, batch, epochs = (32, 8, 8, 3) if args.quick else (64, 32, 16, 3)
    shape = (64, 192, 192) if args.quick else (128, 384, 384)
    sim = simulate_tomogram(shape, snr=0.5, generator=torch.Generator().manual_seed(0))
    files = {h: write_volume(workdir / f"{h}.mrc", sim[h].numpy()) for h in ("tomo0", "tomo1")}
    project = workdir / "project"
    prepared = prepare_data(
        step_config(
            "prepare_data",
            overrides={
                "project_dir": project,
                "tomo0_files": [files["tomo0"]],
                "tomo1_files": [files["tomo1"]],
                "subtomo_size": size,
                "subtomo_extraction_strides": [size // 2] * 3,
                "val_fraction": 0.1,
                "overwrite": True,
            },
        )
    )
    n_fit = int(prepared["n_fitting"])
    cores = os.cpu_count() or 1
    rows = []
    for world in (1, 2):
        if device.type == "cuda" and torch.cuda.device_count() < world:
            print(f"scaling: {world} ranks need {world} GPUs, skipped", file=sys.stderr)
            continue
        logdir = workdir / f"logs_{world}"
        config = workdir / f"fit_{world}.yaml"
        gpu = list(range(world)) if device.type == "cuda" else "null"
        config.write_text(
            "fit_model:\n"
            f"  project_dir: {project}\n  logdir: {logdir}\n  subtomo_size: {size}\n"
            f"  unet_params_dict: {{chans: {chans}, num_downsample_layers: 3}}\n"
            f"  num_epochs: {epochs}\n  batch_size: {batch}\n  gpu: {gpu}\n"
            "  check_val_every_n_epochs: 1000\n  save_model_every_n_epochs: null\n"
            f"  precision: {'bf16-mixed' if device.type == 'cuda' else '32'}\n"
            "  overwrite: true\n"
        )
        threads = str(max(1, cores // world)) if device.type == "cpu" else "4"
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc_per_node", str(world), "-m", "deepdewedge.cli", "fit-model"]
        cmd += ["--config", str(config)]
        start = time.perf_counter()
        result = subprocess.run(cmd, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
        losses = (logdir / "losses.csv").read_text().splitlines()[-1].split(",")
        row = {"section": "scaling", "device": _device_name(device), "subtomo": size}
        row |= {"chans": chans, "batch": batch, "ranks": world, "threads_per_rank": threads}
        row |= {"epochs": epochs, "seconds": seconds, "last_fitting_loss": float(losses[1])}
        row["samples_per_s"] = n_fit * epochs / seconds
        rows.append(row)
    base = rows[0]["seconds"] if rows else None
    for row in rows:
        row["speedup"] = base / row["seconds"]
    return rows


# Output -------------------------------------------------------------------------------------------


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def _markdown(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [_fmt(row.get(c)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes for a CPU")
    parser.add_argument("--sections", default="fit,refine,scaling")
    parser.add_argument("--workers", type=int, default=None, help="reference loader workers")
    parser.add_argument("--large", action="store_true", help="also refine 464×928×928")
    parser.add_argument("--refine-batch", type=int, default=8, help="tiles per forward pass")
    parser.add_argument("--refine-gpus", type=int, default=1, help="GPUs sharing the tiles")
    parser.add_argument("--csv", type=Path, default=Path(__file__).with_name("speed.csv"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
        args.sizes, args.chans, args.batch, args.steps = [32, 48], [8, 16], 2, 6
    else:
        args.sizes, args.chans, args.batch, args.steps = [64, 96], [32, 64], 4, 10
    if args.workers is None:
        args.workers = max(1, min(8, (os.cpu_count() or 2) - 1))
    sections = set(args.sections.split(","))
    rows: list[dict] = []
    if "fit" in sections:
        with flush_denormals():  # as in ddw fit-model; both pipelines share the U-Net
            rows += fitting_rows(args, device)
        print(_markdown([r for r in rows if r["section"] == "fit"]))
    if "refine" in sections:
        rows += refinement_rows(args, device)
        print(_markdown([r for r in rows if r["section"] == "refine"]))
    if "scaling" in sections:
        with tempfile.TemporaryDirectory() as tmp:
            rows += scaling_rows(args, device, Path(tmp))
        print(_markdown([r for r in rows if r["section"] == "scaling"]))
    write_csv(args.csv, rows)
    print(f"wrote {args.csv}", file=sys.stderr)


if __name__ == "__main__":
    main()
