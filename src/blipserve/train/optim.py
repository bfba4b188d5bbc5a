"""The optimizer and learning-rate schedule every trainer here uses (stage 1, stage 2 and
the demo's pretraining): AdamW without decay on biases and norms, linear warmup then
cosine decay."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def build_optimizer(
    params: dict[str, torch.nn.Parameter],
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and the query tokens; none on biases and norms."""
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def warmup_cosine(warmup_steps: int, max_steps: int) -> Callable[[int], float]:
    """Learning-rate factor for 0-based optimizer step ``step``: linear warmup to 1 over
    ``warmup_steps``, then cosine decay towards 0 at ``max_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor
