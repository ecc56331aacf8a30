"""Density maps of real macromolecules, shipped with the package, at any voxel size.

The maps were rendered from atomic models of the Protein Data Bank (CC0) on a 10 Å grid; see
``deepdewedge/data/README.md`` for their sources and ``deepdewedge/data/build_templates.py``
for how they were made. Nothing is downloaded at run time.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Template", "load_templates", "template_names"]

# Density (relative to a protein's interior of about 1) that bounds a template's extent.
_SUPPORT_THRESHOLD = 0.02


@dataclass(frozen=True, eq=False)
class Template:
    """A macromolecule's density in a cubic box, centred on its centre of mass.

    Attributes
    ----------
    name
        Short name, e.g. ``"casx_rnp"``.
    density
        `(n, n, n)` float32 density with ``n`` odd; the centre of mass is at voxel
        ``((n - 1) / 2,) * 3``. About 1 inside protein, exactly 0 far from it.
    voxel_size_angstrom
        Voxel size of ``density`` in Å.
    radius_px
        Distance in voxels from the centre beyond which the density stays below 0.02 in every
        orientation; twice it is the particle's diameter.
    pdb_id
        The Protein Data Bank entry the map was rendered from.
    description
        What the molecule is.
    """

    name: str
    density: torch.Tensor
    voxel_size_angstrom: float
    radius_px: float
    pdb_id: str
    description: str

    @property
    def box_px(self) -> int:
        """Edge ``n`` of the cubic box in voxels."""
        return int(self.density.shape[-1])


def _template_files() -> dict[str, Any]:
    """The shipped ``.npz`` files (importlib resources) by template name."""
    folder = resources.files("deepdewedge").joinpath("data").joinpath("templates")
    return {
        entry.name.removesuffix(".npz"): entry
        for entry in folder.iterdir()
        if entry.name.endswith(".npz")
    }


def template_names() -> list[str]:
    """Names of the shipped templates, sorted."""
    return sorted(_template_files())


def _lowpass(volume: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Gaussian low-pass whose transfer is 0.2 at ``cutoff`` (cycles per voxel).

    ``volume`` is `(n, n, n)`. A Gaussian keeps a non-negative map non-negative and adds no
    ringing around the molecule.
    """
    n = volume.shape[-1]
    k = torch.fft.fftfreq(n, dtype=torch.float64)
    kr = torch.fft.rfftfreq(n, dtype=torch.float64)
    k2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + kr[None, None, :] ** 2
    transfer = torch.exp(-math.log(5.0) * k2 / cutoff**2)
    spectrum = torch.fft.rfftn(volume.to(torch.float64)) * transfer
    return torch.fft.irfftn(spectrum, s=volume.shape).to(volume.dtype)


def _resample(density: torch.Tensor, source_angstrom: float, target_angstrom: float):
    """Resample a centred cubic map to another voxel size, keeping its centre on a voxel.

    Coarser grids are low-passed first (to their Nyquist frequency) so that they do not alias;
    values are then interpolated trilinearly. Returns the `(m, m, m)` map, ``m`` odd.
    """
    if math.isclose(source_angstrom, target_angstrom, rel_tol=1e-9):
        return density.clone()
    scale = target_angstrom / source_angstrom  # source voxels per target voxel
    if scale > 1.0:
        density = _lowpass(density, 0.5 / scale)
    n = density.shape[-1]
    half = (n - 1) / 2
    half_out = math.ceil(half / scale)
    m = 2 * half_out + 1
    # Target voxel j sits at (j - half_out) * scale source voxels from the centre.
    axis = (torch.arange(m, dtype=torch.float32) - half_out) * scale
    normalised = axis / half if half > 0 else axis  # align_corners: voxel 0 -> -1, n-1 -> +1
    gz, gy, gx = torch.meshgrid(normalised, normalised, normalised, indexing="ij")
    grid = torch.stack([gx, gy, gz], dim=-1)[None]
    out = F.grid_sample(
        density[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True
    )
    return out[0, 0]


def _support_radius(density: torch.Tensor) -> float:
    """Largest distance from the box centre of a voxel above the support threshold, plus 1."""
    n = density.shape[-1]
    axis = torch.arange(n, dtype=torch.float32) - (n - 1) / 2
    r2 = axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2
    inside = density > _SUPPORT_THRESHOLD
    if not inside.any():
        return 1.0
    return float(r2[inside].max().sqrt()) + 1.0


def load_templates(
    voxel_size_angstrom: float, *, names: Sequence[str] | None = None
) -> dict[str, Template]:
    """Load the shipped macromolecule maps, resampled to a voxel size.

    Parameters
    ----------
    voxel_size_angstrom : float
        Voxel size of the returned maps in Å. The maps were rendered at 10 Å with a 6 Å
        Gaussian blur, so finer voxel sizes give smooth, interpolated maps without more
        detail; coarser ones are low-passed to their Nyquist frequency before resampling.
    names : sequence of str, optional
        Which templates to load (see :func:`template_names`); all by default.

    Returns
    -------
    dict of str to Template
        The templates by name, in the order of ``names`` (sorted by default). Each box is
        cubic with an odd edge and the molecule's centre of mass on its central voxel; it is
        padded so that the molecule fits in every orientation (``2 radius_px + 1 <= n``).

    Raises
    ------
    ValueError
        A voxel size that is not a finite positive number, or an unknown template name.
    """
    if (
        not isinstance(voxel_size_angstrom, numbers.Real)
        or isinstance(voxel_size_angstrom, bool)
        or not math.isfinite(voxel_size_angstrom)
        or voxel_size_angstrom <= 0
    ):
        raise ValueError(
            f"voxel_size_angstrom must be a finite positive number, got {voxel_size_angstrom!r}"
        )
    files = _template_files()
    if names is None:
        names = sorted(files)
    elif isinstance(names, str):
        names = [names]
    unknown = [name for name in names if name not in files]
    if unknown:
        raise ValueError(
            f"unknown template(s) {', '.join(map(repr, unknown))}; choose from "
            f"{', '.join(sorted(files))}"
        )
    if not names:
        raise ValueError("names must name at least one template")
    templates = {}
    for name in names:
        with files[name].open("rb") as handle, np.load(handle, allow_pickle=False) as data:
            source = torch.from_numpy(data["density"].astype(np.float32))
            source_angstrom = float(data["voxel_size_angstrom"])
            pdb_id = str(data["pdb_id"])
            description = str(data["description"])
        density = _resample(source, source_angstrom, float(voxel_size_angstrom))
        radius = _support_radius(density)
        # Pad so that the support sphere, and the rotation's interpolation stencil around it,
        # stays inside the box in every orientation.
        needed = math.ceil(radius) + 2
        half = (density.shape[-1] - 1) // 2
        if needed > half:
            density = F.pad(density, (needed - half,) * 6)
        templates[name] = Template(
            name=name,
            density=density.contiguous(),
            voxel_size_angstrom=float(voxel_size_angstrom),
            radius_px=radius,
            pdb_id=pdb_id,
            description=description,
        )
    return templates
