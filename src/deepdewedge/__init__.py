"""DeepDeWedge: self-supervised denoising and missing-wedge reconstruction for cryo-ET."""
__version__ = "0.1.0"
