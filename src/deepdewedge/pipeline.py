"""The steps as users run them: config in, files in the project directory out.

This is the only module that mixes file layout with the algorithms. Layout of a project::

    {project_dir}/subtomos/{fitting,val}/subtomo{0,1}.npy   rotation-ready crop banks
    {project_dir}/subtomos/metadata.json                     sizes, coordinates, sources
    {project_dir}/logs/checkpoints/*.ckpt                    latest, best-val, every-n
    {project_dir}/logs/losses.csv                            one row per epoch
    {project_dir}/refined_tomograms/*.mrc                    refined tomograms (+ .json)
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepdewedge import __version__
from deepdewedge.config import (
    FitModelConfig,
    PrepareDataConfig,
    ReconstructConfig,
    RefineTomogramConfig,
    check_divisible,
    check_overlap,
)
from deepdewedge.fit.bank import bank_size, extract_crops, select_subtomos
from deepdewedge.fit.loop import Banks, Callbacks, FitSettings, fit
from deepdewedge.io.checkpoint import load_checkpoint
from deepdewedge.io.mrc import InputError, read_volume, write_volume
from deepdewedge.io.tilts import (
    acquisition_order_from_angles,
    read_defocus,
    read_mdoc,
    read_tilt_angles,
)
from deepdewedge.model.unet import DeWedgeModel
from deepdewedge.reconstruct.backproject import weighted_backprojection
from deepdewedge.reconstruct.binning import bin_images
from deepdewedge.reconstruct.ctf import phase_flip_tilt_series, wiener_deconvolve_volume
from deepdewedge.reconstruct.split import even_odd_indices, random_fraction_indices
from deepdewedge.refine import refine_volume

log = logging.getLogger(__name__)


def subtomo_dir(config: PrepareDataConfig | FitModelConfig) -> Path:
    """Folder of the sub-tomogram banks: ``subtomo_dir``, else ``{project_dir}/subtomos``."""
    return Path(config.subtomo_dir or Path(config.project_dir) / "subtomos")


def log_dir(config: FitModelConfig | RefineTomogramConfig) -> Path:
    """Folder of the loss CSV and the checkpoints: ``logdir``, else ``{project_dir}/logs``."""
    return Path(getattr(config, "logdir", None) or Path(config.project_dir) / "logs")


def provenance(config: Any) -> dict[str, Any]:
    """Config, package version and command line, recorded with every artefact."""
    return {
        "deepdewedge_version": __version__,
        "command_line": " ".join(sys.argv),
        "config": json.loads(config.model_dump_json()),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def resolve_device(gpu: int | list[int] | None) -> torch.device:
    """The device a step runs on: the first listed GPU, or the CPU when none is named."""
    if gpu is None or gpu == []:
        return torch.device("cpu")
    if isinstance(gpu, list) and len(gpu) > 1:
        log.warning("several GPUs given (%s); this step runs on GPU %d", gpu, gpu[0])
    index = gpu[0] if isinstance(gpu, list) else gpu
    if index < 0:
        return torch.device("cpu")
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        raise InputError(
            f"gpu {index} was requested but {torch.cuda.device_count()} CUDA device(s) are "
            "visible; drop the gpu option to run on the CPU"
        )
    return torch.device("cuda", index)


def _save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with open(tmp, "wb") as handle:
            np.save(handle, array)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle, indent=2, default=str)
    os.replace(tmp, path)


def _mean_std(volume: np.ndarray, chunk: int = 16) -> tuple[float, float]:
    """Mean and standard deviation in float64, streamed over z slabs (memory-mapped input)."""
    total, total_sq, n = 0.0, 0.0, 0
    for z in range(0, volume.shape[0], chunk):
        slab = np.asarray(volume[z : z + chunk], dtype=np.float64)
        total += slab.sum()
        total_sq += np.square(slab).sum()
        n += slab.size
    mean = total / n
    return mean, float(np.sqrt(max(total_sq / n - mean**2, 0.0)))


def _read_pair(tomo0_file: Path, tomo1_file: Path) -> tuple[np.ndarray, np.ndarray, float]:
    tomo0, voxel0 = read_volume(tomo0_file)
    tomo1, voxel1 = read_volume(tomo1_file)
    if tomo0.shape != tomo1.shape:
        raise InputError(
            f"{tomo1_file}: shape {tomo1.shape} differs from {tomo0_file} {tomo0.shape}; "
            "the two halves must come from the same reconstruction geometry"
        )
    if not np.isclose(voxel0, voxel1, rtol=1e-3):
        log.warning(
            "voxel sizes differ: %s %.3f Å, %s %.3f Å", tomo0_file, voxel0, tomo1_file, voxel1
        )
    return tomo0, tomo1, voxel0


def prepare_data(config: PrepareDataConfig) -> dict[str, Any]:
    """Step 1 (from tomograms on): sub-tomogram banks for fitting and validation.

    Returns
    -------
    dict
        Counts of fitting and validation sub-tomograms and the bank folder.
    """
    out_dir = subtomo_dir(config)
    if (out_dir / "metadata.json").exists() and not config.overwrite:
        raise InputError(
            f"{out_dir}: sub-tomograms already prepared; pass --overwrite to replace them"
        )
    generator = torch.Generator().manual_seed(config.seed)
    s = config.subtomo_size
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("fit0", "fit1", "val0", "val1")}
    records = []
    for i, (f0, f1) in enumerate(zip(config.tomo0_files, config.tomo1_files, strict=True)):
        tomo0, tomo1, voxel_size = _read_pair(f0, f1)
        if min(tomo0.shape) < s:
            raise InputError(
                f"{f0}: tomogram {tomo0.shape} is smaller than subtomo_size {s}; "
                f"choose subtomo_size <= {min(tomo0.shape)}"
            )
        mask = None
        if config.mask_files is not None:
            mask, _ = read_volume(config.mask_files[i])
            if mask.shape != tomo0.shape:
                raise InputError(
                    f"{config.mask_files[i]}: mask shape {mask.shape} differs from tomogram "
                    f"{tomo0.shape}; make the mask from this tomogram"
                )
        if config.standardize_full_tomos:
            for tomo in (tomo0, tomo1):
                mean, std = _mean_std(tomo)
                tomo -= mean
                tomo /= std if std > 0 else 1.0
        sel = select_subtomos(
            tomo0.shape,
            subtomo_size=s,
            strides_zyx=config.strides,
            mask=mask,
            min_nonzero_mask_fraction=config.min_nonzero_mask_fraction_in_subtomo,
            val_fraction=config.val_fraction,
            generator=generator,
        )
        if len(sel.starts) == 0:
            raise InputError(
                f"{config.mask_files[i] if mask is not None else f0}: no sub-tomogram has "
                f"{config.min_nonzero_mask_fraction_in_subtomo:.0%} of mask; lower "
                "min_nonzero_mask_fraction_in_subtomo or check the mask"
            )
        for name, tomo in (("0", tomo0), ("1", tomo1)):
            crops = extract_crops(tomo, sel.starts, subtomo_size=s)
            parts["fit" + name].append(crops[~sel.is_val])
            parts["val" + name].append(crops[sel.is_val])
        records += [
            {"tomo_index": i, "start_zyx": st, "split": "val" if v else "fitting"}
            for st, v in zip(sel.starts.tolist(), sel.is_val.tolist(), strict=True)
        ]
        log.info(
            "%s: %d fitting, %d validation sub-tomograms",
            f0,
            int((~sel.is_val).sum()),
            int(sel.is_val.sum()),
        )
    banks = {k: torch.cat(v).numpy() for k, v in parts.items()}
    if len(banks["fit0"]) == 0:
        raise InputError(
            f"{config.tomo0_files[0]}: no fitting sub-tomograms left; lower val_fraction, "
            "subtomo_size or subtomo_extraction_strides"
        )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    for split, key in (("fitting", "fit"), ("val", "val")):
        for half in ("0", "1"):
            _save_npy(out_dir / split / f"subtomo{half}.npy", banks[key + half])
    _write_json(
        out_dir / "metadata.json",
        {
            **provenance(config),
            "bank_id": uuid.uuid4().hex,
            "subtomo_size": s,
            "bank_size": bank_size(s),
            "tomo0_files": [str(f) for f in config.tomo0_files],
            "tomo1_files": [str(f) for f in config.tomo1_files],
            "subtomos": records,
        },
    )
    return {"n_fitting": len(banks["fit0"]), "n_val": len(banks["val0"]), "dir": out_dir}


def load_banks(root: Path, *, subtomo_size: int | None) -> tuple[Banks, dict[str, Any]]:
    """Load the banks written by :func:`prepare_data` from `root` and their metadata.

    A given `subtomo_size` must match the one the banks were prepared with.
    """
    meta_file = root / "metadata.json"
    if not meta_file.exists():
        raise InputError(f"{meta_file}: not found; run `ddw prepare-data` for this project_dir")
    meta = json.loads(meta_file.read_text())
    if subtomo_size is not None and meta["subtomo_size"] != subtomo_size:
        raise InputError(
            f"{meta_file}: sub-tomograms were prepared with subtomo_size {meta['subtomo_size']}"
            f", not {subtomo_size}; use the same subtomo_size or prepare again"
        )

    def load(split: str, half: str) -> torch.Tensor | None:
        array = np.load(root / split / f"subtomo{half}.npy")
        return torch.from_numpy(array) if len(array) else None

    fit0, fit1 = load("fitting", "0"), load("fitting", "1")
    assert fit0 is not None and fit1 is not None
    banks = Banks(fit0=fit0, fit1=fit1, val0=load("val", "0"), val1=load("val", "1"))
    return banks, meta


def build_model(unet_params: dict[str, Any]) -> DeWedgeModel:
    """The network of a config or checkpoint."""
    return DeWedgeModel(**unet_params)


def fit_model(config: FitModelConfig, *, callbacks: Callbacks | None = None) -> dict[str, Any]:
    """Step 2: fit the network on the prepared banks; write checkpoints and the loss CSV.

    Returns
    -------
    dict
        ``history`` (one record per epoch), ``checkpoint`` (the latest) and
        ``best_checkpoint`` (lowest validation loss, or the latest without validation).
    """
    banks, meta = load_banks(subtomo_dir(config), subtomo_size=config.subtomo_size)
    subtomo_size = int(meta["subtomo_size"])
    unet_params = config.unet_params_dict.model_dump(exclude={"in_chans", "out_chans"})
    try:
        check_divisible(subtomo_size, 2 ** unet_params["num_downsample_layers"])
    except ValueError as err:
        raise InputError(f"{subtomo_dir(config)}: {err}") from None
    logs = log_dir(config)
    ckpt_dir = logs / "checkpoints"
    latest = ckpt_dir / "latest.ckpt"
    resume_from = config.resume_from_checkpoint or (latest if config.resume else None)
    if resume_from is not None and not Path(resume_from).exists():
        raise InputError(f"{resume_from}: nothing to resume from; run fit-model without --resume")
    if resume_from is None and latest.exists() and not config.overwrite:
        raise InputError(
            f"{latest}: a fit already exists; pass --resume to continue it or --overwrite "
            "to start again and discard its checkpoints"
        )
    device = resolve_device(config.gpu)
    torch.manual_seed(config.seed)
    model = build_model(unet_params)
    adam = config.adam_params_dict.model_dump()
    adam["betas"] = tuple(adam["betas"])
    settings = FitSettings(
        subtomo_size=subtomo_size,
        mw_angle=config.mw_angle,
        num_epochs=config.num_epochs,
        batch_size=config.batch_size,
        adam_params=adam,
        seed=config.seed,
        rotate=config.rotate,
        wedge_mask=config.wedge_mask,
        interpolation=config.interpolation,
        update_every=config.update_subtomo_missing_wedges_every_n_epochs,
        check_val_every=config.check_val_every_n_epochs,
        save_every=config.save_model_every_n_epochs,
        keep_best_val=config.save_n_models_with_lowest_val_loss,
        keep_best_fit=config.save_n_models_with_lowest_fitting_loss,
        precision=config.precision,
        device=device,
    )
    extra = {
        **provenance(config),
        "bank_id": meta.get("bank_id"),
        "unet_params": unet_params,
        "subtomo_size": subtomo_size,
        "mw_angle": config.mw_angle,
    }
    if resume_from is None and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)  # --overwrite, checked above; only now that all is valid
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    callbacks = callbacks or Callbacks()
    on_epoch = callbacks.on_epoch

    def write_losses(record: dict[str, Any], history: list[dict[str, Any]]) -> None:
        write_loss_csv(logs / "losses.csv", history)
        if on_epoch is not None:
            on_epoch(record, history)

    history = fit(
        model,
        banks,
        settings,
        checkpoint_dir=ckpt_dir,
        resume_from=resume_from,
        extra_state=extra,
        callbacks=Callbacks(on_step=callbacks.on_step, on_epoch=write_losses),
    )
    return {"history": history, "checkpoint": latest, "best_checkpoint": best_checkpoint(ckpt_dir)}


def write_loss_csv(path: Path, history: list[dict[str, Any]]) -> None:
    """One row per epoch: epoch, fitting_loss, val_loss (empty when not computed)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["epoch", "fitting_loss", "val_loss"])
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, path)


