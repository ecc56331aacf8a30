"""A whole synthetic cryo-ET data set: sample, tilt series, frames and ground truth."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from deepdewedge.simulate.acquisition import (
    acquisition_positions,
    apply_ctf,
    ctf_margin_px,
    simulate_frames,
    tilt_angles,
)
from deepdewedge.simulate.phantom import add_noise, project
from deepdewedge.simulate.sample import Particle, SimulatedSample, simulate_sample
from deepdewedge.simulate.templates import load_templates

__all__ = ["SimulatedDataset", "lateral_padding_px", "simulate_dataset"]

# The sample is simulated at most this many field-of-view widths (plus thicknesses) wider on
# each side; beyond it, rays at very high tilt leave the sample through its side.
_MAX_PADDING_FACTOR = 4


@dataclass(frozen=True, eq=False)
class SimulatedDataset:
    """A simulated tilt series with everything that real data never comes with.

    Attributes
    ----------
    sample
        The simulated density (wider than the field of view) and its particle records.
    tilt_series
        `(n, h, w)` float32 noisy images in stack order (ascending angle).
    clean_tilt_series
        `(n, h, w)` the same images without noise (after the CTF, if any).
    tilt_angles_deg
        `(n,)` float64 angles in stack order.
    acquisition_positions
        `(n,)` int64: entry ``i`` is when image ``i`` was taken (0 = first).
    defocus_um
        `(n,)` float64 defocus at the tilt axis (positive = underfocus), or None without CTF.
    even_frames, odd_frames
        `(n, h, w)` sums of the even and of the odd dose-fractionated frames, or None; they
        add up to ``tilt_series``.
    voxel_size_angstrom
        Voxel size of the ground truth and pixel size of the images, in Å.
    """

    sample: SimulatedSample
    tilt_series: torch.Tensor
    clean_tilt_series: torch.Tensor
    tilt_angles_deg: torch.Tensor
    acquisition_positions: torch.Tensor
    defocus_um: torch.Tensor | None
    even_frames: torch.Tensor | None
    odd_frames: torch.Tensor | None
    voxel_size_angstrom: float

    @property
    def ground_truth(self) -> torch.Tensor:
        """`(d, h, w)` density of the field of view above the ice (a new tensor).

        It has the geometry of a reconstruction of :attr:`tilt_series` with thickness ``d``
        (e.g. ``ddw reconstruct --thickness d``); see
        :attr:`~deepdewedge.simulate.sample.SimulatedSample.ground_truth` for why the uniform
        ice is left out.
        """
        return self.sample.ground_truth

    @property
    def particles(self) -> list[Particle]:
        """The particles inside the ground truth."""
        return self.sample.particles


def lateral_padding_px(
    shape_zyx: tuple[int, int, int],
    *,
    ice_thickness_px: int,
    max_tilt_deg: float,
    detector_margin_px: int = 0,
) -> int:
    """Width to simulate beyond each x edge of the field of view so that no ray is cut short.

    A ray that reaches detector column ``x'`` (pixels from the tilt axis) at tilt ``θ`` crosses
    the ice slab of thickness ``t`` at ``|x| <= (|x'| + t/2 |sin θ|) / cos θ``. The result
    covers the widest such reach over the detector (``w`` plus ``detector_margin_px`` on each
    side) plus 2 voxels, capped at ``4 (w + d)`` for tilts near 90°.
    """
    d, _, w = shape_zyx
    theta = math.radians(min(abs(max_tilt_deg), 89.999))
    detector_half = (w - 1) / 2 + detector_margin_px
    reach = (detector_half + (ice_thickness_px / 2 + 1) * math.sin(theta)) / math.cos(theta)
    needed = max(0, math.ceil(reach - (w - 1) / 2)) + 2
    return min(needed, _MAX_PADDING_FACTOR * (w + d))


def simulate_dataset(
    shape_zyx: tuple[int, int, int] = (64, 192, 192),
    *,
    voxel_size_angstrom: float = 10.0,
    templates: Sequence[str] | None = None,
    n_particles: int | None = None,
    ice_thickness_px: int | None = None,
    n_vesicles: int = 2,
    n_sheets: int = 1,
    n_beads: int = 4,
    bead_radius_angstrom: float = 50.0,
    tilt_min_deg: float = -60.0,
    tilt_max_deg: float = 60.0,
    tilt_step_deg: float = 3.0,
    acquisition_scheme: str = "dose-symmetric",
    snr: float = 0.25,
    ctf: bool = False,
    defocus_um: float = 3.0,
    voltage_kv: float = 300.0,
    spherical_aberration_mm: float = 2.7,
    amplitude_contrast: float = 0.07,
    defocus_gradient: bool = True,
    n_frames: int = 0,
    generator: torch.Generator | None = None,
) -> SimulatedDataset:
    """Simulate a cryo-ET sample and its noisy tilt series, with ground truth.

    Parameters
    ----------
    shape_zyx : tuple of int
        Shape `(d, h, w)` of the ground truth: ``d`` is the thickness of the tomogram to
        reconstruct, ``h`` and ``w`` are the image size.
    voxel_size_angstrom : float
        Voxel size of the ground truth and pixel size of the images in Å.
    templates : sequence of str, optional
        Macromolecules to use (:func:`~deepdewedge.simulate.templates.template_names`); all
        by default.
    n_particles, ice_thickness_px, n_vesicles, n_sheets, n_beads, bead_radius_angstrom
        The sample, see :func:`~deepdewedge.simulate.sample.simulate_sample`.
    tilt_min_deg, tilt_max_deg, tilt_step_deg : float
        Tilt scheme, see :func:`~deepdewedge.simulate.acquisition.tilt_angles`.
    acquisition_scheme : {"dose-symmetric", "sequential"}
        Order in which the tilts are taken; it decides ``ddw reconstruct``'s even/odd split.
    snr : float
        Signal-to-noise ratio of the tilt series, ``var(signal) / var(noise)`` over the whole
        series, the signal being the noise-free images (after the CTF, if any); as in
        :func:`~deepdewedge.simulate.phantom.add_noise`. The paper's synthetic experiments use
        1/2, 1/4 and 1/6.
    ctf : bool
        Whether to filter the images by the CTF (:func:`~.acquisition.apply_ctf`).
    defocus_um, voltage_kv, spherical_aberration_mm, amplitude_contrast, defocus_gradient
        The CTF, if ``ctf``; the defocus is the same at the tilt axis of every image.
    n_frames : int
        0 for no frames, else the number of dose-fractionated frames per image (at least 2);
        the tilt series is then the sum of the frames, and the even- and odd-frame sums are
        returned too.
    generator : torch.Generator, optional
        Source of all randomness; defaults to a fresh generator seeded with 0.

    Returns
    -------
    SimulatedDataset

    Notes
    -----
    The sample extends beyond the field of view in x (:func:`lateral_padding_px`), as a real
    one does, so that tilted rays through the field of view cross sample all the way. Its
    projections are taken on a detector of the image width (wider by the CTF's margin, which
    is cropped after filtering), with the tilt axis on the central column. A tomogram
    reconstructed from the images with thickness ``d`` and no shifts then has the geometry of
    the ground truth voxel for voxel.
    """
    d, h, w = shape_zyx
    if n_frames != 0 and (not isinstance(n_frames, int) or n_frames < 2):
        raise ValueError(f"n_frames must be 0 (no frames) or at least 2, got {n_frames!r}")
    if acquisition_scheme not in ("dose-symmetric", "sequential"):
        raise ValueError(
            f"acquisition_scheme must be 'dose-symmetric' or 'sequential', got "
            f"{acquisition_scheme!r}"
        )
    angles = tilt_angles(tilt_min_deg, tilt_max_deg, tilt_step_deg)
    positions = acquisition_positions(angles, scheme=acquisition_scheme)
    chosen = load_templates(voxel_size_angstrom, names=templates)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    ice = round(0.75 * d) if ice_thickness_px is None else ice_thickness_px
    margin = 0
    if ctf:
        margin = ctf_margin_px(
            pixel_size_angstrom=voxel_size_angstrom, defocus_um=defocus_um, voltage_kv=voltage_kv
        )
    pad = lateral_padding_px(
        (d, h, w),
        ice_thickness_px=ice,
        max_tilt_deg=float(angles.abs().max()),
        detector_margin_px=margin,
    )
    sample = simulate_sample(
        (d, h, w),
        chosen,
        n_particles=n_particles,
        ice_thickness_px=ice,
        n_vesicles=n_vesicles,
        n_sheets=n_sheets,
        n_beads=n_beads,
        bead_radius_angstrom=bead_radius_angstrom,
        lateral_padding_px=pad,
        generator=generator,
    )
    clean = project(sample.volume, angles, width=w + 2 * margin)
    defocus = None
    if ctf:
        defocus = torch.full((len(angles),), float(defocus_um), dtype=torch.float64)
        clean = apply_ctf(
            clean,
            angles,
            pixel_size_angstrom=voxel_size_angstrom,
            defocus_um=defocus,
            voltage_kv=voltage_kv,
            spherical_aberration_mm=spherical_aberration_mm,
            amplitude_contrast=amplitude_contrast,
            defocus_gradient=defocus_gradient,
        )
        clean = clean[..., margin : margin + w].contiguous()
    even = odd = None
    if n_frames:
        frames = simulate_frames(clean, n_frames=n_frames, snr=snr, generator=generator)
        even = frames[:, 0::2].sum(1)
        odd = frames[:, 1::2].sum(1)
        del frames
        noisy = even + odd
    else:
        noisy = add_noise(clean, snr=snr, generator=generator)
    return SimulatedDataset(
        sample=sample,
        tilt_series=noisy,
        clean_tilt_series=clean,
        tilt_angles_deg=angles,
        acquisition_positions=positions,
        defocus_um=defocus,
        even_frames=even,
        odd_frames=odd,
        voxel_size_angstrom=float(voxel_size_angstrom),
    )
