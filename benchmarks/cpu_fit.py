"""CPU fitting speed: the default settings against the earlier float32 whole-batch fit.

For 32³ sub-tomograms with a 16-channel U-Net, 48³ with 16 and 64³ with 32 (3 down-samplings,
batch 8, 4 for 64³), one fitting step exactly as ``ddw fit-model`` runs it (batch building
with rotation and extra wedge, U-Net forward and backward, masked Fourier loss, Adam), under:

* ``before``: float32, the whole batch in one pass, PyTorch's own thread count;
* ``fp32 micro``: float32 in cache-sized micro-batches (`deepdewedge.cpu.cpu_micro_batch`);
* ``bf16``: bf16 autocast, the whole batch (only where the CPU has native bf16);
* ``default``: what ``ddw fit-model`` now chooses: ``precision: auto``, micro-batches and
  `deepdewedge.cpu.set_cpu_threads`.

Columns: samples/s, speed-up over ``before``, the U-Net's arithmetic rate (FLOPs of forward
and backward per sample, counted by ``torch.utils.flop_counter``, times samples/s) and its
fraction of the machine's measured 3D-convolution rate: the best GFLOP/s of one 3×3×3
convolution with the U-Net's first-level channels, forward and backward, at the same precision
and micro-batch. A second table splits the default step into batch building, forward,
backward and Adam.

``--quality`` instead fits DeepDeWedge on the demo's simulated tomogram (``ddw demo``'s
sizes, network and epochs) once in float32 and once in bf16 autocast for each seed, refines
both and prints their CC with the ground truth (all, outside and inside the wedge): bf16 is
the default on CPUs with native bf16 only if it fits as well.

Run: ``python benchmarks/cpu_fit.py [--quick] [--steps N] [--csv PATH]`` (about 15 minutes
on 2 cores; ``--quick``: tiny sizes in seconds, for checking the script);
``python benchmarks/cpu_fit.py --quality [--seeds 3]`` (a few minutes per fit).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from deepdewedge.cpu import cpu_micro_batch, has_native_bf16, set_cpu_threads
from deepdewedge.fit.bank import bank_size
from deepdewedge.fit.batch import make_batch
from deepdewedge.fit.loop import FitSettings, accumulate_gradients
from deepdewedge.fit.loss import loss_weights, masked_fourier_loss
from deepdewedge.fourier import missing_wedge_mask
from deepdewedge.model.denormals import flush_denormals
from deepdewedge.model.unet import DeWedgeModel
from deepdewedge.pipeline.common import resolve_precision, write_csv
from deepdewedge.rotation import sample_rotations

MW_ANGLE_DEG = 60.0
CASES = [(32, 16, 8), (48, 16, 8), (64, 32, 4)]  # sub-tomogram size, channels, batch
QUICK_CASES = [(16, 4, 4)]


def _settings(size: int, batch: int, precision: str, micro: int | None) -> FitSettings:
    return FitSettings(
        subtomo_size=size,
        mw_angle=MW_ANGLE_DEG,
        num_epochs=1,
        batch_size=batch,
        adam_params={"lr": 4e-4},
        seed=0,
        precision=precision,
        micro_batch_size=micro,
    )


class Step:
    """One fitting step on random bank crops, as the fitting loop runs it."""

    def __init__(self, size: int, chans: int, settings: FitSettings) -> None:
        torch.manual_seed(0)
        self.model = DeWedgeModel(chans=chans, num_downsample_layers=3)
        self.optimizer = torch.optim.Adam(self.model.parameters(), **settings.adam_params)
        generator = torch.Generator().manual_seed(0)
        crops = bank_size(size)
        n = settings.batch_size
        self.crops0 = torch.randn(n, crops, crops, crops, generator=generator)
        self.crops1 = self.crops0 + torch.randn(self.crops0.shape, generator=generator)
        self.mw_mask = missing_wedge_mask((size,) * 3, mw_angle_deg=MW_ANGLE_DEG)
        self.generator, self.settings = generator, settings

    def __call__(self) -> None:
        rotmats = sample_rotations(len(self.crops0), generator=self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        accumulate_gradients(
            self.model, self.crops0, self.crops1, rotmats, self.settings, self.mw_mask
        )
        self.optimizer.step()

    def phases(self) -> dict[str, float]:
        """Seconds of batch building, forward, backward and Adam in one whole-batch step."""
        times, start = {}, time.perf_counter()
        rotmats = sample_rotations(len(self.crops0), generator=self.generator)
        batch = make_batch(
            self.crops0,
            self.crops1,
            subtomo_size=self.settings.subtomo_size,
            mw_mask=self.mw_mask,
            mw_angle_deg=MW_ANGLE_DEG,
            rotate=True,
            generator=None,
            rotmats=rotmats,
        )
        times["batch building"], start = time.perf_counter() - start, time.perf_counter()
        bf16 = self.settings.precision == "bf16-mixed"
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            output = self.model(batch.model_input)
        loss = masked_fourier_loss(
            output, batch.target, loss_weights(self.mw_mask, batch.rot_mw_mask)
        )
        times["forward + loss"], start = time.perf_counter() - start, time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        times["backward"], start = time.perf_counter() - start, time.perf_counter()
        self.optimizer.step()
        times["Adam"] = time.perf_counter() - start
        return times


def _seconds_per_step(step, steps: int) -> float:
    step()  # warm-up: oneDNN builds its kernels for these shapes
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def unet_flops_per_sample(size: int, chans: int) -> float:
    """FLOPs of the U-Net's forward and backward pass for one sub-tomogram."""
    from torch.utils.flop_counter import FlopCounterMode

    model = DeWedgeModel(chans=chans, num_downsample_layers=3).to("meta")
    x = torch.empty(1, 1, size, size, size, device="meta")
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return float(counter.get_total_flops())


