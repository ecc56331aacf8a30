"""How a fit moves through its epochs: learning-rate schedule, weight averaging, early stop."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

# The cosine decay ends at this fraction of the peak learning rate, not at zero, so that
# the last steps still move the weights.
FINAL_LR_FACTOR = 0.01
# Warm-up length of the cosine schedule when none is given, as a fraction of the fit.
DEFAULT_WARMUP_FRACTION = 0.05


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimiser step `step` (0-based).

    ``constant`` is 1 throughout. ``cosine`` rises linearly over `warmup_steps` (from
    ``1 / warmup_steps``, so that the first step already moves), then follows half a cosine
    from 1 down to :data:`FINAL_LR_FACTOR` at the last step, `total_steps - 1`.
    """
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; use constant or cosine")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(total_steps - 1 - warmup_steps, 1)
    t = min((step - warmup_steps) / decay_steps, 1.0)
    return FINAL_LR_FACTOR + (1 - FINAL_LR_FACTOR) * 0.5 * (1 + math.cos(math.pi * t))


def warmup_epochs(given: int | None, num_epochs: int) -> int:
    """Warm-up epochs of the cosine schedule: `given`, else 5% of the fit (at least one)."""
    if given is not None:
        return given
    return max(1, round(DEFAULT_WARMUP_FRACTION * num_epochs))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group of `optimizer`."""
    for group in optimizer.param_groups:
        group["lr"] = lr


class WeightAverage:
    """Exponential moving average of a network's parameters over optimiser steps.

    After each step, ``avg ← d · avg + (1 − d) · weights`` with ``d = 2^(−1 / half_life)``: a
    step's weights count half as much `half_life_steps` steps later. Early on, while the
    average holds few steps, ``d`` is capped at ``(1 + n) / (10 + n)`` after `n` updates,
    so that the random initialisation is soon forgotten. Buffers (the input statistics) are
    not averaged: the network's current ones apply.
    """

    def __init__(self, model: nn.Module, half_life_steps: float) -> None:
        if not half_life_steps > 0:
            raise ValueError(f"half_life_steps must be positive, got {half_life_steps}")
        self.decay = 0.5 ** (1.0 / half_life_steps)
        self.updates = 0
        self.average = {name: p.detach().clone().float() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current parameters of `model` into the average."""
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, p in model.named_parameters():
            self.average[name].lerp_(p.detach().float(), 1 - d)

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """`model` with the averaged parameters inside the block, its own ones after."""
        own = {name: p.detach().clone() for name, p in model.named_parameters()}
        self._copy_into(model, self.average)
        try:
            yield model
        finally:
            self._copy_into(model, own)

    def copy_to(self, model: nn.Module) -> None:
        """Give `model` the averaged parameters for good."""
        self._copy_into(model, self.average)

    @torch.no_grad()
    def _copy_into(self, model: nn.Module, values: dict[str, torch.Tensor]) -> None:
        for name, p in model.named_parameters():
            p.copy_(values[name])

    def state_dict(self) -> dict[str, Any]:
        """The average and its number of updates, for a checkpoint."""
        return {"updates": self.updates, "average": self.average}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the average stored by :meth:`state_dict`."""
        self.updates = int(state["updates"])
        for name, value in state["average"].items():
            self.average[name].copy_(value)


@contextmanager
def averaged(average: WeightAverage | None, model: nn.Module) -> Iterator[nn.Module]:
    """`model` with the averaged weights when averaging, else `model` unchanged."""
    if average is None:
        yield model
    else:
        with average.applied(model):
            yield model


def patience_exhausted(history: list[dict[str, Any]], patience: int | None) -> bool:
    """Whether validation found no lower loss in the `patience` epochs after the lowest.

    `history` holds one record per epoch (``epoch``, ``val_loss``, None where not computed).
    False without a patience or before any validation loss.
    """
    if not patience:
        return False
    checked = [r for r in history if r.get("val_loss") is not None]
    if not checked:
        return False
    best = min(checked, key=lambda r: r["val_loss"])
    # Counted to the last validation: without one since, an improvement is not ruled out.
    return checked[-1]["epoch"] - best["epoch"] >= patience
