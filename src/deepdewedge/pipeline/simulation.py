"""``ddw simulate``: a synthetic tilt series with its ground truth, written as real data is.

Layout of the output folder::

    ts.mrc              noisy tilt series (n, h, w), float32, pixel size in the header
    ts.tlt              tilt angles in stack order (IMOD), one per line
    ts.mrc.mdoc         SerialEM-style record: angle, dose, acquisition time (and defocus)
    ts_even.mrc         sums of the even / odd dose-fractionated frames (with --n-frames),
    ts_odd.mrc          which add up to ts.mrc
    ground_truth.mrc    the sample's density above the ice in the field of view (d, h, w)
    particles.csv       one row per macromolecule inside the ground truth
    simulation.json     parameters, seed, version, template sources, measured SNR

The ground truth has the geometry of ``ddw reconstruct --thickness d`` on ``ts.mrc`` (no
binning, no shifts): voxel ``(k, y, j)`` of both is the same point of the sample. The uniform
ice slab, invisible to tomography (its spectrum lies on the kz axis, in the missing wedge), is
imaged but left out of the ground truth; ``simulation.json`` gives its density and z range.
"""

from __future__ import annotations

import csv
import io
import math
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from deepdewedge import __version__
from deepdewedge.config import SimulateConfig
from deepdewedge.io.atomic import atomic_write
from deepdewedge.io.errors import InputError
from deepdewedge.io.mrc import write_volume
from deepdewedge.pipeline.common import check_writable, write_record
from deepdewedge.simulate import load_templates, simulate_dataset
from deepdewedge.simulate.dataset import SimulatedDataset

__all__ = ["PARTICLES_HEADER", "SimulateConfig", "simulate", "simulate_config"]

PARTICLES_HEADER = (
    "particle",
    "template",
    "z_px",
    "y_px",
    "x_px",
    "phi_deg",
    "theta_deg",
    "psi_deg",
    "box_px",
)
STEM = "ts"
# A fixed, fictitious session start keeps the .mdoc identical for identical settings.
_SESSION_START = datetime(2024, 1, 15, 9, 0, 0)
_SECONDS_PER_TILT = 30


def simulate_config(**values: Any) -> SimulateConfig:
    """Validate options given on the command line (``None`` means: use the default).

    Raises
    ------
    InputError
        One line naming the first bad option and how to fix it.
    """
    given = {key: value for key, value in values.items() if value is not None}
    try:
        return SimulateConfig(**given)
    except ValidationError as err:
        first = err.errors()[0]
        message = " ".join(str(first["msg"]).split()).removeprefix("Value error, ")
        fields = [str(part) for part in first["loc"] if isinstance(part, str)]
        where = f"--{fields[0].replace('_', '-')}" if fields else "ddw simulate"
        if fields and first["type"] == "extra_forbidden":
            raise InputError(f"{where}: unknown option; see ddw simulate --help") from None
        got = f" (got {first['input']!r})" if fields and "input" in first else ""
        raise InputError(f"{where}: {message}{got}") from None


def output_paths(config: SimulateConfig) -> dict[str, Path]:
    """The files :func:`simulate` writes, by role."""
    out = Path(config.output_dir)
    paths = {
        "tilt_series": out / f"{STEM}.mrc",
        "tilt_angles": out / f"{STEM}.tlt",
        "mdoc": out / f"{STEM}.mrc.mdoc",
        "ground_truth": out / "ground_truth.mrc",
        "particles": out / "particles.csv",
        "record": out / "simulation.json",
    }
    if config.n_frames:
        paths["even_frames"] = out / f"{STEM}_even.mrc"
        paths["odd_frames"] = out / f"{STEM}_odd.mrc"
    return paths


