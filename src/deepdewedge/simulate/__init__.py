"""Synthetic cryo-ET data with ground truth.

Two levels:

- :func:`simulate_phantom`, :func:`project`, :func:`add_noise`, :func:`split_even_odd` and
  :func:`simulate_tomogram`: quick blob phantoms and their tomograms (the demo's data).
- :func:`simulate_dataset`: a realistic sample of real macromolecules
  (:func:`load_templates`), membranes and gold beads in ice, with per-particle records, imaged
  over a tilt scheme (sequential or dose-symmetric) with an optional CTF, noise at a given
  SNR and optional dose-fractionated frames; ``ddw simulate`` writes it to disk.

The geometry is that of :mod:`deepdewedge.reconstruct.backproject` (tilt axis y, IMOD-like
handedness), so reconstructions of the simulated images line up with the ground truth.
"""

from deepdewedge.simulate.acquisition import (
    acquisition_positions,
    apply_ctf,
    ctf_margin_px,
    simulate_frames,
    tilt_angles,
)
from deepdewedge.simulate.dataset import SimulatedDataset, lateral_padding_px, simulate_dataset
from deepdewedge.simulate.phantom import (
    add_noise,
    project,
    simulate_phantom,
    simulate_tomogram,
    split_even_odd,
)
from deepdewedge.simulate.sample import (
    Particle,
    SimulatedSample,
    euler_zyz_to_matrix,
    matrix_to_euler_zyz,
    simulate_sample,
)
from deepdewedge.simulate.templates import Template, load_templates, template_names

__all__ = [
    "Particle",
    "SimulatedDataset",
    "SimulatedSample",
    "Template",
    "acquisition_positions",
    "add_noise",
    "apply_ctf",
    "ctf_margin_px",
    "euler_zyz_to_matrix",
    "lateral_padding_px",
    "load_templates",
    "matrix_to_euler_zyz",
    "project",
    "simulate_dataset",
    "simulate_frames",
    "simulate_phantom",
    "simulate_sample",
    "simulate_tomogram",
    "split_even_odd",
    "template_names",
    "tilt_angles",
]
