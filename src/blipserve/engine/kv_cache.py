"""A preallocated key/value cache for a decoder's self-attention (OPT's, T5's).

One tensor each for keys and values, shaped (layers, batch, heads, max_len, head_dim), sized
once for ``prefill length + max_new_tokens``: decode steps write one slot per row and never
reallocate. Beam search reorders rows with :meth:`KVCache.select`; a prompt prefilled once
per image is widened to its beams or samples with :meth:`KVCache.repeat_interleave`.

A continuous batch holds rows of different lengths in one :class:`RightAlignedCache`: every
row's newest entry sits in the same slot, shorter histories are left-padded and masked.
"""

from __future__ import annotations

import torch

from blipserve.model.common import KeyValueRows
from blipserve.model.opt import OPTConfig


class KVCache(KeyValueRows):
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

    def drop_leading(self, slots: int) -> None:
        """Forget the first ``slots`` slots (padding no row needs any more); a view, no copy."""
        if slots > 0:
            self.k = self.k[:, :, :, slots:]
            self.v = self.v[:, :, :, slots:]


class RightAlignedCache:
    """The self-attention cache of a continuous batch: rows of different lengths, right-aligned
    so that one decode step writes every row's new entry into the same slot ``length``.

        slots:  0 .............. length-1 | length (the next step's)
        row 0:  [pad pad | h0 h1 h2 h3 h4]
        row 1:  [h0 h1 h2 h3 h4 h5 h6    ]

    ``key_mask`` (B, capacity) marks the real slots. A row's slot and its position differ by
    its padding, the same for every entry of the row, so offsets between entries (all that
    relative positions see) are those of the row alone.
    """

    def __init__(self, cache: KVCache, key_mask: torch.Tensor, length: int) -> None:
        self.cache = cache
        self.key_mask = key_mask  # (B, >= length) bool
        self.length = length  # filled slots, the same for every row

    @classmethod
    def stack(cls, parts: list[RightAlignedCache], capacity: int) -> RightAlignedCache:
        """The rows of ``parts``, in order, in a new cache of ``capacity`` slots, all ending at
        slot ``max(length)``: shorter ones are left-padded.
        (L, Bi, H, *, hd) -> (L, sum Bi, H, capacity, hd)."""
        end = max(part.length for part in parts)
        assert capacity >= end, f"capacity {capacity} < {end} filled slots"
        layers, _, heads, _, head_dim = parts[0].cache.k.shape
        first = parts[0].cache.k
        rows = sum(part.cache.batch_size for part in parts)
        cache = KVCache(layers, rows, heads, capacity, head_dim, first.dtype, first.device)
        key_mask = torch.zeros(rows, capacity, dtype=torch.bool, device=first.device)
        row = 0
        for part in parts:
            b, n = part.cache.batch_size, part.length
            cache.k[:, row : row + b, :, end - n : end] = part.cache.k[:, :, :, :n]
            cache.v[:, row : row + b, :, end - n : end] = part.cache.v[:, :, :, :n]
            key_mask[row : row + b, end - n : end] = part.key_mask[:, :n]
            row += b
        return cls(cache, key_mask, end)

    def select(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (in that order), then forget leading slots that are padding in
        every row kept."""
        self.cache.select(index)
        self.key_mask = self.key_mask.index_select(0, index)
        used = self.key_mask[:, : self.length].any(dim=0)
        first = int(used.long().argmax().item())
        if first > 0:
            self.cache.drop_leading(first)
            self.key_mask = self.key_mask[:, first:]
            self.length -= first

    def open_slot(self) -> torch.Tensor | None:
        """Mark slot ``length`` real in every row (a step is about to fill it); -> the
        (B, length + 1) key mask the step attends with, or None where no row has padding."""
        self.key_mask[:, self.length] = True
        mask = self.key_mask[:, : self.length + 1]
        return None if bool(mask.all()) else mask