def best_checkpoint(ckpt_dir: Path) -> Path:
    """The checkpoint with the lowest validation loss, else the latest."""
    best = sorted(
        ckpt_dir.glob("best-val-*.ckpt"), key=lambda p: float(p.stem.split("val_loss=")[1])
    )
    return best[0] if best else ckpt_dir / "latest.ckpt"


def load_model(path: Path) -> tuple[DeWedgeModel, dict[str, Any]]:
    """Rebuild the fitted network stored in a checkpoint."""
    state = load_checkpoint(path)
    model = build_model(state["unet_params"])
    try:
        model.load_state_dict(state["model_state"])
    except RuntimeError:
        raise InputError(
            f"{path}: weights do not match the network layout of this version "
            f"({__version__}; written by {state.get('deepdewedge_version', 'unknown')}); "
            "refine with the version that fitted it or fit again"
        ) from None
    return model.eval(), state


def refine_tomogram(
    config: RefineTomogramConfig, *, progress: Callable[[int, int], None] | None = None
) -> list[Path]:
    """Step 3: refine tomograms with a fitted model and write them as MRC.

    By default each pair (tomo0, tomo1) is refined half by half and averaged, as the
    published tool does; with ``tomo_files`` the full tomograms are refined instead (the
    paper's step 3). Returns the written paths.
    """
    ckpt = config.model_checkpoint_file or best_checkpoint(log_dir(config) / "checkpoints")
    model, state = load_model(ckpt)
    subtomo_size = config.subtomo_size or int(state["subtomo_size"])
    try:
        check_divisible(subtomo_size, model.size_multiple)
        overlap = (
            config.subtomo_overlap
            if config.subtomo_overlap is not None
            else math.ceil(subtomo_size / 3)
        )
        check_overlap(overlap, subtomo_size)
    except ValueError as err:
        raise InputError(f"{ckpt}: {err}") from None
    device = resolve_device(config.gpu)
    model.to(device)
    out_dir = config.output_dir or Path(config.project_dir) / "refined_tomograms"
    autocast = torch.bfloat16 if config.precision == "bf16-mixed" else None
    if config.tomo_files:
        jobs = [([f], f"{Path(f).stem}_refined.mrc") for f in config.tomo_files]
    else:
        assert config.tomo0_files is not None and config.tomo1_files is not None
        jobs = [
            ([f0, f1], f"{Path(f0).stem}+{Path(f1).stem}_refined.mrc")
            for f0, f1 in zip(config.tomo0_files, config.tomo1_files, strict=True)
        ]
    written = []
    for files, name in jobs:
        refined = None
        voxel_size = 1.0
        for f in files:
            tomo, voxel_size = read_volume(f, mmap=True)
            if refined is not None and tomo.shape != refined.shape:
                raise InputError(
                    f"{f}: shape {tomo.shape} differs from {files[0]} {refined.shape}; the two "
                    "halves must come from the same reconstruction geometry"
                )
            mean, std = _mean_std(tomo)
            if not np.isfinite(std):
                raise InputError(f"{f}: contains NaN or Inf voxels; fix them before refining")
            if config.recompute_normalization:
                model.set_normalization(mean, std if std > 0 else 1.0)
            out = refine_volume(
                model,
                tomo,
                subtomo_size=subtomo_size,
                subtomo_overlap=overlap,
                batch_size=config.batch_size,
                device=device,
                autocast_dtype=autocast,
                progress=progress,
            )
            if refined is None:
                refined = out
            else:
                refined += out
        assert refined is not None
        refined /= len(files)
        path = write_volume(out_dir / name, refined, voxel_size=voxel_size)
        _write_json(
            path.with_suffix(".json"),
            {**provenance(config), "checkpoint": str(ckpt), "inputs": [str(f) for f in files]},
        )
        written.append(path)
    return written


