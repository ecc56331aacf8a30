"""Configs of the steps around a tilt series: reconstruct, make-mask, simulate, demo."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    model_validator,
)

from deepdewedge.config.base import _Step


class ReconstructConfig(_Step):
    """``ddw reconstruct``: tomo0, tomo1 and the full tomogram from a tilt series."""

    tilt_series: Path = Field(
        description="Tilt series (MRC stack): raw with an alignment, or aligned."
    )
    alignment: Path | None = Field(
        None,
        description="Alignment of the raw stack: IMOD .xf (with tilt_angles), AreTomo .aln, "
        "Warp .xml or RELION-5 tilt-series .star, recognised from the file.",
    )
    tilt_angles: Path | None = Field(
        None, description="IMOD .tlt or .rawtlt file, where the alignment has no angles."
    )
    x_tilt_file: Path | None = Field(None, description="IMOD .xtilt file.")
    mdoc: Path | None = Field(
        None, description="SerialEM .mdoc: angles, acquisition order, dose, defocus."
    )
    even_frames: Path | None = Field(
        None, description="Sums of the even movie frames of each view (MRC stack)."
    )
    odd_frames: Path | None = Field(
        None, description="Sums of the odd movie frames of each view (MRC stack)."
    )
    split: Literal["even-odd", "frames", "random"] | None = Field(
        None,
        description="How to split into halves: even-odd (acquisition order), frames or "
        "random; default: frames where even and odd frames are given, else even-odd.",
    )
    random_fraction: float = Field(
        0.5, gt=0, lt=1, description="Fraction of the views in tomo0 with split random."
    )
    acquisition_scheme: Literal["sequential", "dose-symmetric"] = Field(
        "sequential",
        description="Acquisition order without an .mdoc: sequential or dose-symmetric.",
    )
    pixel_size_angstrom: float | None = Field(
        None, gt=0, description="Pixel size of the stack in Å; default: from its MRC header."
    )
    bin: int = Field(1, ge=1, description="Binning factor of the tomograms.")
    binning_method: Literal["fourier", "average"] = Field(
        "fourier", description="Binning by Fourier cropping (fourier) or block averages."
    )
    thickness: int = Field(..., ge=1, description="Tomogram thickness in unbinned px, as in IMOD.")
    tilt_axis_offset_px: float = Field(
        0.0, description="Offset of the tilt axis from the image centre in unbinned px."
    )
    exclude_views: list[int] = Field(
        [], description="Views to leave out, numbered from 1 as in IMOD."
    )
    holdout: str | None = Field(
        None,
        pattern=r"^(every|highest):\d+$",
        description="Views to hold out of every tomogram for ddw score-heldout: every:N (every "
        "N-th by angle) or highest:K (the K most tilted); written to {stem}_heldout.mrc.",
    )
    filter: Literal["ramp", "hamming", "sirt"] = Field(
        "ramp",
        description="Reconstruction filter of tomo0 and tomo1: ramp, hamming or sirt (SIRT-like).",
    )
    full_filter: Literal["ramp", "hamming", "sirt"] | None = Field(
        "sirt",
        description="Reconstruction filter of the full tomogram: ramp, hamming or sirt "
        "(SIRT-like); null in a config file: the filter of tomo0 and tomo1.",
    )
    sirt_iterations: int = Field(
        10, ge=1, description="Iterations of SIRT that the sirt filter mimics."
    )
    defocus_file: Path | None = Field(
        None, description="IMOD .defocus, CTFFIND output, or one defocus per line in µm."
    )
    ctf_correction: Literal["none", "phase-flip"] = Field(
        "phase-flip", description="CTF correction where the defocus is known: phase-flip or none."
    )
    wiener_deconvolution: bool = Field(
        False, description="Wiener-like CTF deconvolution of the tomograms (as in IsoNet)."
    )
    snr_falloff: float = Field(
        1.0, gt=0, description="Fall of the modelled SNR with frequency (IsoNet's snrfalloff)."
    )
    deconv_strength: float = Field(
        1.0, gt=0, description="Low-frequency SNR 10^(3 x this) (IsoNet's deconvstrength)."
    )
    highpass_nyquist: float = Field(
        0.02,
        ge=0,
        lt=1,
        description="High-pass cut-off as a fraction of Nyquist (IsoNet's hpnyquist).",
    )
    voltage_kv: float = Field(300.0, gt=0, description="Acceleration voltage in kV.")
    spherical_aberration_mm: float = Field(2.7, ge=0, description="Spherical aberration in mm.")
    amplitude_contrast: float = Field(
        0.07, ge=0, lt=1, description="Fraction of amplitude contrast."
    )
    # Real-data preprocessing of every view, each switched off on its own.
    normalize_tilts: bool = Field(
        True, description="Scale each view to zero mean, unit standard deviation."
    )
    log_counts: bool = Field(False, description="Take the log of the counts before normalising.")
    taper_px: int = Field(
        32,
        ge=0,
        description="Fade the view borders over this many unbinned px, at most 1/16 of the "
        "image; 0: off.",
    )
    dose_filter: bool = Field(
        True, description="Exposure filter where the pre-exposure of every view is known."
    )
    erase_gold: bool = Field(True, description="Erase gold fiducials where they are found.")
    gold_diameter_nm: float | None = Field(
        None, gt=0, description="Gold bead diameter in nm; default: measured from the images."
    )
    write_aligned_stack: bool = Field(
        False, description="Also write the preprocessed, aligned, binned stack."
    )
    output_dir: Path | None = Field(
        None, description="Folder of the tomograms; default: {project_dir}/tomograms."
    )
    overwrite: bool = Field(False, description="Replace existing tomograms.")

    @model_validator(mode="after")
    def _sources(self) -> ReconstructConfig:
        if (self.even_frames is None) != (self.odd_frames is None):
            raise ValueError("even_frames and odd_frames come as a pair; give both, or neither")
        if self.split == "frames" and self.even_frames is None:
            raise ValueError(
                "split 'frames' needs even_frames and odd_frames; give them, or choose "
                "split even-odd or random"
            )
        if self.tilt_angles is None and self.mdoc is None and self.alignment is None:
            raise ValueError(
                "no tilt angles; give tilt_angles (.tlt/.rawtlt), mdoc (SerialEM .mdoc) or an "
                "alignment (.xf with .tlt, .aln, Warp .xml, RELION-5 .star)"
            )
        return self


class MakeMaskConfig(_Step):
    """``ddw make-mask``: sample masks from local density and structure (IsoNet-style)."""

    tomo_files: list[Path] = Field(description="Tomograms to mask (MRC).")
    density_percentage: float = Field(
        50.0, gt=0, le=100, description="Percentage of voxels kept for their local density."
    )
    std_percentage: float = Field(
        50.0,
        gt=0,
        le=100,
        description="Percentage of voxels kept for their local structure (standard deviation).",
    )
    sigma_px: float = Field(2.0, gt=0, description="Smoothing width in px of the tomogram.")
    bin_factor: int = Field(2, ge=1, description="Compute on a copy binned by this factor.")
    z_crop: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="Fraction of the slices removed at the top and at the bottom.",
    )
    auto_z: bool = Field(True, description="Remove the empty ice above and below the sample.")
    polarity: Literal["both", "dark", "bright"] = Field(
        "both",
        description="What counts as dense: a local mean far from the median on either side "
        "(both), below it (dark) or above it (bright).",
    )
    output_dir: Path | None = Field(
        None, description="Folder of the masks; default: {project_dir}/masks."
    )
    overwrite: bool = Field(False, description="Replace existing masks.")


class SimulateConfig(BaseModel):
    """``ddw simulate``: a synthetic tilt series, its ground truth and particle records.

    Sizes are in voxels of ``voxel_size_angstrom``; ``thickness_px``, ``height_px`` and
    ``width_px`` give the ground truth `(d, h, w)`, and the images are ``height_px`` by
    ``width_px``.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    output_dir: Path = Path("simulation")
    thickness_px: int = Field(64, ge=8)
    height_px: int = Field(192, ge=8)
    width_px: int = Field(192, ge=8)
    voxel_size_angstrom: float = Field(10.0, gt=0)
    ice_thickness_px: int | None = Field(None, ge=1)  # default: 3/4 of thickness_px
    templates: list[str] | None = None  # default: all shipped templates
    n_particles: int | None = Field(None, ge=0)  # default: 15% of the ice filled
    n_vesicles: int = Field(2, ge=0)
    n_sheets: int = Field(1, ge=0)
    n_beads: int = Field(4, ge=0)
    bead_radius_angstrom: float = Field(50.0, gt=0)
    tilt_min_deg: float = Field(-60.0, gt=-90, lt=90)
    tilt_max_deg: float = Field(60.0, gt=-90, lt=90)
    tilt_step_deg: float = Field(3.0, gt=0)
    acquisition_scheme: Literal["dose-symmetric", "sequential"] = "dose-symmetric"
    dose_per_tilt_e_per_a2: float = Field(3.0, ge=0)  # written to the .mdoc only
    snr: float = Field(0.25, gt=0)
    ctf: bool = False
    defocus_um: float = Field(3.0, gt=0)
    voltage_kv: float = Field(300.0, gt=0)
    spherical_aberration_mm: float = Field(2.7, ge=0)
    amplitude_contrast: float = Field(0.07, ge=0, lt=1)
    defocus_gradient: bool = True
    n_frames: int = Field(0, ge=0)  # 0: no frames; else at least 2
    seed: int = 42
    overwrite: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> SimulateConfig:
        if self.tilt_min_deg >= self.tilt_max_deg:
            raise ValueError(
                f"tilt_min_deg ({self.tilt_min_deg:g}) must be below tilt_max_deg "
                f"({self.tilt_max_deg:g})"
            )
        if self.tilt_max_deg - self.tilt_min_deg < self.tilt_step_deg:
            raise ValueError("tilt_step_deg is larger than the tilt range; give a smaller step")
        if self.ice_thickness_px is not None and self.ice_thickness_px > self.thickness_px:
            raise ValueError(
                f"ice_thickness_px ({self.ice_thickness_px}) exceeds thickness_px "
                f"({self.thickness_px}); the ice must fit in the tomogram"
            )
        if self.n_frames == 1:
            raise ValueError("n_frames must be 0 (no frames) or at least 2")
        if self.templates is not None:
            # The shipped templates are listed by the simulator, imported only when needed.
            from deepdewedge.simulate.templates import template_names

            known = template_names()
            unknown = [name for name in self.templates if name not in known]
            if unknown or not self.templates:
                raise ValueError(
                    f"unknown template(s) {', '.join(unknown) or '(none given)'}; choose from "
                    f"{', '.join(known)}"
                )
        return self

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        """`(d, h, w)` of the ground truth."""
        return (self.thickness_px, self.height_px, self.width_px)


# Fixed settings of `ddw demo` (a few minutes on a CPU); only the number of epochs is an option.
DEMO = {
    "shape_zyx": (48, 96, 96),
    "snr": 0.25,
    # The halves as in the paper's synthetic experiments; the full tomogram ("FBP") as
    # `ddw reconstruct` writes it by default.
    "filter": "hamming",
    "full_filter": ReconstructConfig.model_fields["full_filter"].default,
    "voxel_size": 10.0,
    "subtomo_size": 32,
    "strides": [16, 16, 16],
    "unet": {"chans": 8, "num_downsample_layers": 2, "drop_prob": 0.0},
    "num_epochs": 30,
    "batch_size": 8,
    "lr": 1e-3,
}
