"""Quality metrics of reconstructions against a ground truth."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["correlation_coefficient"]


def _as_float64(array: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        tensor = array.detach()
    elif isinstance(array, np.ndarray):
        # A float64 copy: read-only inputs (memory-mapped MRC files) stay untouched.
        tensor = torch.from_numpy(
            np.array(array, dtype=np.complex128 if np.iscomplexobj(array) else np.float64)
        )
    else:
        raise ValueError(f"{name} must be a numpy array or a torch tensor, got {type(array)}")
    if tensor.is_complex():
        raise ValueError(f"{name} must be real-valued")
    return tensor.to(torch.float64)


def correlation_coefficient(
    a: np.ndarray | torch.Tensor,
    b: np.ndarray | torch.Tensor,
) -> float:
    """Pearson correlation coefficient of two volumes over all voxels.

    Parameters
    ----------
    a, b : numpy.ndarray or torch.Tensor
        Volumes of identical shape, e.g. `(d, h, w)`; a reconstruction and a ground truth.
        Tensors may live on any device.

    Returns
    -------
    float
        ``CC(a, b)`` in ``[-1, 1]``, computed in float64. It is invariant to rescaling either
        volume by a positive factor and to adding a constant.

    Notes
    -----
    This is eq. (6) of the DeepDeWedge paper::

        CC(v, v*) = <v - mean(v), v* - mean(v*)> / (||v - mean(v)||_2 ||v* - mean(v*)||_2)

    It measures both denoising and missing-wedge reconstruction, as the ground truth contains
    the information the missing wedge removes.
    """
    x = _as_float64(a, "a")
    y = _as_float64(b, "b")
    if x.shape != y.shape:
        raise ValueError(
            f"a and b must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.numel() == 0:
        raise ValueError("a and b must not be empty")
    y = y.to(x.device)
    x = x - x.mean()
    y = y - y.mean()
    norm = torch.linalg.vector_norm(x) * torch.linalg.vector_norm(y)
    if not torch.isfinite(norm):
        raise ValueError("a and b must contain only finite values")
    if norm == 0:
        raise ValueError("the correlation coefficient is undefined for a constant volume")
    return float(torch.clamp((x * y).sum() / norm, -1.0, 1.0))
