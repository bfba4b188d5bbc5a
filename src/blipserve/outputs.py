"""Token ids -> text: finished generations, streamed text deltas and stop strings.

The Pipeline, the server and the batch runner all turn the engine's token ids into text
here, so a stop string, trailing whitespace or a character split across tokens comes
out the same on every path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from blipserve.engine.generate import FinishReason
from blipserve.processing.tokenizer import Tokenizer

StopCheck = Callable[[list[int]], bool]  # new token ids -> has a stop string appeared?


@dataclass(frozen=True)
class Generation:
    """One generated continuation."""

    text: str
    token_ids: list[int]  # new tokens only; the eos token is included when produced
    finish_reason: FinishReason


def to_generation(
    tokenizer: Tokenizer, token_ids: list[int], finish_reason: FinishReason, stops: Sequence[str]
) -> Generation:
    """The engine's new token ids -> a Generation whose text ends before any stop string."""
    text = truncate_at_stop(tokenizer.decode(token_ids), stops)
    return Generation(text=text, token_ids=list(token_ids), finish_reason=finish_reason)


def stop_check(tokenizer: Tokenizer, stops: Sequence[str]) -> StopCheck | None:
    """new token ids -> has one of ``stops`` appeared in their text? (None: no stops)"""
    if not stops:
        return None
    return lambda new_ids: any(s in tokenizer.decode(new_ids) for s in stops)


def truncate_at_stop(text: str, stops: Sequence[str]) -> str:
    """Cut ``text`` before the first stop string it contains (the stop is not returned)."""
    cut = min((i for s in stops if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut].strip()


class IncrementalDecoder:
    """Token ids -> text deltas, holding back incomplete UTF-8 and possible stop prefixes.

    The deltas add up to what :func:`to_generation` returns for the same ids.
    """

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.ids: list[int] = []
        self.sent = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = truncate_at_stop(self.tokenizer.decode(self.ids), self.stops)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens
            return ""
        # Trailing whitespace waits for the next word: the final text is stripped.
        safe = text[: len(text) - self._held_back(text)].rstrip()
        return self._emit(safe)

    def flush(self) -> str:
        return self._emit(truncate_at_stop(self.tokenizer.decode(self.ids), self.stops))

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that could start a stop string."""
        return max(
            (n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0
        )

    def _emit(self, text: str) -> str:
        if not text.startswith(self.sent):  # decode stripped differently: resend nothing
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta
