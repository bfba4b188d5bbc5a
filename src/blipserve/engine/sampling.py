"""Next-token scores -> next token: small pure functions, applied in the reference's order.

For one decode step the engine applies, to float32 scores of shape (N, V):

1. :func:`apply_repetition_penalty` over every id the row has seen (``1.0`` = off);
2. :func:`suppress_tokens` on the eos ids while fewer than ``min_new_tokens`` were made;
3. when sampling only: :func:`apply_temperature`, :func:`top_k_filter`, :func:`top_p_filter`;
4. :func:`greedy_pick` or :func:`sample` (a per-request ``torch.Generator`` makes it repeatable).

Which ids a row has "seen" is kept as a (N, V) bool mask (:func:`seen_token_mask`,
:func:`mark_seen`) rather than a growing id list; the penalty is the same. The decode
states keep theirs in a :class:`SeenRows`.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def seen_token_mask(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(N, L) ids -> (N, V) bool, True for every id present; negative ids are ignored.

    Ids at or beyond ``vocab_size`` are ignored too: the head cannot produce them.
    """
    outside = (ids < 0) | (ids >= vocab_size)
    mask = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.bool, device=ids.device)
    mask.scatter_(1, ids.masked_fill(outside, vocab_size), True)
    return mask[:, :vocab_size]


def mark_seen(seen: torch.Tensor, token_ids: torch.Tensor) -> None:
    """Record one new (N,) token per row in the (N, V) ``seen`` mask, in place."""
    seen[torch.arange(seen.shape[0], device=seen.device), token_ids] = True


class SeenRows:
    """The ids each row of a decode state has seen, as a (N, V) ``mask`` (None when the
    repetition penalty is off); it follows the rows as they widen and are reordered."""

    def __init__(self, ids: torch.Tensor, vocab_size: int, track: bool) -> None:
        self.mask = seen_token_mask(ids, vocab_size) if track else None

    def repeat_interleave(self, repeats: int | torch.Tensor) -> None:
        """Each row becomes ``repeats`` consecutive rows (its beams or samples)."""
        if self.mask is not None:
            self.mask = self.mask.repeat_interleave(repeats, dim=0)

    def select(self, index: torch.Tensor) -> None:
        """Row ``i`` becomes old row ``index[i]``."""
        if self.mask is not None:
            self.mask = self.mask.index_select(0, index)

    def mark(self, token_ids: torch.Tensor) -> None:
        """Record one new (N,) token per row."""
        if self.mask is not None:
            mark_seen(self.mask, token_ids)


def apply_repetition_penalty(
    scores: torch.Tensor, seen: torch.Tensor, penalty: float
) -> torch.Tensor:
    """Make seen tokens less likely: negative scores times ``penalty``, positive ones divided."""
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalized, scores)


def suppress_tokens(scores: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Scores of ``token_ids`` (e.g. eos before ``min_new_tokens``) set to -inf."""
    return scores.index_fill(-1, token_ids, NEG_INF)


def apply_temperature(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    return scores / temperature


def top_k_filter(scores: torch.Tensor, top_k: int, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Keep the ``top_k`` best scores per row (ties with the k-th kept too), the rest -inf."""
    k = min(max(top_k, min_tokens_to_keep), scores.shape[-1])
    kth_best = torch.topk(scores, k).values[..., -1:]
    return scores.masked_fill(scores < kth_best, NEG_INF)


def top_p_filter(scores: torch.Tensor, top_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Nucleus filter: drop the least likely tokens whose total probability is <= 1 - top_p."""
    ascending, order = torch.sort(scores, descending=False)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= 1 - top_p
    drop_sorted[..., -min_tokens_to_keep:] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return scores.masked_fill(drop, NEG_INF)


def greedy_pick(scores: torch.Tensor) -> torch.Tensor:
    """(N, V) -> (N,) the best token (the lowest id among ties)."""
    return scores.argmax(dim=-1)


def sample(scores: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(N, V) -> (N,) one token per row drawn from ``softmax(scores)``."""
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A generator seeded for one request, or None (torch's global RNG) without a seed."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)
