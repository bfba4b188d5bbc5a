"""bfloat16 linear layers on a CPU with their weights pre-packed for oneDNN, once, at load.

A plain ``nn.Linear`` hands oneDNN a row-major weight on every call; packing it once into
oneDNN's blocked layout (what torch.compile's freezing pass does) made a 2560 x 10240
bfloat16 decode-step multiply 1.5-2.4x faster and a prefill's ~15% faster on this
project's AVX-512 machine (BENCHMARKS.md). It is applied from outside the model
(:func:`pack_linears`), to inference pipelines only: a packed layer has no gradient and
no state-dict entry. float32 layers are left alone, so float32 stays token-identical to
transformers.
"""

from __future__ import annotations

import torch
from torch import nn


def can_pack() -> bool:
    """Whether this torch build has oneDNN and the packed-linear operators."""
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


class PackedLinear(nn.Module):
    """``nn.Linear`` over a oneDNN-packed weight (``weight`` is an opaque mkldnn tensor)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def pack_linears(root: nn.Module) -> list[str]:
    """Replace every bfloat16 CPU ``nn.Linear`` under ``root`` with a :class:`PackedLinear`
    (no-op without oneDNN). -> the names replaced. One layer at a time, each plain weight
    freed as its packed copy takes its place, so memory never holds the model twice."""
    if not can_pack():
        return []
    names = [name for name, module in root.named_modules() if _packable(module)]
    for name in names:
        parent, _, attr = name.rpartition(".")
        owner = root.get_submodule(parent) if parent else root
        setattr(owner, attr, PackedLinear(getattr(owner, attr)))
    return names


def _packable(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        isinstance(module, nn.Linear)
        and weight is not None
        and weight.dtype == torch.bfloat16
        and weight.device.type == "cpu"
    )