def _tilt_metadata(config: ReconstructConfig, n_tilts: int) -> dict[str, Any]:
    """Angles, acquisition order (stack indices in acquisition sequence) and defocus."""
    source = config.mdoc or config.tilt_angles
    mdoc = read_mdoc(config.mdoc) if config.mdoc is not None else None
    if config.tilt_angles is not None:
        angles = read_tilt_angles(config.tilt_angles)
    else:
        assert mdoc is not None
        angles = mdoc.angles_deg
    if len(angles) != n_tilts:
        raise InputError(
            f"{source}: {len(angles)} tilt angles for a stack of {n_tilts} images; give the "
            "angle file that belongs to this tilt series"
        )
    if mdoc is not None and len(mdoc.angles_deg) == n_tilts:
        # The mdoc gives each tilt's position in the sequence; we need the inverse.
        order = np.argsort(np.asarray(mdoc.acquisition_order), kind="stable")
    else:
        positions = acquisition_order_from_angles(angles, scheme=config.acquisition_scheme)
        order = np.argsort(np.asarray(positions), kind="stable")
    defocus = None
    if config.defocus_file is not None:
        defocus = read_defocus(config.defocus_file, n_tilts=n_tilts)
    elif mdoc is not None and mdoc.defocus_um is not None:
        defocus = np.asarray(mdoc.defocus_um)
    return {"angles": np.asarray(angles, dtype=np.float64), "order": order, "defocus": defocus}


def reconstruct(config: ReconstructConfig) -> dict[str, Path]:
    """Step 1: split an aligned tilt series and reconstruct tomo0, tomo1 and the full tomogram.

    Returns
    -------
    dict
        Paths of the ``full``, ``tomo0`` and ``tomo1`` tomograms and the ``record`` (JSON).
    """
    out_dir = Path(config.output_dir or Path(config.project_dir) / "tomograms")
    stem = Path(config.tilt_series).stem
    paths = {name: out_dir / f"{stem}_{name}.mrc" for name in ("full", "tomo0", "tomo1")}
    if any(p.exists() for p in paths.values()) and not config.overwrite:
        raise InputError(f"{paths['full']}: tomograms already exist; pass --overwrite to replace")
    stack, header_pixel = read_volume(config.tilt_series)
    pixel = config.pixel_size_angstrom or header_pixel
    n_tilts = stack.shape[0]
    meta = _tilt_metadata(config, n_tilts)
    keep = np.ones(n_tilts, dtype=bool)
    for view in config.exclude_views:
        if not 1 <= view <= n_tilts:
            raise InputError(
                f"{config.tilt_series}: exclude_views has view {view}, but the stack has views "
                f"1..{n_tilts} (IMOD numbering)"
            )
        keep[view - 1] = False
    if config.bin * 2 > min(stack.shape[1:]):
        raise InputError(f"{config.tilt_series}: bin {config.bin} leaves too few pixels")
    device = resolve_device(config.gpu)
    kept = np.flatnonzero(keep)
    # Acquisition sequence restricted to the kept views, renumbered to the kept stack.
    renumber = -np.ones(n_tilts, dtype=np.int64)
    renumber[kept] = np.arange(len(kept))
    order = renumber[meta["order"][keep[meta["order"]]]]
    angles = torch.from_numpy(meta["angles"][kept])
    defocus = None if meta["defocus"] is None else meta["defocus"][kept]

    def prepare(images: np.ndarray) -> torch.Tensor:
        ts = torch.from_numpy(np.asarray(images[kept], dtype=np.float32)).to(device)
        if config.bin > 1:
            ts = bin_images(ts, config.bin, method=config.binning_method)
        if defocus is not None and config.ctf_correction == "phase-flip":
            ts = phase_flip_tilt_series(
                ts,
                angles,
                torch.from_numpy(defocus),
                pixel_size_angstrom=pixel * config.bin,
                voltage_kv=config.voltage_kv,
                spherical_aberration_mm=config.spherical_aberration_mm,
                amplitude_contrast=config.amplitude_contrast,
            )
        return ts

    def wbp(ts: torch.Tensor, ang: torch.Tensor) -> np.ndarray:
        volume = weighted_backprojection(
            ts,
            ang.to(ts.device),
            thickness=max(1, config.thickness // config.bin),
            filter=config.filter,
            sirt_iterations=config.sirt_iterations,
            tilt_axis_offset_px=config.tilt_axis_offset_px / config.bin,
        )
        if config.wiener_deconvolution and defocus is not None:
            volume = wiener_deconvolve_volume(
                volume,
                pixel_size_angstrom=pixel * config.bin,
                defocus_um=float(defocus[int(np.argmin(np.abs(angles.numpy())))]),
                voltage_kv=config.voltage_kv,
                spherical_aberration_mm=config.spherical_aberration_mm,
                amplitude_contrast=config.amplitude_contrast,
                snr_falloff=config.snr_falloff,
                deconv_strength=config.deconv_strength,
                highpass_nyquist=config.highpass_nyquist,
                phase_flipped=config.ctf_correction == "phase-flip",
            )
        return volume.cpu().numpy()

    split = config.split or ("frames" if config.even_frames is not None else "even-odd")
    full_ts = prepare(stack)
    volumes = {"full": wbp(full_ts, angles)}
    views: dict[str, list[int]] = {}
    if split == "frames":
        for name, frames_file in (("tomo0", config.even_frames), ("tomo1", config.odd_frames)):
            frames, _ = read_volume(frames_file)
            if frames.shape != stack.shape:
                raise InputError(
                    f"{frames_file}: shape {frames.shape} differs from the tilt series "
                    f"{stack.shape}; give the frame sums of the same tilt series"
                )
            volumes[name] = wbp(prepare(frames), angles)
    else:
        if split == "even-odd":
            index0, index1 = even_odd_indices(torch.from_numpy(order))
        else:
            index0, index1 = random_fraction_indices(
                len(kept),
                fraction=config.random_fraction,
                generator=torch.Generator().manual_seed(config.seed),
            )
        volumes["tomo0"] = wbp(full_ts[index0.to(device)], angles[index0])
        volumes["tomo1"] = wbp(full_ts[index1.to(device)], angles[index1])
        views = {name: (kept[index.numpy()] + 1).tolist()
                 for name, index in (("tomo0", index0), ("tomo1", index1))}
    for name, path in paths.items():
        write_volume(path, volumes[name], voxel_size=pixel * config.bin)
    record = out_dir / f"{stem}_reconstruct.json"
    _write_json(
        record,
        {
            **provenance(config),
            "split": split,
            "n_tilts_used": int(len(kept)),
            "voxel_size_angstrom": pixel * config.bin,
            "ctf_corrected": bool(defocus is not None and config.ctf_correction == "phase-flip"),
            "views": views,  # 1-based stack views in each half
        "outputs": {k: str(v) for k, v in paths.items()},
        },
    )
    return {**paths, "record": record}
