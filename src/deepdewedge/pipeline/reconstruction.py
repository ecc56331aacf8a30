"""Step 1: tomo0, tomo1 and the full tomogram from a tilt series (raw + alignment, or aligned)."""

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
from deepdewedge.evaluate.figures import gold_erasure_figure
from deepdewedge.evaluate.reprojection import heldout_views
from deepdewedge.io.alignment import read_alignment
from deepdewedge.io.geometry import TiltSeriesGeometry
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
    save_figure,
    write_record,
)
from deepdewedge.reconstruct.backproject import weighted_backprojection
from deepdewedge.reconstruct.binning import bin_images
from deepdewedge.reconstruct.ctf import phase_flip_tilt_series, wiener_deconvolve_volume
from deepdewedge.reconstruct.gold import erase_gold_beads, find_gold_beads_in_tilt_series
from deepdewedge.reconstruct.preprocess import (
    align_tilts,
    exposure_filter,
    normalize_tilts,
    rotate_about_x,
    taper_borders,
)
from deepdewedge.reconstruct.split import even_odd_indices, random_fraction_indices

log = logging.getLogger(__name__)


# Beads are sought at about this pixel size, where 5-15 nm gold spans 6-19 pixels.
_GOLD_SEARCH_PIXEL_ANGSTROM = 8.0
_GOLD_SEARCH_DIAMETER_PX = 12.0


