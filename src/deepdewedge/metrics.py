"""Quality metrics of reconstructions against a ground truth (public API).

Correlation coefficients of the whole volume and of its Fourier regions outside and inside the
missing wedge, Fourier shell correlation of volumes and of particles cut out of them, and the
resolutions where FSC curves cross a threshold. See :mod:`deepdewedge.evaluate.metrics` for the
definitions.

Examples
--------
>>> import torch
>>> from deepdewedge.metrics import fsc, resolution_at
>>> v = torch.randn(32, 32, 32, dtype=torch.float64)
>>> curve = fsc(v, v, voxel_size_angstrom=10.0)
>>> resolution_at(curve.fsc, curve.frequencies_per_angstrom, 0.143)  # never drops: Nyquist
20.0
"""

from deepdewedge.evaluate.metrics import (
    Evaluation,
    FSCCurve,
    ParticleFSC,
    cc_inside_wedge,
    cc_outside_wedge,
    correlation_coefficient,
    evaluate_volume,
    fsc,
    particle_box_starts,
    particle_fsc,
    resolution_at,
    soft_sphere_mask,
)

__all__ = [
    "Evaluation",
    "FSCCurve",
    "ParticleFSC",
    "cc_inside_wedge",
    "cc_outside_wedge",
    "correlation_coefficient",
    "evaluate_volume",
    "fsc",
    "particle_box_starts",
    "particle_fsc",
    "resolution_at",
    "soft_sphere_mask",
]
