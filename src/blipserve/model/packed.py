"""Linear layers on a CPU with their weights pre-packed for oneDNN, once, at load.

A plain ``nn.Linear`` hands its row-major weight to a BLAS on every call; packing it once
into oneDNN's blocked layout (what torch.compile's freezing pass does) made a 2560 x 10240
bfloat16 decode-step multiply 1.5-2.4x faster and a prefill's ~15% faster on this
project's AVX-512 machine, and float32 multiplies on an AVX2 machine 1.4x (one row),
2.6x (33 rows, a prefill) and 1.5x (257 rows, the image encoder) faster (BENCHMARKS.md).
It is applied from outside the model (:func:`pack_linears`), to inference pipelines
only: a packed layer has no gradient and no state-dict entry. Packed float32 sums in
another order than transformers' kernels (outputs agree to ~1e-6 relative), so the
loader packs float32 only where the dtype was left to ``auto``: asking for float32 by
name keeps the plain layers, token-identical to transformers.
"""

from __future__ import annotations

import functools

import torch
from torch import nn


@functools.cache
def can_pack(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether this torch build and processor pack ``dtype`` weights: oneDNN with the
    packed-linear operators, and for bfloat16 a CPU that oneDNN computes it on (AVX-512
    or AVX-NE-CONVERT; elsewhere it refuses). Probed once with a tiny weight."""
    ops = torch.ops.mkldnn
    if not (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    ):
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=dtype), 1)
    except RuntimeError:
        return False
    return True


class PackedLinear(nn.Module):
    """``nn.Linear`` over a oneDNN-packed weight (``weight`` is an opaque mkldnn tensor)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def pack_linears(root: nn.Module, dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,)) -> list[str]:
    """Replace every CPU ``nn.Linear`` under ``root`` whose weight is one of ``dtypes``
    (and packable here: :func:`can_pack`) with a :class:`PackedLinear`. -> the names
    replaced. One layer at a time, each plain weight freed as its packed copy takes its
    place, so memory never holds the model twice."""
    dtypes = tuple(dtype for dtype in dtypes if can_pack(dtype))
    names = [name for name, module in root.named_modules() if _packable(module, dtypes)]
    for name in names:
        parent, _, attr = name.rpartition(".")
        owner = root.get_submodule(parent) if parent else root
        setattr(owner, attr, PackedLinear(getattr(owner, attr)))
    return names


def _packable(module: nn.Module, dtypes: tuple[torch.dtype, ...]) -> bool:
    weight = getattr(module, "weight", None)
    return (
        isinstance(module, nn.Linear)
        and weight is not None
        and weight.dtype in dtypes
        and weight.device.type == "cpu"
    )
