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


class KeyValueRows:
    """Keys and values of every layer, ``k`` and ``v`` shaped (L, B, ...) with the rows on
    dim 1: a row widened to its beams or samples, rows kept or reordered. Shared by the
    self-attention cache and T5's cross-attention keys and values."""

    k: torch.Tensor
    v: torch.Tensor

    def repeat_interleave(self, repeats: int | torch.Tensor) -> None:
        """Each row becomes ``repeats`` consecutive copies: (L, B, ...) -> (L, B * repeats,
        ...); a (B,) tensor gives each row its own count."""
        if isinstance(repeats, torch.Tensor) or repeats > 1:
            self.k = self.k.repeat_interleave(repeats, dim=1)
            self.v = self.v.repeat_interleave(repeats, dim=1)

    def select(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (in that order): row ``i`` becomes old row ``index[i]``."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)


class KVCacheLike(Protocol):
    """What attention needs from a key/value cache (see ``blipserve.engine.kv_cache``)."""

    def update(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, H, T, hd) ``k``/``v`` at ``start``; return all slots up to ``start + T``."""
        ...