def _write_text(path: Path, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def particles_csv(dataset: SimulatedDataset) -> str:
    """The particle table: ``PARTICLES_HEADER`` then one row per particle."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(PARTICLES_HEADER)
    for p in dataset.particles:
        z, y, x = p.centre_zyx_px
        phi, theta, psi = p.euler_zyz_deg
        writer.writerow(
            [p.index, p.template, z, y, x, f"{phi:.4f}", f"{theta:.4f}", f"{psi:.4f}", p.box_px]
        )
    return buffer.getvalue()


def mdoc_text(dataset: SimulatedDataset, config: SimulateConfig, *, image_file: str) -> str:
    """A SerialEM-style tilt-series .mdoc: one section per image, in stack order.

    ``DateTime`` records the acquisition order (one image every 30 s from a fixed start);
    ``Defocus`` (negative = underfocus, as SerialEM writes it) appears only with a CTF, so
    that ``ddw reconstruct`` corrects the CTF exactly when there is one.
    """
    n, h, w = dataset.tilt_series.shape
    pixel = config.voxel_size_angstrom
    lines = [
        f"PixelSpacing = {pixel:g}",
        f"Voltage = {config.voltage_kv:g}",
        f"ImageFile = {image_file}",
        f"ImageSize = {w} {h}",
        "DataMode = 2",
        "",
        f"[T = Simulated by DeepDeWedge {__version__} (ddw simulate, seed {config.seed})]",
        "",
    ]
    positions = dataset.acquisition_positions.tolist()
    for z, angle in enumerate(dataset.tilt_angles_deg.tolist()):
        taken = _SESSION_START + timedelta(seconds=_SECONDS_PER_TILT * positions[z])
        lines += [
            f"[ZValue = {z}]",
            f"TiltAngle = {angle:.3f}",
            f"ExposureDose = {config.dose_per_tilt_e_per_a2:g}",
            f"PixelSpacing = {pixel:g}",
        ]
        if dataset.defocus_um is not None:
            lines.append(f"Defocus = {-float(dataset.defocus_um[z]):.4f}")
        if config.n_frames:
            lines.append(f"NumSubFrames = {config.n_frames}")
        lines += [f"DateTime = {taken:%d-%b-%y  %H:%M:%S}", ""]
    return "\n".join(lines)


def _measured_snr(dataset: SimulatedDataset) -> float:
    clean = dataset.clean_tilt_series.to(torch.float64)
    noise = dataset.tilt_series.to(torch.float64) - clean
    return float(clean.var(correction=0) / noise.var(correction=0))


def simulate(config: SimulateConfig) -> dict[str, Path]:
    """Simulate a sample and its tilt series and write them (see the module docstring).

    Returns
    -------
    dict
        The written paths by role: ``tilt_series``, ``tilt_angles``, ``mdoc``,
        ``ground_truth``, ``particles``, ``record`` and, with frames, ``even_frames`` and
        ``odd_frames``.

    Raises
    ------
    InputError
        Outputs exist and ``overwrite`` is off, the output folder is not writable, or the
        settings cannot be simulated (e.g. ice thinner than a particle).
    """
    started = time.perf_counter()
    paths = output_paths(config)
    existing = [p for p in paths.values() if p.exists()]
    if existing and not config.overwrite:
        raise InputError(
            f"{existing[0]}: a simulation already exists there; pass --overwrite to replace it "
            "or choose another --output-dir"
        )
    d, h, w = config.shape_zyx
    n_tilts_max = math.floor((config.tilt_max_deg - config.tilt_min_deg) / config.tilt_step_deg)
    n_stacks = 1 + (2 if config.n_frames else 0)
    needed = 4 * (d * h * w + n_stacks * (n_tilts_max + 1) * h * w)
    check_writable(Path(config.output_dir), needed_bytes=needed)
    try:
        dataset = simulate_dataset(
            config.shape_zyx,
            voxel_size_angstrom=config.voxel_size_angstrom,
            templates=config.templates,
            n_particles=config.n_particles,
            ice_thickness_px=config.ice_thickness_px,
            n_vesicles=config.n_vesicles,
            n_sheets=config.n_sheets,
            n_beads=config.n_beads,
            bead_radius_angstrom=config.bead_radius_angstrom,
            tilt_min_deg=config.tilt_min_deg,
            tilt_max_deg=config.tilt_max_deg,
            tilt_step_deg=config.tilt_step_deg,
            acquisition_scheme=config.acquisition_scheme,
            snr=config.snr,
            ctf=config.ctf,
            defocus_um=config.defocus_um,
            voltage_kv=config.voltage_kv,
            spherical_aberration_mm=config.spherical_aberration_mm,
            amplitude_contrast=config.amplitude_contrast,
            defocus_gradient=config.defocus_gradient,
            n_frames=config.n_frames,
            generator=torch.Generator().manual_seed(config.seed),
        )
    except ValueError as err:
        raise InputError(f"ddw simulate: {err}") from None

    pixel = config.voxel_size_angstrom
    write_volume(paths["tilt_series"], dataset.tilt_series.numpy(), voxel_size=pixel)
    if dataset.even_frames is not None and dataset.odd_frames is not None:
        write_volume(paths["even_frames"], dataset.even_frames.numpy(), voxel_size=pixel)
        write_volume(paths["odd_frames"], dataset.odd_frames.numpy(), voxel_size=pixel)
    write_volume(
        paths["ground_truth"], np.ascontiguousarray(dataset.ground_truth.numpy()), voxel_size=pixel
    )
    _write_text(
        paths["tilt_angles"], "".join(f"{a:.3f}\n" for a in dataset.tilt_angles_deg.tolist())
    )
    _write_text(paths["mdoc"], mdoc_text(dataset, config, image_file=paths["tilt_series"].name))
    _write_text(paths["particles"], particles_csv(dataset))

    templates = load_templates(pixel, names=config.templates)
    reconstruct = [
        "ddw reconstruct",
        f"--tilt-series {paths['tilt_series']}",
        f"--mdoc {paths['mdoc']}",
        f"--thickness {d}",
    ]
    if config.n_frames:
        reconstruct += [
            f"--even-frames {paths['even_frames']}",
            f"--odd-frames {paths['odd_frames']}",
        ]
    order = np.argsort(dataset.acquisition_positions.numpy(), kind="stable")
    write_record(
        paths["record"],
        config,
        inputs=[],
        started=started,
        seed=config.seed,
        shape_zyx=[d, h, w],
        voxel_size_angstrom=pixel,
        n_tilts=int(dataset.tilt_series.shape[0]),
        acquisition_order_deg=[float(dataset.tilt_angles_deg[i]) for i in order],
        measured_snr=round(_measured_snr(dataset), 6),
        n_particles=len(dataset.particles),
        n_particles_outside_field_of_view=dataset.sample.n_particles_outside,
        lateral_padding_px=dataset.sample.lateral_padding_px,
        ice_z_range_px=list(dataset.sample.ice_z_range_px),
        ice_density=dataset.sample.ice_density,
        templates={
            name: {
                "pdb_id": t.pdb_id,
                "description": t.description,
                "box_px": t.box_px,
                "radius_px": round(t.radius_px, 3),
                "count": sum(1 for p in dataset.particles if p.template == name),
            }
            for name, t in templates.items()
        },
        euler_convention=(
            "ZYZ, degrees: particle = template rotated by R = Rz(phi) Ry(theta) Rz(psi) in xyz "
            "(right-handed, active), i.e. first psi about z, then theta about y, then phi "
            "about z, about the template's centre of mass, which lands on (z_px, y_px, x_px)"
        ),
        reconstruct_command=" ".join(reconstruct),
        outputs={role: str(path) for role, path in paths.items() if role != "record"},
    )
    return paths