def _find_gold(
    stack: np.ndarray,
    kept: np.ndarray,
    angles: torch.Tensor,
    *,
    pixel: float,
    diameter_nm: float | None,
    device: torch.device,
) -> dict[str, Any]:
    """Gold beads in the kept views: per-view centres and diameter in stack pixels, a count.

    The views are searched Fourier-binned to about 8 Å per pixel (or so that a given bead
    spans about 12 pixels), a few at a time, in counts as they are: the detector's scores are
    robust z-scores, unchanged by the per-view normalisation that follows.
    """
    if diameter_nm is None:
        factor = round(_GOLD_SEARCH_PIXEL_ANGSTROM / pixel)
    else:
        factor = int(10 * diameter_nm / pixel // _GOLD_SEARCH_DIAMETER_PX)
    h, w = stack.shape[1:]
    # Keep at least 128 binned pixels a side; below 64 a side there is too little to search.
    factor = max(1, min(factor, min(h, w) // 128))
    if min(h, w) // factor < 64:
        return {}
    diameter = None if diameter_nm is None else 10 * diameter_nm / pixel / factor
    chunk = max(1, 2**25 // (h * w))
    views = torch.cat(
        [
            bin_images(
                torch.from_numpy(np.asarray(stack[kept[i : i + chunk]], dtype=np.float32)).to(
                    device
                ),
                factor,
            )
            for i in range(0, len(kept), chunk)
        ]
    )
    centres, diameter = find_gold_beads_in_tilt_series(
        views, diameter_px=diameter, tilt_angles_deg=angles
    )
    count = sum(len(c) for c in centres)
    if count == 0 or diameter is None:
        return {}
    # Binned position j is stack position j b + (n mod b) // 2 + (b - 1) / 2 (binning.py).
    offset = torch.tensor(
        [(h % factor) // 2 + (factor - 1) / 2, (w % factor) // 2 + (factor - 1) / 2],
        device=views.device,
    )
    centres = [c * factor + offset for c in centres]
    log.info("gold: %d beads of %.1f px in %d views", count, diameter * factor, len(kept))
    return {"centres": centres, "diameter_px": float(diameter * factor), "count": count}


def _gold_figure(
    stack: np.ndarray, kept: np.ndarray, angles: torch.Tensor, gold: dict, seed: int, path: Path
) -> Path:
    """Save the lowest-tilt kept view, normalised, before and after gold erasure."""
    i = int(torch.argmin(angles.abs()))
    before, _ = normalize_tilts(torch.from_numpy(np.asarray(stack[kept[i : i + 1]], np.float32)))
    centres = gold["centres"][i].cpu()
    after = _erase_gold(before, [centres], gold["diameter_px"], seed + i)
    figure = gold_erasure_figure(
        before[0],
        after[0],
        centres,
        diameter_px=gold["diameter_px"],
        title=f"view {kept[i] + 1} ({float(angles[i]):.1f}°): gold erased",
    )
    return save_figure(figure, path)


def _erase_gold(views: torch.Tensor, centres: list[torch.Tensor], diameter_px: float, seed: int):
    """Erase the beads of each view in `(n, h, w)` views; a seeded fill per view."""
    out = torch.empty_like(views)
    for i, (view, where) in enumerate(zip(views, centres, strict=True)):
        generator = torch.Generator(device=views.device).manual_seed(seed + i)
        out[i] = erase_gold_beads(view, where, diameter_px=diameter_px, generator=generator)
    return out


def _tilt_metadata(
    config: ReconstructConfig, n_tilts: int, pixel: float
) -> tuple[TiltSeriesGeometry, np.ndarray, str]:
    """The geometry, the stack indices in acquisition sequence, and where that came from.

    The geometry comes from the alignment file, else from the angles; an .mdoc's dose and
    defocus, then a defocus file, replace what the alignment carries. The acquisition order
    comes from the .mdoc, else from the pre-exposure, else from the acquisition scheme.
    """
    mdoc = read_mdoc(config.mdoc) if config.mdoc is not None else None
    if config.alignment is not None:
        geometry = read_alignment(
            config.alignment,
            n_views=n_tilts,
            pixel_size_angstrom=pixel,
            tilt_angles=config.tilt_angles,
            x_tilt_file=config.x_tilt_file,
        )
    else:
        source = config.tilt_angles or config.mdoc
        if config.tilt_angles is not None:
            angles = read_tilt_angles(config.tilt_angles)
        else:
            assert mdoc is not None
            angles = mdoc.angles_deg
        if len(angles) != n_tilts:
            raise InputError(
                f"{source}: {len(angles)} tilt angles for a stack of {n_tilts} images; give "
                "the angle file that belongs to this tilt series"
            )
        geometry = TiltSeriesGeometry(tilt_angle_deg=angles, source=str(source))
    order = None
    if mdoc is not None and len(mdoc.angles_deg) == n_tilts:
        # The mdoc gives each tilt's position in the sequence; we need the inverse.
        order, order_source = np.argsort(mdoc.acquisition_order, kind="stable"), "mdoc"
        changes: dict[str, Any] = {}
        if np.isfinite(mdoc.prior_dose_e_per_a2).all():
            changes["pre_exposure_e_per_a2"] = mdoc.prior_dose_e_per_a2
        if mdoc.defocus_um is not None:
            changes["defocus_um"] = mdoc.defocus_um
        geometry = geometry.with_changes(**changes)
    if config.defocus_file is not None:
        geometry = geometry.with_changes(
            defocus_um=read_defocus(config.defocus_file, n_tilts=n_tilts)
        )
    if order is None and geometry.has_dose:
        order, order_source = geometry.acquisition_order(), "dose"
    if order is None:
        positions = acquisition_order_from_angles(
            geometry.tilt_angle_deg, scheme=config.acquisition_scheme
        )
        order, order_source = np.argsort(positions, kind="stable"), config.acquisition_scheme
    return geometry, order, order_source


def reconstruct(
    config: ReconstructConfig, *, progress: Callable[[int, int], None] | None = None
) -> dict[str, Path]:
    """Step 1: split a tilt series and reconstruct tomo0, tomo1 and the full tomogram.

    A raw stack is aligned on the fly with ``config.alignment``; every kept view is prepared
    as ``docs/conventions.md`` ("Real-data preprocessing") describes, a few views at a time.

    The halves are reconstructed with ``config.filter``, the full tomogram with
    ``config.full_filter`` (where given); the record names the filter of each.

    Returns
    -------
    dict
        Paths of the ``full``, ``tomo0`` and ``tomo1`` tomograms, the ``record`` (JSON), and
        where written, the ``aligned_stack`` and the ``gold_figure``.
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
    geometry, acquisition, order_source = _tilt_metadata(config, n_tilts, pixel)
    keep = ~geometry.excluded
    for view in config.exclude_views:
        if not 1 <= view <= n_tilts:
            raise InputError(
                f"{config.tilt_series}: exclude_views has view {view}, but the stack has views "
                f"1..{n_tilts} (IMOD numbering)"
            )
        keep[view - 1] = False
    if keep.sum() < 2:
        raise InputError(
            f"{config.tilt_series}: {int(keep.sum())} view(s) left after exclusions; keep at "
            "least two views per half"
        )
    heldout = np.zeros(n_tilts, dtype=bool)  # prepared with the kept views, reconstructed never
    if config.holdout is not None:
        usable = np.flatnonzero(keep)
        try:
            chosen = heldout_views(geometry.tilt_angle_deg[usable], config.holdout)
        except ValueError as err:
            raise InputError(f"{config.tilt_series}: {err}") from None
        heldout[usable[chosen]] = True
    if config.bin * 2 > min(stack.shape[1:]):
        raise InputError(f"{config.tilt_series}: bin {config.bin} leaves too few pixels")
    device = resolve_device(config.gpu)
    kept = np.flatnonzero(keep)
    # Indices into the prepared views: those reconstructed, and those held out.
    used = np.flatnonzero(~heldout[kept])
    held = np.flatnonzero(heldout[kept])
    # Acquisition sequence restricted to the kept views, renumbered to the kept stack.
    renumber = -np.ones(n_tilts, dtype=np.int64)
    renumber[kept] = np.arange(len(kept))
    used_number = -np.ones(len(kept), dtype=np.int64)
    used_number[used] = np.arange(len(used))
    order = used_number[renumber[acquisition[keep[acquisition]]]]
    order = order[order >= 0]  # acquisition sequence of the reconstructed views
    angles = torch.from_numpy(geometry.tilt_angle_deg[kept].copy())
    defocus = geometry.defocus_um[kept] if geometry.has_defocus else None
    dose = (
        geometry.pre_exposure_e_per_a2[kept] if config.dose_filter and geometry.has_dose else None
    )
    aligned = config.alignment is not None
    raw_position = torch.from_numpy(geometry.raw_position_matrix()[kept])
    # A fade wider than a sixteenth of the image would eat into small stacks' content.
    taper_px = min(config.taper_px, min(stack.shape[1:]) // 16)

    gold: dict[str, Any] = {}
    if config.erase_gold:
        gold = _find_gold(
            stack, kept, angles, pixel=pixel, diameter_nm=config.gold_diameter_nm, device=device
        )
    view_std: list[torch.Tensor] = []  # of the whole views, for scaling their frame halves

    def prepare(images: np.ndarray, *, halves: bool = False) -> torch.Tensor:
        """Preprocess, align and bin the kept views of a stack, a few views at a time."""
        chunk = max(1, 2**25 // (stack.shape[1] * stack.shape[2]))
        binned = []
        for i0 in range(0, len(kept), chunk):
            views = kept[i0 : i0 + chunk]
            ts = torch.from_numpy(np.asarray(images[views], dtype=np.float32)).to(device)
            if config.normalize_tilts or config.log_counts:
                std = view_std[i0 // chunk] if halves and not config.log_counts else None
                ts, std = normalize_tilts(ts, log=config.log_counts, std=std)
                if not halves:
                    view_std.append(std)
            if gold:
                ts = _erase_gold(
                    ts, gold["centres"][i0 : i0 + chunk], gold["diameter_px"], config.seed + i0
                )
            mean = ts.mean(dim=(1, 2), keepdim=True)
            ts = taper_borders(ts - mean, width_px=taper_px)
            if dose is not None:
                ts = exposure_filter(
                    ts,
                    torch.from_numpy(dose[i0 : i0 + chunk]),
                    pixel_size_angstrom=pixel,
                    voltage_kv=config.voltage_kv,
                )
            if aligned:
                ts = align_tilts(ts, raw_position[i0 : i0 + chunk])
            ts = ts + mean
            if config.bin > 1:
                ts = bin_images(ts, config.bin, method=config.binning_method)
            binned.append(ts)
        ts = torch.cat(binned)
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

    x_tilt_deg = float(np.mean(geometry.x_tilt_deg[kept]))

    done = [0]

    # The full tomogram is for viewing, the halves for fitting: each may have its own filter.
    filters = {name: config.filter for name in ("tomo0", "tomo1")}
    filters["full"] = config.full_filter or config.filter

    def wbp(ts: torch.Tensor, ang: torch.Tensor, *, filter: str) -> np.ndarray:
        volume = weighted_backprojection(
            ts,
            ang.to(ts.device),
            thickness=max(1, config.thickness // config.bin),
            filter=filter,
            sirt_iterations=config.sirt_iterations,
            tilt_axis_offset_px=config.tilt_axis_offset_px / config.bin,
        )
        if abs(x_tilt_deg) > 1e-3:
            volume = rotate_about_x(volume, x_tilt_deg)
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
    prepared = prepare(stack)
    heldout_ts, full_ts = prepared[torch.from_numpy(held)], prepared[torch.from_numpy(used)]
    angles_used = angles[torch.from_numpy(used)]
    volumes = {"full": wbp(full_ts, angles_used, filter=filters["full"])}
    views: dict[str, list[int]] = {}
    if split == "frames":
        for name, frames_file in (("tomo0", config.even_frames), ("tomo1", config.odd_frames)):
            frames, _ = read_volume(frames_file)
            if frames.shape != stack.shape:
                raise InputError(
                    f"{frames_file}: shape {frames.shape} differs from the tilt series "
                    f"{stack.shape}; give the frame sums of the same tilt series"
                )
            half = prepare(frames, halves=True)[torch.from_numpy(used)]
            volumes[name] = wbp(half, angles_used, filter=filters[name])
    else:
        if split == "even-odd":
            index0, index1 = even_odd_indices(torch.from_numpy(order))
        else:
            index0, index1 = random_fraction_indices(
                len(used),
                fraction=config.random_fraction,
                generator=torch.Generator().manual_seed(config.seed),
            )
        for name, index in (("tomo0", index0), ("tomo1", index1)):
            volumes[name] = wbp(
                full_ts[index.to(full_ts.device)], angles_used[index], filter=filters[name]
            )
        views = {
            name: (kept[used[index.numpy()]] + 1).tolist()
            for name, index in (("tomo0", index0), ("tomo1", index1))
        }
    for name, path in paths.items():
        write_volume(path, volumes[name], voxel_size=pixel * config.bin)
    outputs = dict(paths)
    if config.write_aligned_stack:
        outputs["aligned_stack"] = write_volume(
            out_dir / f"{stem}_aligned.mrc", prepared.cpu().numpy(), voxel_size=pixel * config.bin
        )
    heldout_record = None
    if len(held):
        outputs["heldout"] = write_volume(
            out_dir / f"{stem}_heldout.mrc", heldout_ts.cpu().numpy(), voxel_size=pixel * config.bin
        )
        heldout_record = {
            "scheme": config.holdout,
            "views": (kept[held] + 1).tolist(),  # 1-based stack views
            "tilt_angles_deg": angles[torch.from_numpy(held)].tolist(),
            "stack": str(outputs["heldout"]),
        }
    if gold:
        outputs["gold_figure"] = _gold_figure(
            stack, kept, angles, gold, config.seed, out_dir / f"{stem}_gold.png"
        )
    record = out_dir / f"{stem}_reconstruct.json"
    sources = [
        config.tilt_series,
        config.alignment,
        config.x_tilt_file,
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
        n_tilts_used=int(len(used)),
        voxel_size_angstrom=pixel * config.bin,
        ctf_corrected=bool(defocus is not None and config.ctf_correction == "phase-flip"),
        views=views,  # 1-based stack views in each half
        filters={
            name: f"sirt ({config.sirt_iterations} iterations)" if f == "sirt" else f
            for name, f in filters.items()
        },
        acquisition_order_from=order_source,
        tilt_range_deg=[float(angles_used.min()), float(angles_used.max())],
        heldout=heldout_record,
        dose_filtered=dose is not None,
        gold_beads_erased=gold.get("count", 0),
        gold_diameter_px=gold.get("diameter_px"),
        outputs={k: str(v) for k, v in outputs.items()},
    )
    return {**outputs, "record": record}
