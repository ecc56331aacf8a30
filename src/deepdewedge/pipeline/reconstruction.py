"""Step 1: tomo0, tomo1 and the full tomogram from an aligned tilt series."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepdewedge.config import (
    ReconstructConfig,
)
from deepdewedge.io.mrc import InputError, read_volume, write_volume
from deepdewedge.io.tilts import (
    acquisition_order_from_angles,
    read_defocus,
    read_mdoc,
    read_tilt_angles,
)
from deepdewedge.pipeline.common import (
    check_writable,
    resolve_device,
    write_record,
)
from deepdewedge.reconstruct.backproject import weighted_backprojection
from deepdewedge.reconstruct.binning import bin_images
from deepdewedge.reconstruct.ctf import phase_flip_tilt_series, wiener_deconvolve_volume
from deepdewedge.reconstruct.split import even_odd_indices, random_fraction_indices

log = logging.getLogger(__name__)


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


def reconstruct(
    config: ReconstructConfig, *, progress: Callable[[int, int], None] | None = None
) -> dict[str, Path]:
    """Step 1: split an aligned tilt series and reconstruct tomo0, tomo1 and the full tomogram.

    Returns
    -------
    dict
        Paths of the ``full``, ``tomo0`` and ``tomo1`` tomograms and the ``record`` (JSON).
    """
    started = time.perf_counter()
    out_dir = Path(config.output_dir or Path(config.project_dir) / "tomograms")
    stem = Path(config.tilt_series).stem
    paths = {name: out_dir / f"{stem}_{name}.mrc" for name in ("full", "tomo0", "tomo1")}
    if any(p.exists() for p in paths.values()) and not config.overwrite:
        raise InputError(f"{paths['full']}: tomograms already exist; pass --overwrite to replace")
    stack, header_pixel = read_volume(config.tilt_series)
    check_writable(
        out_dir,
        needed_bytes=3
        * 4
        * stack.shape[1]
        * stack.shape[2]
        * max(1, config.thickness)
        // config.bin**3,
    )
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

    done = [0]

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
        done[0] += 1
        if progress is not None:
            progress(done[0], 3)
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
        views = {
            name: (kept[index.numpy()] + 1).tolist()
            for name, index in (("tomo0", index0), ("tomo1", index1))
        }
    for name, path in paths.items():
        write_volume(path, volumes[name], voxel_size=pixel * config.bin)
    record = out_dir / f"{stem}_reconstruct.json"
    sources = [
        config.tilt_series,
        config.tilt_angles,
        config.mdoc,
        config.even_frames,
        config.odd_frames,
        config.defocus_file,
    ]
    write_record(
        record,
        config,
        inputs=[Path(f) for f in sources if f is not None],
        started=started,
        split=split,
        n_tilts_used=int(len(kept)),
        voxel_size_angstrom=pixel * config.bin,
        ctf_corrected=bool(defocus is not None and config.ctf_correction == "phase-flip"),
        views=views,  # 1-based stack views in each half
        tilt_range_deg=[float(angles.min()), float(angles.max())],
        outputs={k: str(v) for k, v in paths.items()},
    )
    return {**paths, "record": record}
