"""Weight-only int8 linear layers: int8 weights with one scale per output channel.

    W (N, K) ~= Q * s[:, None],   Q int8 in [-127, 127],   s = max_k |W[n, k]| / 127

Decoding reads every language-model weight once per token, so its speed is the speed of
reading weights: int8 moves half of bfloat16's bytes and a quarter of float32's. A forward
with at most :func:`kernel_max_rows` rows (a decode step, a short prefill) multiplies by
the int8 weights directly (torch's ``_weight_int8pack_mm``); a forward with more rows is
compute-bound, and there converting the weights to the activations' dtype, one dense
matmul and a per-channel scale of its output is faster. Where that crossover lies depends
on the dense path's dtype (measured at 10240 x 2560): in bfloat16 (a CPU with native
bfloat16) the dense path wins from ~40 rows, the int8 kernel being 2.5x slower there; in
float32 (the default on AVX2 CPUs) converting the weight alone takes ~50 ms, and the int8
kernel wins up to ~200 rows.

:func:`quantize_weight` is what the loader calls on each weight as it streams the
checkpoint (:mod:`blipserve.weights`), so the full-precision model never exists whole.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

# rows up to which the int8 kernel beats dequantize + matmul, by the dense path's dtype
INT8_KERNEL_MAX_ROWS_FLOAT32 = 128
INT8_KERNEL_MAX_ROWS_HALF = 16  # bfloat16, float16


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> (N, K) int8 and (N,) float32 scales, symmetric per row."""
    w = weight.float()
    scales = w.abs().amax(dim=1) / 127.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero row
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scales


def kernel_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The activation dtype of the int8 multiply: bfloat16 on a CPU whatever the model dtype
    (torch's CPU int8 kernel is ~10x slower with float32 activations, measured on an AVX2
    machine), the model's dtype elsewhere."""
    return torch.bfloat16 if device.type == "cpu" else dtype


class Int8Linear(nn.Module):
    """``nn.Linear`` with int8 weights; the bias (if any) and the output keep the input dtype.

    Buffers ``weight`` (N, K) int8 and ``scales`` (N,) in the kernel dtype, so a state dict
    of quantized weights loads with ``load_state_dict``.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features, dtype=compute_dtype))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (M, K)
        if rows.shape[0] <= kernel_max_rows(x.dtype) and _has_int8_kernel(rows.device):
            out = torch.ops.aten._weight_int8pack_mm(
                rows.to(self.scales.dtype), self.weight, self.scales
            )
        else:
            # x (Q s)^T = (x Q^T) s: scale the (M, N) output, not the (N, K) weight. In the
            # model's dtype: bfloat16 matmul is emulated (5x slower) on a CPU without it.
            out = F.linear(rows, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias.to(x.dtype)


def replace_linears(root: nn.Module, compute_dtype: torch.dtype) -> list[str]:
    """Swap every ``nn.Linear`` under ``root`` for an :class:`Int8Linear` of the same shape
    (on the same device: use it on a meta-device model before loading). -> their names."""
    swapped = []
    for name, module in list(root.named_modules()):
        if isinstance(module, nn.Linear):
            parent, _, attr = name.rpartition(".")
            replacement = Int8Linear(
                module.in_features, module.out_features, module.bias is not None, compute_dtype
            ).to(module.weight.device)
            setattr(root.get_submodule(parent) if parent else root, attr, replacement)
            swapped.append(name)
    return swapped


def kernel_max_rows(dtype: torch.dtype) -> int:
    """Rows up to which a forward in ``dtype`` takes the int8 kernel (see the module doc)."""
    return INT8_KERNEL_MAX_ROWS_FLOAT32 if dtype == torch.float32 else INT8_KERNEL_MAX_ROWS_HALF


@functools.cache
def _has_int8_kernel(device: torch.device) -> bool:
    """torch ships ``_weight_int8pack_mm`` for CPUs; a device whose build lacks it (check at
    run time) takes the dequantizing path."""
    if device.type == "cpu":
        return True
    has_kernel = getattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", None)
    return bool(has_kernel and has_kernel("aten::_weight_int8pack_mm", device.type.upper()))
