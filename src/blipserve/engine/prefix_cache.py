"""Image prefixes kept by image content: the same pixels skip the vision encoder and Q-Former.

The server's scheduler and the Pipeline (chat follow-ups, several questions about one
image) share this: a follow-up about an image costs only prefill and decode.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

Encoder = Callable[[torch.Tensor], torch.Tensor]  # (M, 3, H, W) pixels -> (M, Q, D) prefixes


def pixels_key(pixels: torch.Tensor) -> str:
    """A content hash of one image's preprocessed pixels (any leading batch dim of 1)."""
    return hashlib.sha256(pixels.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


class PrefixCache:
    """An LRU of (Q, D) prefixes by :func:`pixels_key`; ``size`` 0 keeps nothing (but
    identical images in one call are still encoded once)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.hits = 0
        self.misses = 0
        self._prefixes: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._prefixes)

    def prefixes(
        self, keys: Sequence[str], pixels: Sequence[torch.Tensor], encode: Encoder
    ) -> list[torch.Tensor]:
        """(Q, D) prefix per image: from the cache, or ``encode`` run once, batched, over
        the distinct images not cached. ``pixels[i]`` is (1, 3, H, W) or (3, H, W)."""
        missing: dict[str, torch.Tensor] = {}
        for key, image in zip(keys, pixels, strict=True):
            if key in self._prefixes:
                self._prefixes.move_to_end(key)
                self.hits += 1
            elif key not in missing:
                missing[key] = image.reshape(1, *image.shape[-3:])
                self.misses += 1
            else:
                self.hits += 1
        found = {key: self._prefixes[key] for key in set(keys) - missing.keys()}
        if missing:
            encoded = encode(torch.cat(list(missing.values())))  # (M, Q, D)
            for key, prefix in zip(missing, encoded, strict=True):
                found[key] = prefix
                self._remember(key, prefix)
        return [found[key] for key in keys]

    def _remember(self, key: str, prefix: torch.Tensor) -> None:
        if self.size <= 0:
            return
        self._prefixes[key] = prefix
        while len(self._prefixes) > self.size:
            self._prefixes.popitem(last=False)
