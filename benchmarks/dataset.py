"""A simulated dataset from end to end: AreTomo3 folder and RELION-5 project, kill, broken file.

1. Simulates ``--n`` tomograms (blob phantoms, SNR 1/4, tilt ranges -60…60, -50…65 and
   -55…55 in turn) with their ground truth, and lays them out twice, as AreTomo3 writes
   them (``{TS}_EVN_Vol.mrc``, ``{TS}_ODD_Vol.mrc``, ``{TS}_Vol.mrc``, ``{TS}_TLT.txt``) and
   as a RELION-5 project (``tomograms.star`` with half-tomogram columns, one tilt-series STAR
   per tomogram). The odd half of the last tomogram is truncated on purpose.
2. ``ddw run --dataset aretomo3/``: killed with SIGKILL in the middle of the fit, then run
   again with the same command, which resumes the fit and refines every tomogram; the
   broken one is reported and the exit status is 1.
3. ``ddw run --dataset relion/.../tomograms.star``: fitted and refined again from the RELION-5
   layout, with a ``tomograms.star`` whose reconstructed-tomogram column points at the refined
   maps; then ``ddw refine-tomogram --dataset`` of the same STAR with the model of 2.
4. Peak memory (``ru_maxrss`` of the ``ddw`` process) of dataset runs over 2 and all
   tomograms, fitting (2 epochs) on 2 of them and on all of them.

Prints tables (CC with the ground truth of each tomogram, timings, peak memory) and writes
them to ``--output`` (default ``benchmarks/dataset_results``). About 15 minutes on 2 CPU
cores with the defaults.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from deepdewedge.evaluate.metrics import correlation_coefficient
from deepdewedge.io.mrc import read_volume, write_volume
from deepdewedge.io.relion import read_star
from deepdewedge.simulate import simulate_tomogram

TILT_RANGES = [(-60.0, 60.0), (-50.0, 65.0), (-55.0, 55.0)]
TILT_STEP = 3.0
VOXEL = 10.0
CONFIG = """
prepare_data:
  subtomo_size: 32
  subtomo_extraction_strides: [16, 32, 32]
  val_fraction: 0.1
fit_model:
  unet_params_dict: {{chans: 8, num_downsample_layers: 2}}
  adam_params_dict: {{lr: 0.001}}
  num_epochs: {epochs}
  batch_size: 8
  check_val_every_n_epochs: 1
  update_subtomo_missing_wedges_every_n_epochs: 10
refine_tomogram:
  subtomo_overlap: 8
