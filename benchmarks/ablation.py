"""Ablation of the fitting and refinement choices on the quality benchmark's data.

For each tilt-series SNR and seed, the data of ``benchmarks/quality.py`` (same simulation,
reconstruction and profile) is fitted once per *fit variant*, and each fit is refined once
per *refinement variant*; every refined tomogram is scored against the ground truth (CC,
CC outside and inside the missing wedge, particle 0.143-FSC). All fits of one run share the
seed, so they start from the same weights and draw the same batches and rotations.

Fit variants (``--variants``):

* ``defaults``: the current defaults. Keeps a checkpoint every epoch, and the CC of
  refinements every ``--curve-every`` epochs goes to ``epochs.csv`` with the validation
  loss, for the CC-against-epochs figure and the early-stopping replay.
* ``old-update-input``: the missing-wedge update predicts from the stored crop as it is
  (after the first update, a crop whose wedge holds the previous fill), as before the fix.
* ``old-val-split``: fitting windows that overlap the validation cluster are dropped, and
  the cluster grows around a random window, as before the fix.
* ``previous``: both of the above (the defaults before the fixes).
* ``residual``: ``unet_params_dict.residual: true``.
* ``symmetric-wedge``: the banks prepared with ``mw_angle: 60``, the symmetric wedge that
  fitting and refinement assumed before the wedge was recorded with the banks (differs from
  ``defaults`` with ``--tilt-range``, e.g. ``-50 65``).
* ``bare``, ``bare-residual``: ``unet_params_dict.affine_equivariant: false`` (the U-Net
  whose instance norms hide each input's mean and contrast), without and with ``residual``.
* ``short``: ``--short-epochs`` epochs (default 20) of the defaults.
* ``cosine``, ``cosine-ema``, ``cosine-2x``: ``--short-epochs`` epochs with the cosine
  learning-rate schedule (``lr_schedule: cosine``); with a weight average of a 2-epoch
  half-life (``ema_half_life_epochs: 2``); with twice the peak learning rate.
* ``short-update5``, ``cosine-update5``: ``--short-epochs`` epochs with a missing-wedge
  update every 5 epochs (as many updates as the defaults make in 40), constant and cosine.

Refinement variants, of ``defaults``: ``mask_tile_wedges`` and ``fitting statistics``
(``recompute_normalization: false``); of ``residual``: both statistics. The earlier
behaviours are reproduced here, by replacing two library functions for the duration of a
fit, not kept in the package.

Results go to ``--output`` (default ``benchmarks/ablation_results``): ``ablation.csv`` (one
row per SNR, seed, fit and refinement), ``epochs.csv``, and a markdown table of mean (worst–
best) over seeds. Finished (SNR, seed, variant) rows are kept and not redone, so variants
can be added to a finished run.

Run: ``python benchmarks/ablation.py`` (CPU profile, 3 SNRs × 3 seeds; about 9 minutes per
SNR and seed on 2 cores) or ``--profile demo --seeds 1 --snr 0.25`` for a quick check.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from quality import MW_ANGLE_DEG, PROFILES

from deepdewedge import pipeline
from deepdewedge.config import step_config
from deepdewedge.fit.bank import SubtomoSelection, _mask_fractions
from deepdewedge.fit.schedule import patience_exhausted
from deepdewedge.fit.wedge_update import _pad_to_multiple
from deepdewedge.fourier import missing_wedge_mask
from deepdewedge.io.mrc import read_volume
from deepdewedge.metrics import cc_inside_wedge, cc_outside_wedge, correlation_coefficient
from deepdewedge.pipeline.common import save_figure, write_csv
from deepdewedge.pipeline.evaluation import evaluate
from deepdewedge.pipeline.simulation import simulate, simulate_config
from deepdewedge.tiling import grid_starts

METRICS = (
    "cc",
    "cc_outside_wedge",
    "cc_inside_wedge",
    "particle_fsc_0143_angstrom",
    "particle_fsc_inside_wedge_0143_angstrom",
)


@dataclass
class FitVariant:
    fit: dict = field(default_factory=dict)
    refines: dict[str, dict] = field(default_factory=lambda: {"": {}})
    old_update_input: bool = False
    old_val_split: bool = False
    short: bool = False
    symmetric_wedge: bool = False
    lr_factor: float = 1.0
    curve: bool = False


OWN_AND_FITTING_STATS = {
    "own statistics": {},
    "fitting statistics": {"recompute_normalization": False},
}
VARIANTS = {
    "defaults": FitVariant(
        refines={
            "": {},
            "mask_tile_wedges": {"mask_tile_wedges": True},
            "fitting statistics": {"recompute_normalization": False},
        },
        curve=True,
    ),
    "old-update-input": FitVariant(old_update_input=True),
    "old-val-split": FitVariant(old_val_split=True),
    "previous": FitVariant(old_update_input=True, old_val_split=True),
    "residual": FitVariant(
        fit={"unet_params_dict": {"residual": True}}, refines=OWN_AND_FITTING_STATS
    ),
    # The wedge as fit and refine assumed it before it was recorded with the banks.
    "symmetric-wedge": FitVariant(symmetric_wedge=True),
    # The U-Net without affine_equivariant, as before it was the default.
    "bare": FitVariant(fit={"unet_params_dict": {"affine_equivariant": False}}),
    "bare-residual": FitVariant(
        fit={"unet_params_dict": {"affine_equivariant": False, "residual": True}},
        refines=OWN_AND_FITTING_STATS,
    ),
    "short": FitVariant(short=True),
    "cosine": FitVariant(fit={"lr_schedule": "cosine"}, short=True),
    "cosine-ema": FitVariant(
        fit={"lr_schedule": "cosine", "ema_half_life_epochs": 2.0}, short=True
    ),
    "cosine-2x": FitVariant(fit={"lr_schedule": "cosine"}, short=True, lr_factor=2.0),
    # As many missing-wedge updates as the 40-epoch defaults make, in half the epochs.
    "short-update5": FitVariant(
        fit={"update_subtomo_missing_wedges_every_n_epochs": 5}, short=True
    ),
    "cosine-update5": FitVariant(
        fit={"lr_schedule": "cosine", "update_subtomo_missing_wedges_every_n_epochs": 5},
        short=True,
    ),
}


def previous_select_subtomos(
    shape_zyx,
    *,
    subtomo_size,
    strides_zyx,
    mask,
    min_nonzero_mask_fraction,
    val_fraction,
    generator,
) -> SubtomoSelection:
    """The validation split before the fix: overlapping fitting windows are dropped."""
    starts = grid_starts(shape_zyx, (subtomo_size,) * 3, strides_zyx)
    if mask is not None:
        starts = starts[_mask_fractions(mask, starts, subtomo_size) >= min_nonzero_mask_fraction]
    n = len(starts)
    n_val = round(val_fraction * n)
    if val_fraction > 0 and n > 1:
        n_val = max(1, min(n_val, n - 1))
    is_val = torch.zeros(n, dtype=torch.bool)
    if n_val:
        anchor = starts[torch.randint(n, (1,), generator=generator)].float()
        jitter = torch.rand(n, generator=generator) * 1e-3
        is_val[((starts.float() - anchor).norm(dim=1) + jitter).argsort()[:n_val]] = True
        diff = (starts[:, None, :] - starts[None, is_val, :]).abs()
        keep = is_val | ~(diff < subtomo_size).all(dim=-1).any(dim=1)
        starts, is_val = starts[keep], is_val[keep]
    return SubtomoSelection(starts=starts, is_val=is_val)


@torch.no_grad()
def previous_fill_missing_wedges(
    model, crops, *, mw_angle_deg=None, tilt_range_deg=None, size_multiple, batch_size, device
) -> torch.Tensor:
    """The wedge update before the fix: the network predicts from the crop as stored."""
    was_training = model.training
    model.eval()
    big = crops.shape[-1]
    mask = missing_wedge_mask(
        (big,) * 3, mw_angle_deg=mw_angle_deg, tilt_range_deg=tilt_range_deg, device=device
    )
    out = torch.empty_like(crops)
    for i in range(0, len(crops), batch_size):
        x = crops[i : i + batch_size].to(device)
        padded, lo = _pad_to_multiple(x[:, None], size_multiple)
        pred = model(padded)[:, 0, lo : lo + big, lo : lo + big, lo : lo + big].float()
        spec = mask * torch.fft.rfftn(x, dim=(-3, -2, -1))
        spec = spec + (1 - mask) * torch.fft.rfftn(pred, dim=(-3, -2, -1))
        out[i : i + batch_size] = torch.fft.irfftn(spec, s=x.shape[-3:], dim=(-3, -2, -1))
    model.train(was_training)
    return out


def prepared(root: Path, snr: float, seed: int, profile: dict) -> dict:
    """Simulate and reconstruct once per SNR and seed (reused when already there)."""
    d, h, w = profile["shape"]
    sim_dir = root / "simulation"
    sim = {
        "tilt_series": sim_dir / "ts.mrc",
        "tilt_angles": sim_dir / "ts.tlt",
        "mdoc": sim_dir / "ts.mrc.mdoc",
        "ground_truth": sim_dir / "ground_truth.mrc",
        "particles": sim_dir / "particles.csv",
    }
    if not (sim_dir / "simulation.json").exists():
        sim = simulate(
            simulate_config(
                output_dir=sim_dir,
                thickness_px=d,
                height_px=h,
                width_px=w,
                tilt_step_deg=2.0,
                tilt_min_deg=profile["tilt_range"][0],
                tilt_max_deg=profile["tilt_range"][1],
                snr=snr,
                seed=seed,
                overwrite=True,
            )
        )
    tomo_dir = root / "tomograms"
    tomos = {k: tomo_dir / f"ts_{k}.mrc" for k in ("tomo0", "tomo1", "full")}
    if not all(p.exists() for p in tomos.values()):
        tomos = pipeline.reconstruct(
            step_config(
                "reconstruct",
                overrides={
                    "project_dir": root,
                    "tilt_series": sim["tilt_series"],
                    "tilt_angles": sim["tilt_angles"],
                    "mdoc": sim["mdoc"],
                    "thickness": d,
                    "filter": "hamming",
                    "full_filter": "hamming",
                    "overwrite": True,
                },
            )
        )
    return {**sim, **tomos}


def wedge(profile: dict) -> dict:
    """Keywords of the simulated missing wedge for ``evaluate``."""
    lo, hi = profile["tilt_range"]
    return {"mw_angle_deg": 180.0 - (hi - lo), "tilt_range_deg": (lo, hi)}


def prepare_banks(
    root: Path, data: dict, seed: int, profile: dict, old_split: bool, symmetric: bool = False
) -> Path:
    name = "subtomos_old_split" if old_split else "subtomos"
    subtomo_dir = root / (name + "_symmetric" if symmetric else name)
    if (subtomo_dir / "metadata.json").exists():
        return subtomo_dir
    patch = (
        mock.patch("deepdewedge.pipeline.prepare.select_subtomos", previous_select_subtomos)
        if old_split
        else contextlib.nullcontext()
    )
    with patch:
        pipeline.prepare_data(
            step_config(
                "prepare_data",
                overrides={
                    "project_dir": root,
                    "seed": seed,
                    "subtomo_size": profile["subtomo_size"],
                    "tomo0_files": [data["tomo0"]],
                    "tomo1_files": [data["tomo1"]],
                    "subtomo_dir": subtomo_dir,
                    "subtomo_extraction_strides": profile["strides"],
                    "val_fraction": 0.1,
                    "overwrite": True,
                    **({"mw_angle": MW_ANGLE_DEG} if symmetric else {}),
                },
            )
        )
    return subtomo_dir


def fit_variant(
    name: str, variant: FitVariant, root: Path, data: dict, seed: int, profile: dict, args
) -> tuple[dict, float]:
    subtomo_dir = prepare_banks(
        root, data, seed, profile, variant.old_val_split, variant.symmetric_wedge
    )
    unet = {**profile["unet"], **variant.fit.get("unet_params_dict", {})}
    overrides = {
        "project_dir": root,
        "seed": seed,
        "subtomo_dir": subtomo_dir,
        "logdir": root / f"logs_{name}",
        "gpu": profile["gpu"],
        "adam_params_dict": {"lr": profile["lr"] * variant.lr_factor},
        "num_epochs": args.short_epochs if variant.short else profile["epochs"],
        "batch_size": profile["batch_size"],
        "check_val_every_n_epochs": 1,
        "save_model_every_n_epochs": 1 if variant.curve else None,
        "update_subtomo_missing_wedges_every_n_epochs": profile["update_every"],
        "overwrite": True,
        **variant.fit,
        "unet_params_dict": unet,
    }
    patch = (
        mock.patch("deepdewedge.fit.loop.fill_missing_wedges", previous_fill_missing_wedges)
        if variant.old_update_input
        else contextlib.nullcontext()
    )
    t0 = time.perf_counter()
    with patch:
        fitted = pipeline.fit_model(step_config("fit_model", overrides=overrides))
    return fitted, time.perf_counter() - t0


def refine(root: Path, data: dict, seed: int, profile: dict, ckpt: Path, out: str, extra: dict):
    (path,) = pipeline.refine_tomogram(
        step_config(
            "refine_tomogram",
            overrides={
                "project_dir": root,
                "seed": seed,
                "tomo0_files": [data["tomo0"]],
                "tomo1_files": [data["tomo1"]],
                "gpu": profile["gpu"],
                "model_checkpoint_file": ckpt,
                "subtomo_overlap": profile["overlap"],
                "output_dir": root / "refined" / out,
                "overwrite": True,
                **extra,
            },
        )
    )
    return path


def curve_rows(root: Path, data: dict, seed: int, profile: dict, fitted: dict, every: int):
    """CC of refinements from every `every`-th epoch, with the validation loss of each epoch."""
    gt, _ = read_volume(data["ground_truth"])
    rows = []
    ckpt_dir = Path(fitted["checkpoint"]).parent
    for record in fitted["history"]:
        epoch = record["epoch"]
        row = {"epoch": epoch + 1, "val_loss": record["val_loss"]}
        row["fitting_loss"] = record["fitting_loss"]
        if (epoch + 1) % every == 0:
            ckpt = ckpt_dir / f"epoch={epoch:05d}.ckpt"
            vol, _ = read_volume(refine(root, data, seed, profile, ckpt, "curve", {}))
            row["cc"] = correlation_coefficient(vol, gt)
            lo_hi = profile["tilt_range"]
            row["cc_outside_wedge"] = cc_outside_wedge(vol, gt, tilt_range_deg=lo_hi)
            row["cc_inside_wedge"] = cc_inside_wedge(vol, gt, tilt_range_deg=lo_hi)
        rows.append(row)
    return rows


def run_variant(name, variant, snr, seed, profile, root, args) -> tuple[list[dict], list[dict]]:
    data = prepared(root, snr, seed, profile)
    fitted, seconds = fit_variant(name, variant, root, data, seed, profile, args)
    labels, paths = [], []
    for refine_name, extra in variant.refines.items():
        label = f"{name}, {refine_name}" if refine_name else name
        out = label.replace(", ", "_").replace(" ", "-")
        paths.append(refine(root, data, seed, profile, fitted["checkpoint"], out, extra))
        labels.append(label)
    rows = evaluate(
        paths,
        data["ground_truth"],
        **wedge(profile),
        particles=data["particles"],
        labels=labels,
    )
    fbp = []
    if name == "defaults":
        (fbp_row,) = evaluate(
            [data["full"]],
            data["ground_truth"],
            **wedge(profile),
            particles=data["particles"],
            labels=["FBP"],
        )
        fbp = [fbp_row]
    out = []
    for row in fbp + rows:
        record = {"snr": snr, "seed": seed, "fit": name, "variant": row["label"]}
        record |= {m: row[m] for m in METRICS}
        record["fit_seconds"] = seconds if row["label"] != "FBP" else 0.0
        record["val_loss_last"] = fitted["history"][-1]["val_loss"]
        out.append(record)
    curve = []
    if variant.curve:
        for row in curve_rows(root, data, seed, profile, fitted, args.curve_every):
            curve.append({"snr": snr, "seed": seed, "fit": name, **row})
    return out, curve


def replay_early_stopping(
    output: Path, curves: list[dict], patiences: list[int], profile: dict
) -> list[dict]:
    """Where ``early_stopping_patience`` would have stopped each ``defaults`` fit, and its CC.

    A stop changes nothing before it, so the fit that stops at epoch e is the ``defaults``
    fit up to e: its checkpoint of that epoch is refined and scored. Also scored: the
    checkpoint of lowest validation loss up to the stop (what ``ddw refine-tomogram`` takes
    by default). The best CC seen is the highest of the CC-against-epochs curve and these.
    """
    rows = []
    for snr, seed in sorted({(r["snr"], r["seed"]) for r in curves}, key=lambda k: (-k[0], k[1])):
        curve = sorted(
            (r for r in curves if r["snr"] == snr and r["seed"] == seed and r["fit"] == "defaults"),
            key=lambda r: r["epoch"],
        )
        root = output / f"snr{snr:.3f}_seed{seed}"
        data = prepared(root, snr, seed, profile)
        gt, _ = read_volume(data["ground_truth"])
        history = [{"epoch": r["epoch"] - 1, "val_loss": r["val_loss"]} for r in curve]
        seen = {r["epoch"] - 1: r["cc"] for r in curve if math.isfinite(r.get("cc", math.nan))}

        def cc_at(epoch: int, root=root, data=data, seed=seed, gt=gt, seen=seen) -> float:
            if epoch not in seen:
                ckpt = root / "logs_defaults" / "checkpoints" / f"epoch={epoch:05d}.ckpt"
                vol, _ = read_volume(refine(root, data, seed, profile, ckpt, "replay", {}))
                seen[epoch] = correlation_coefficient(vol, gt)
            return seen[epoch]

        for patience in patiences:
            stop = next(
                (e for e in range(len(history)) if patience_exhausted(history[: e + 1], patience)),
                len(history) - 1,
            )
            best_val = min(history[: stop + 1], key=lambda r: r["val_loss"])["epoch"]
            rows.append(
                {
                    "snr": snr,
                    "seed": seed,
                    "patience": patience,
                    "stop_epoch": stop + 1,
                    "cc_at_stop": cc_at(stop),
                    "best_val_epoch": best_val + 1,
                    "cc_at_best_val": cc_at(best_val),
                }
            )
        for row in rows:
            if row["snr"] == snr and row["seed"] == seed:
                row["best_cc_seen"] = max(seen.values())
                row["best_cc_epoch"] = max(seen, key=seen.__getitem__) + 1
    return rows


def read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for key, value in row.items():
            if key in ("fit", "variant"):
                continue
            row[key] = (
                math.nan
                if value in ("", "None")
                else int(value)
                if key in ("seed", "epoch")
                else float(value)
            )
    return rows


def summary_table(rows: list[dict]) -> str:
    header = ["SNR", "variant", *METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    for snr in sorted({r["snr"] for r in rows}, reverse=True):
        for variant in variants:
            group = [r for r in rows if r["snr"] == snr and r["variant"] == variant]
            if not group:
                continue
            cells = [f"1/{1 / snr:.0f}", f"{variant} ({len(group)})"]
            for metric in METRICS:
                v = np.array([r[metric] for r in group], dtype=float)
                v = v[np.isfinite(v)]
                fmt = ".0f" if "fsc" in metric else ".3f"
                if not len(v):
                    cells.append("n/a")
                elif len(v) == 1:
                    cells.append(f"{v.mean():{fmt}}")
                else:
                    cells.append(f"{v.mean():{fmt}} ({v.min():{fmt}}–{v.max():{fmt}})")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(rows: list[dict], reference: str = "defaults") -> str:
    """Per SNR and variant: mean CC difference to `reference` on the same data and seed,
    and in how many runs the variant is ahead."""
    lines = ["| SNR | variant | ΔCC (mean, worst–best) | ahead in |", "|---|---|---|---|"]
    variants = [v for v in dict.fromkeys(r["variant"] for r in rows) if v not in (reference,)]
    for snr in sorted({r["snr"] for r in rows}, reverse=True):
        base = {r["seed"]: r["cc"] for r in rows if r["snr"] == snr and r["variant"] == reference}
        for variant in variants:
            diffs = np.array(
                [
                    r["cc"] - base[r["seed"]]
                    for r in rows
                    if r["snr"] == snr and r["variant"] == variant and r["seed"] in base
                ]
            )
            if len(diffs):
                lines.append(
                    f"| 1/{1 / snr:.0f} | {variant} | {diffs.mean():+.3f} "
                    f"({diffs.min():+.3f}–{diffs.max():+.3f}) "
                    f"| {(diffs > 0).sum()} of {len(diffs)} |"
                )
    return "\n".join(lines)


def epochs_figure(curves: list[dict], rows: list[dict], short_epochs: int, path: Path) -> None:
    """CC against epochs of the defaults (mean over seeds), one panel per SNR; the
    short-fit variants as points at their last epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    snrs = sorted({r["snr"] for r in curves}, reverse=True)
    fig, axes = plt.subplots(1, len(snrs), figsize=(4 * len(snrs), 3.2), squeeze=False)
    for ax, snr in zip(axes[0], snrs, strict=True):
        points = [r for r in curves if r["snr"] == snr and math.isfinite(r.get("cc", math.nan))]
        epochs = sorted({r["epoch"] for r in points})
        mean = [np.mean([r["cc"] for r in points if r["epoch"] == e]) for e in epochs]
        ax.plot(epochs, mean, "o-", label="defaults (constant lr)")
        for name in [n for n, v in VARIANTS.items() if v.short]:
            group = [r["cc"] for r in rows if r["snr"] == snr and r["fit"] == name]
            if group:
                ax.plot(short_epochs, np.mean(group), "s", label=f"{name} ({len(group)})")
        ax.set_title(f"SNR 1/{1 / snr:.0f}", fontsize=10)
        ax.set_xlabel("epochs")
    axes[0][0].set_ylabel("CC with ground truth")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def markdown_rows(rows: list[dict]) -> str:
    """A markdown table of `rows` as they are, floats to three decimals."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--snr", type=float, nargs="+", default=[1 / 2, 1 / 4, 1 / 6])
    parser.add_argument("--seeds", type=int, default=3, help="runs per SNR (seeds 0, 1, ...)")
    parser.add_argument("--seed", type=int, help="run this seed only (to share out the runs)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--epochs", type=int, default=None, help="override the profile's")
    parser.add_argument("--short-epochs", type=int, default=20)
    parser.add_argument(
        "--tilt-range",
        type=float,
        nargs=2,
        default=(-60.0, 60.0),
        metavar=("LOWEST", "HIGHEST"),
        help="simulated tilt range in degrees (default -60 60)",
    )
    parser.add_argument("--curve-every", type=int, default=5)
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("ablation_results"))
    parser.add_argument(
        "--replay-early-stopping",
        type=int,
        nargs="+",
        metavar="PATIENCE",
        help="only replay early stopping with these patiences on the finished defaults fits",
    )
    args = parser.parse_args(argv)
    profile = dict(PROFILES[args.profile])
    profile["tilt_range"] = tuple(args.tilt_range)
    if args.epochs is not None:
        profile["epochs"] = args.epochs
    args.output.mkdir(parents=True, exist_ok=True)
    print(
        f"profile {args.profile} ({torch.get_num_threads()} threads): {profile['shape']} voxels, "
        f"{profile['epochs']} epochs (short: {args.short_epochs})",
        flush=True,
    )
    rows = read_csv(args.output / "ablation.csv")
    curves = read_csv(args.output / "epochs.csv")
    if args.replay_early_stopping:
        stops = replay_early_stopping(args.output, curves, args.replay_early_stopping, profile)
        write_csv(args.output / "early_stopping.csv", stops)
        print(markdown_rows(stops))
        return
    done = {(r["snr"], r["seed"], r["fit"]) for r in rows}
    for seed in [args.seed] if args.seed is not None else range(args.seeds):
        for snr in args.snr:
            root = args.output / f"snr{snr:.3f}_seed{seed}"
            for name in args.variants:
                if (snr, seed, name) in done:
                    continue
                t0 = time.perf_counter()
                new, curve = run_variant(name, VARIANTS[name], snr, seed, profile, root, args)
                rows += new
                curves += curve
                write_csv(args.output / "ablation.csv", rows)
                if curves:
                    write_csv(args.output / "epochs.csv", curves)
                print(
                    f"SNR 1/{1 / snr:.0f} seed {seed} {name}: "
                    + ", ".join(f"{r['variant']} cc {r['cc']:.3f}" for r in new)
                    + f" ({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
    if curves:
        epochs_figure(curves, rows, args.short_epochs, args.output / "epochs.png")
    print(f"\n{summary_table(rows)}\n\n{paired_table(rows)}\n")


if __name__ == "__main__":
    main()
