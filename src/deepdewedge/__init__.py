"""DeepDeWedge: self-supervised denoising and missing-wedge reconstruction for cryo-ET."""

__version__ = "0.1.0"

from deepdewedge.pipeline import fit_model, prepare_data, refine_tomogram

__all__ = ["__version__", "fit_model", "prepare_data", "refine_tomogram"]
