"""The keys and values of the last conversation turn, kept for the next one.

A chat follow-up's prompt starts with the previous turn's prompt and reply:

    turn 1:  [image queries] </s> Question : what is it ? Answer :            -> " a cat\\n"
    turn 2:  [image queries] </s> Question : what is it ? Answer : a cat Question : where ? ...

Those positions were already computed. :class:`ConversationCache` keeps the KV cache of
the last single-sequence generation; a request on the same image whose prompt ids extend
it copies those slots and prefills only the new tokens. A prefill of many tokens is
compute-bound, so a follow-up then costs about one decode step plus its answer.

The copied keys and values were computed in other matrix shapes than a fresh prefill
would use, so in float32 a follow-up can differ from a from-scratch run in the last bits
(as with any prefix caching); ``Pipeline(reuse_turns=False)`` turns it off.
"""

from __future__ import annotations

from dataclasses import dataclass

from blipserve.engine.kv_cache import KVCache


@dataclass(frozen=True)
class ReusedSlots:
    """Cache slots ``0 : slots`` of ``cache`` (row 0) hold what a new prompt starts with."""

    cache: KVCache
    slots: int


class ConversationCache:
    """One remembered sequence: the image it is about, its token ids, and their K/V."""

    def __init__(self) -> None:
        self.image_key: str | None = None
        self.token_ids: list[int] = []  # prompt + reply ids whose K/V the cache holds
        self.cache: KVCache | None = None
        self.reused = 0  # follow-ups served from here (for tests and metrics)

    def lookup(self, image_key: str, prompt_ids: list[int], queries: int) -> ReusedSlots | None:
        """Slots to copy for ``prompt_ids`` on ``image_key``: the image queries and the
        common start of the ids, leaving at least one prompt token to prefill."""
        if self.cache is None or image_key != self.image_key:
            return None
        common = 0
        limit = min(len(self.token_ids), len(prompt_ids) - 1)
        while common < limit and self.token_ids[common] == prompt_ids[common]:
            common += 1
        if common == 0:
            return None
        self.reused += 1
        return ReusedSlots(self.cache, queries + common)

    def remember(self, image_key: str, token_ids: list[int], cache: KVCache) -> None:
        self.image_key, self.token_ids, self.cache = image_key, list(token_ids), cache

    def clear(self) -> None:
        self.image_key, self.token_ids, self.cache = None, [], None