def conv_gflops(size: int, chans: int, micro: int, precision: str, steps: int) -> float:
    """GFLOP/s of one 3×3×3 convolution `chans`→`chans`, forward and backward."""
    conv = torch.nn.Conv3d(chans, chans, 3, padding=1)
    x = torch.randn(micro, chans, size, size, size, requires_grad=True)
    flops = 3 * 2 * micro * chans * chans * 27 * size**3  # forward, input and weight gradients

    def run() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            y = conv(x)
        y.float().sum().backward()

    return flops / _seconds_per_step(run, steps) / 1e9


def variants(size: int, chans: int, native_bf16: bool) -> list[tuple[str, str, int | None]]:
    """(name, precision, micro-batch or None for the whole batch)."""
    rows = [("before", "32", None), ("fp32 micro", "32", cpu_micro_batch(chans, size, "32"))]
    if native_bf16:
        rows.append(("bf16", "bf16-mixed", None))
    precision = resolve_precision("auto", torch.device("cpu"))
    rows.append(("default", precision, cpu_micro_batch(chans, size, precision)))
    return rows


def quality_rows(seeds: int, workdir: Path) -> list[dict]:
    """CC with the ground truth of demo-sized DeepDeWedge fits in float32 and in bf16."""
    from deepdewedge import pipeline
    from deepdewedge.config import DEMO, step_config
    from deepdewedge.evaluate.metrics import (
        cc_inside_wedge,
        cc_outside_wedge,
        correlation_coefficient,
    )
    from deepdewedge.io.mrc import read_volume, write_volume
    from deepdewedge.simulate import simulate_tomogram

    rows = []
    for seed in range(seeds):
        sim = simulate_tomogram(
            DEMO["shape_zyx"], snr=DEMO["snr"], generator=torch.Generator().manual_seed(seed)
        )
        gt = sim["ground_truth"].numpy()
        data = workdir / f"seed{seed}"
        files = {h: write_volume(data / f"{h}.mrc", sim[h].numpy()) for h in ("tomo0", "tomo1")}
        halves = {"tomo0_files": [files["tomo0"]], "tomo1_files": [files["tomo1"]]}
        shared = {"project_dir": data, "seed": seed, "subtomo_size": DEMO["subtomo_size"]}
        pipeline.prepare_data(
            step_config(
                "prepare_data",
                overrides={
                    **shared,
                    **halves,
                    "subtomo_extraction_strides": DEMO["strides"],
                    "val_fraction": 0.1,
                    "overwrite": True,
                },
            )
        )
        for precision in ("32", "bf16-mixed"):
            started = time.perf_counter()
            fitted = pipeline.fit_model(
                step_config(
                    "fit_model",
                    overrides={
                        **shared,
                        "logdir": data / f"logs_{precision}",
                        "unet_params_dict": DEMO["unet"],
                        "adam_params_dict": {"lr": DEMO["lr"]},
                        "num_epochs": DEMO["num_epochs"],
                        "batch_size": DEMO["batch_size"],
                        "precision": precision,
                        "overwrite": True,
                    },
                )
            )
            fit_s = time.perf_counter() - started
            (path,) = pipeline.refine_tomogram(
                step_config(
                    "refine_tomogram",
                    overrides={
                        **shared,
                        **halves,
                        "model_checkpoint_file": fitted["checkpoint"],
                        "precision": precision,
                        "output_dir": data / f"refined_{precision}",
                        "subtomo_overlap": 8,
                        "overwrite": True,
                    },
                )
            )
            refined = torch.from_numpy(read_volume(path)[0])
            truth = torch.from_numpy(gt)
            row = {"seed": seed, "precision": precision, "fit_s": fit_s}
            row["cc"] = float(correlation_coefficient(refined, truth))
            row["cc_outside_wedge"] = float(cc_outside_wedge(refined, truth, mw_angle_deg=60.0))
            row["cc_inside_wedge"] = float(cc_inside_wedge(refined, truth, mw_angle_deg=60.0))
            rows.append(row)
            print(f"seed {seed} {precision}: CC {row['cc']:.4f}", file=sys.stderr)
    return rows


@flush_denormals()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for checking")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row")
    parser.add_argument("--csv", type=Path, default=Path(__file__).with_name("cpu_fit.csv"))
    parser.add_argument("--quality", action="store_true", help="float32 against bf16 fits")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of --quality")
    args = parser.parse_args()
    if args.quality:
        with tempfile.TemporaryDirectory() as tmp:
            rows = quality_rows(args.seeds, Path(tmp))
        print(_markdown(rows))
        write_csv(args.csv.with_name("cpu_fit_quality.csv"), rows, list(rows[0]))
        return
    torch_threads = torch.get_num_threads()
    native = has_native_bf16()
    rows, phases = [], []
    for size, chans, batch in QUICK_CASES if args.quick else CASES:
        flops = unet_flops_per_sample(size, chans)
        for name, precision, micro in variants(size, chans, native):
            torch.set_num_threads(torch_threads)
            threads = set_cpu_threads() if name == "default" else torch_threads
            step = Step(size, chans, _settings(size, batch, precision, micro))
            seconds = _seconds_per_step(step, args.steps)
            used = min(micro or batch, batch)
            conv = conv_gflops(size, chans, used, precision, args.steps)
            samples = batch / seconds
            row = {"subtomo": size, "chans": chans, "batch": batch, "variant": name}
            row |= {"precision": precision, "micro_batch": used, "threads": threads}
            row |= {"samples_per_s": samples, "step_s": seconds}
            row |= {"unet_gflop_per_s": samples * flops / 1e9, "conv_gflop_per_s": conv}
            row["conv_fraction"] = row["unet_gflop_per_s"] / conv
            rows.append(row)
            print(f"{size}³/{chans} {name}: {samples:.3g} samples/s", file=sys.stderr)
            if name == "default":
                step.settings.micro_batch_size = None
                phases.append({"subtomo": size, "chans": chans, **step.phases()})
        before = next(r for r in rows if r["subtomo"] == size and r["variant"] == "before")
        for row in rows:
            if row["subtomo"] == size:
                row["speedup"] = row["samples_per_s"] / before["samples_per_s"]
    print(f"\nCPU fitting step, {torch_threads} threads, native bf16: {native}\n")
    print(_markdown(rows))
    print("\nDefault step (whole batch) by phase, seconds\n")
    print(_markdown(phases))
    write_csv(args.csv, rows, list(rows[0]))
    print(f"\nwrote {args.csv}")


def _markdown(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))

    def cell(value) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
