"""A preallocated key/value cache for the OPT decoder.

One tensor each for keys and values, shaped (layers, batch, heads, max_len, head_dim), sized
once for ``prefill length + max_new_tokens``: decode steps write one slot per row and never
reallocate. Beam search reorders rows with :meth:`KVCache.reorder`; a prompt prefilled once
per image is widened to its beams or samples with :meth:`KVCache.repeat_interleave`.
"""

from __future__ import annotations

import torch

from blipserve.model.opt import OPTConfig


class KVCache:
    def __init__(
        self,
        num_layers: int,
        batch: int,
        num_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (num_layers, batch, num_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @classmethod
    def for_model(
        cls,
        config: OPTConfig,
        batch: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> KVCache:
        return cls(
            config.num_hidden_layers,
            batch,
            config.num_attention_heads,
            max_len,
            config.head_dim,
            dtype,
            device,
        )

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, H, T, hd) ``k``/``v`` at slots ``start:start+T``; return slots ``:start+T``."""
        end = start + k.shape[2]
        assert end <= self.max_len, f"cache holds {self.max_len} slots, asked for {end}"
        self.k[layer_idx, :, :, start:end] = k
        self.v[layer_idx, :, :, start:end] = v
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Row ``i`` becomes old row ``index[i]`` (beam search keeps its surviving beams)."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)

    def repeat_interleave(self, repeats: int) -> None:
        """Each row becomes ``repeats`` consecutive copies: (B, ...) -> (B * repeats, ...)."""
        if repeats > 1:
            self.k = self.k.repeat_interleave(repeats, dim=1)
            self.v = self.v.repeat_interleave(repeats, dim=1)

    def select(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (in that order); same as :meth:`reorder`, named for removal."""
        self.reorder(index)

    def drop_leading(self, slots: int) -> None:
        """Forget the first ``slots`` slots (padding no row needs any more); a view, no copy."""
        if slots > 0:
            self.k = self.k[:, :, :, slots:]
            self.v = self.v[:, :, :, slots:]


def stack_right_aligned(parts: list[tuple[KVCache, int]], capacity: int) -> KVCache:
    """Stack the rows of caches holding ``length`` filled slots each into a new cache of
    ``capacity`` slots, all ending at slot ``max(length)``: shorter ones are left-padded
    (their key masks must say so). (L, Bi, H, *, hd) -> (L, sum Bi, H, capacity, hd)."""
    end = max(length for _, length in parts)
    assert capacity >= end, f"capacity {capacity} < {end} filled slots"
    layers, _, heads, _, head_dim = parts[0][0].k.shape
    first = parts[0][0].k
    rows = sum(cache.batch_size for cache, _ in parts)
    joined = KVCache(layers, rows, heads, capacity, head_dim, first.dtype, first.device)
    row = 0
    for cache, length in parts:
        b = cache.batch_size
        joined.k[:, row : row + b, :, end - length : end] = cache.k[:, :, :, :length]
        joined.v[:, row : row + b, :, end - length : end] = cache.v[:, :, :, :length]
        row += b
    return joined
