"""Split a tilt series into two halves with independent noise (paper, step 1; appendix D.2)."""

from __future__ import annotations

import torch


def even_odd_indices(acquisition_order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack indices of the tilts acquired at even and at odd positions of the sequence.

    Parameters
    ----------
    acquisition_order
        `(n,)` permutation of ``0 .. n - 1``: ``acquisition_order[k]`` is the stack index of
        the k-th acquired tilt.

    Returns
    -------
    tuple of torch.Tensor
        `(n0,)` and `(n1,)` sorted stack indices of the two halves.

    Notes
    -----
    Splitting by order of acquisition, not by angle, gives two halves that each cover the
    whole tilt range, with the dose spread evenly between them, and whose noise is
    independent — so their reconstructions form a noise2noise pair.
    """
    order = torch.as_tensor(acquisition_order).detach().cpu().reshape(-1)
    n = order.numel()
    if order.is_floating_point() or order.dtype == torch.bool:
        raise ValueError("acquisition_order must hold integer stack indices")
    if n < 2:
        raise ValueError(f"need at least two tilts to split, got {n}")
    if not torch.equal(torch.sort(order).values, torch.arange(n)):
        raise ValueError(f"acquisition_order must be a permutation of 0..{n - 1}")
    return torch.sort(order[0::2]).values, torch.sort(order[1::2]).values


def random_fraction_indices(
    n_tilts: int, *, fraction: float = 0.5, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack indices of a random `fraction` of the tilts (half 0) and of the rest (half 1).

    This is the random split of the paper's appendix D.2: the model input is built from a
    fraction of the tilts, the target from the others.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must lie strictly between 0 and 1, got {fraction}")
    n0 = round(fraction * n_tilts)
    if not 0 < n0 < n_tilts:
        raise ValueError(f"a fraction of {fraction} of {n_tilts} tilts leaves one half empty")
    perm = torch.randperm(n_tilts, generator=generator)
    return torch.sort(perm[:n0]).values, torch.sort(perm[n0:]).values
