"""Small pieces the model parts share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F

from blipserve.errors import UnsupportedModel

Activation = Callable[[torch.Tensor], torch.Tensor]

_ACTIVATIONS: dict[str, Activation] = {
    "gelu": F.gelu,  # exact (erf) GELU, as the reference's ACT2FN["gelu"]
    "relu": F.relu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def activation(name: str) -> Activation:
    """The activation function a config names; unknown names are a clear error."""
    if name not in _ACTIVATIONS:
        raise UnsupportedModel(
            f"activation {name!r} is not supported (supported: {', '.join(sorted(_ACTIVATIONS))})"
        )
    return _ACTIVATIONS[name]


class KVCacheLike(Protocol):
    """What attention needs from a key/value cache (see ``blipserve.engine.kv_cache``)."""

    def update(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, H, T, hd) ``k``/``v`` at ``start``; return all slots up to ``start + T``."""
        ...