"""


def simulate(root: Path, n: int, shape: tuple[int, int, int]) -> dict[str, Path]:
    """Ground truths and the two layouts of `n` simulated tomograms; ground truth by name."""
    aretomo, relion = root / "aretomo3", root / "relion"
    truths = {}
    rows = []
    for i in range(n):
        name = f"TS_{i + 1:02d}"
        lo, hi = TILT_RANGES[i % len(TILT_RANGES)]
        sim = simulate_tomogram(
            shape,
            tilt_range_deg=(lo, hi),
            tilt_step_deg=TILT_STEP,
            snr=0.25,
            filter="hamming",
            full_filter="sirt",
            generator=torch.Generator().manual_seed(100 + i),
        )
        truths[name] = write_volume(root / "truth" / f"{name}.mrc", sim["ground_truth"].numpy())
        volumes = {"EVN": sim["tomo0"], "ODD": sim["tomo1"], "": sim["tomo_full"]}
        for tag, volume in volumes.items():
            stem = f"{name}_{tag}_Vol" if tag else f"{name}_Vol"
            write_volume(aretomo / f"{stem}.mrc", volume.numpy(), voxel_size=VOXEL)
        angles = sim["tilt_angles_deg"].tolist()
        # AreTomo3's _TLT.txt: tilt, acquisition index, dose per image (e/Å²).
        (aretomo / f"{name}_TLT.txt").write_text(
            "".join(f"{a:8.2f} {k + 1:4d} {3.0:6.2f}\n" for k, a in enumerate(angles))
        )
        half = relion / "Tomograms" / "job010" / "tomograms"
        half.mkdir(parents=True, exist_ok=True)
        for tag, label in (("EVN", "half1"), ("ODD", "half2")):
            shutil.copy(aretomo / f"{name}_{tag}_Vol.mrc", half / f"rec_{name}_{label}.mrc")
        shutil.copy(aretomo / f"{name}_Vol.mrc", half / f"rec_{name}.mrc")
        ts_star = relion / "Tomograms" / "job010" / "tilt_series" / f"{name}.star"
        ts_star.parent.mkdir(parents=True, exist_ok=True)
        ts_star.write_text(
            f"\n# version 50001\n\ndata_{name}\n\nloop_\n_rlnMicrographName #1\n"
            "_rlnTomoNominalStageTiltAngle #2\n_rlnTomoXTilt #3\n_rlnTomoYTilt #4\n"
            "_rlnTomoZRot #5\n_rlnTomoXShiftAngst #6\n_rlnTomoYShiftAngst #7\n"
            + "".join(
                f"MotionCorr/job002/frames/{name}_{a:.1f}.mrc {a:.2f} 0.0 {a:.2f} 85.0 0.0 0.0\n"
                for a in angles
            )
        )
        rows.append(
            f"{name} {VOXEL:.3f} Tomograms/job010/tilt_series/{name}.star "
            f"Tomograms/job010/tomograms/rec_{name}.mrc "
            f"Tomograms/job010/tomograms/rec_{name}_half1.mrc "
            f"Tomograms/job010/tomograms/rec_{name}_half2.mrc\n"
        )
    (relion / "Tomograms" / "job010" / "tomograms.star").write_text(
        "\n# version 50001\n\ndata_global\n\nloop_\n_rlnTomoName #1\n"
        "_rlnTomoTomogramBinning #2\n_rlnTomoTiltSeriesStarFile #3\n"
        "_rlnTomoReconstructedTomogram #4\n_rlnTomoReconstructedTomogramHalf1 #5\n"
        "_rlnTomoReconstructedTomogramHalf2 #6\n" + "".join(rows)
    )
    last = sorted(truths)[-1]
    for broken in (
        aretomo / f"{last}_ODD_Vol.mrc",
        half / f"rec_{last}_half2.mrc",
    ):
        broken.write_bytes(broken.read_bytes()[:4096])
    return truths


def ddw(*args: object, cwd: Path | None = None, kill_when=None) -> tuple[int, float, float, str]:
    """Run ``ddw`` in a child process: exit status, seconds, peak RSS in MB, output.

    With `kill_when` (a function of no arguments), the child is killed with SIGKILL as soon
    as it returns True.
    """
    command = [sys.executable, "-m", "deepdewedge.cli", *map(str, args)]
    started = time.perf_counter()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"ddw_bench_{os.getpid()}.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(command, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT)
        while kill_when is not None and process.poll() is None:
            if kill_when():
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.2)
        _, status, usage = os.wait4(process.pid, 0)
    output = log.read_text()
    code = os.waitstatus_to_exitcode(status)
    return code, time.perf_counter() - started, usage.ru_maxrss / 1024, output


def quality(
    truths: dict[str, Path], aretomo: Path, refined_dirs: dict[str, Path]
) -> list[dict[str, object]]:
    """CC with the ground truth of the full tomogram and each refined one, per tomogram."""
    rows = []
    for name, truth_file in sorted(truths.items()):
        truth, _ = read_volume(truth_file)
        full, _ = read_volume(aretomo / f"{name}_Vol.mrc")
        row: dict[str, object] = {"tomogram": name, "full": correlation_coefficient(full, truth)}
        for label, folder in refined_dirs.items():
            refined = folder / f"{name}_refined.mrc"
            row[label] = (
                correlation_coefficient(read_volume(refined)[0], truth)
                if refined.exists()
                else float("nan")
            )
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("benchmarks/dataset_results"))
    parser.add_argument("--n", type=int, default=6, help="Tomograms in the dataset.")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--shape", type=int, nargs=3, default=[48, 96, 96])
    args = parser.parse_args()
    root = args.output.resolve()
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    truths = simulate(root, args.n, tuple(args.shape))
    print(f"simulated {args.n} tomograms {tuple(args.shape)} in {time.perf_counter() - t0:.0f} s")
    config = root / "config.yaml"
    config.write_text(CONFIG.format(epochs=args.epochs))
    short = root / "config_2_epochs.yaml"
    short.write_text(CONFIG.format(epochs=2))

    project = root / "project_aretomo3"
    losses = project / "logs" / "losses.csv"

    def mid_fit() -> bool:
        return losses.exists() and len(losses.read_text().splitlines()) > args.epochs // 2

    run = ("run", "--config", config, "--dataset", root / "aretomo3", "--project-dir", project)
    code, killed_after, _, _ = ddw(*run, kill_when=mid_fit)
    epochs_before = len(losses.read_text().splitlines()) - 1
    print(f"killed after {killed_after:.0f} s (exit {code}), {epochs_before} epochs fitted")
    code, seconds, peak, output = ddw(*run)
    print(output.strip().splitlines()[-3:])
    print(f"rerun: exit status {code} in {seconds:.0f} s, peak RSS {peak:.0f} MB")
    checkpoint = next(
        line.split("model: ", 1)[1] for line in output.splitlines() if line.startswith("model: ")
    )

    relion_project = root / "project_relion"
    star_run = ("--config", config, "--dataset", "Tomograms/job010/tomograms.star")
    code_r, seconds_r, peak_r, output_r = ddw(
        "run", *star_run, "--project-dir", relion_project, cwd=root / "relion"
    )
    print(f"RELION-5: exit status {code_r} in {seconds_r:.0f} s, peak RSS {peak_r:.0f} MB")
    print(output_r.strip().splitlines()[-4:])
    code_m, seconds_m, _, _ = ddw(
        "refine-tomogram", *star_run, "--project-dir", root / "project_relion_aretomo3_model",
        "--model-checkpoint-file", checkpoint, cwd=root / "relion",
    )  # fmt: skip
    print(f"RELION-5 refined with the AreTomo3 run's model: exit {code_m} in {seconds_m:.0f} s")
    star = read_star(relion_project / "tomograms.star")[0]
    column = star.columns.index("rlnTomoReconstructedTomogram")
    print("tomograms.star now points at:", *(row[column] for _, row in star.rows[:2]), "...")

    refined_dirs = {
        "AreTomo3 run": project / "refined_tomograms",
        "RELION-5 run": relion_project / "refined_tomograms",
    }
    rows = quality(truths, root / "aretomo3", refined_dirs)
    print("\n| tomogram | tilt range | CC full tomogram | " + " | ".join(refined_dirs) + " |")
    print("|---|---|---|" + "---|" * len(refined_dirs))
    for i, row in enumerate(rows):
        lo, hi = TILT_RANGES[i % len(TILT_RANGES)]
        cells = " | ".join(f"{row[label]:.3f}" for label in refined_dirs)
        print(f"| {row['tomogram']} | {lo:g}…{hi:g}° | {row['full']:.3f} | {cells} |")

    print("\n| tomograms in the dataset | fitted on | peak RSS (MB) | seconds |\n|---|---|---|---|")
    names = sorted(truths)[:-1]  # the broken one left out
    for count in sorted({2, len(names)}):
        subset = root / f"subset_{count}"
        subset.mkdir()
        for name in names[:count]:
            for tag in ("_EVN_Vol", "_ODD_Vol", "_Vol"):
                os.link(root / "aretomo3" / f"{name}{tag}.mrc", subset / f"{name}{tag}.mrc")
            shutil.copy(root / "aretomo3" / f"{name}_TLT.txt", subset)
        for fit_on in ("2", "all"):
            memory_run = [
                "run", "--config", short, "--dataset", subset,
                "--project-dir", root / f"memory_{count}_{fit_on}",
            ]  # fmt: skip
            if fit_on == "2":
                memory_run += ["--fit-on", "2"]
            code_m, seconds_m, peak_m, output_m = ddw(*memory_run)
            if code_m:
                print(output_m)
            print(f"| {count} | {fit_on} | {peak_m:.0f} | {seconds_m:.0f} |")


if __name__ == "__main__":
    main()
