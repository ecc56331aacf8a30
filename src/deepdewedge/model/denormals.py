"""Denormal floats on the CPU."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def flush_denormals() -> Iterator[None]:
    """Treat denormal floats as zero while the block runs (CPU arithmetic only).

    Denormals (magnitudes below about 1.2e-38 in float32) turn up in the activations and
    gradients of a fit; x86 CPUs process them one to two orders of magnitude slower than
    normal numbers, which made a DeepDeWedge fit many times slower than the same fit without
    rotation and wedge masking. Flushing them to zero changes results by less than they are
    worth. GPUs are not affected. Where the CPU supports it, the setting is switched off again
    afterwards (PyTorch's default).
    """
    supported = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if supported:
            torch.set_flush_denormal(False)
