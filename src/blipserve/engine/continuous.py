"""Continuous batching: sequences join a running decode batch at step boundaries and leave
as soon as they finish, so no request waits for the slowest one in its batch.

A :class:`ContinuousBatch` holds the rows being decoded, one self-attention KV cache for
all of them, right-aligned (:class:`~blipserve.engine.kv_cache.RightAlignedCache`): every
row's newest token sits in the same cache slot, rows that joined with shorter histories
are left-padded and masked. Each row decodes exactly as it would alone
(:func:`blipserve.engine.generate.stream`). OPT (:class:`DecoderOnlyRows`) keeps each
row's own learned positions:

    slots:   0 ........................................ length-1
    row 0:   [pad pad | q0..qQ | </s> prompt | new tokens ...]
    row 1:   [q0..qQ | </s> a longer prompt ..... | new tokens]

T5 (:class:`~blipserve.engine.encoder_decoder.EncoderDecoderRows`) runs each request's
encoder once, as it joins, keeps its cross-attention K/V per row (padded to the longest
encoder row and masked), and decodes ``[<pad> | new tokens]`` right-aligned the same way;
its relative positions see offsets between slots, which the alignment keeps.

:meth:`ContinuousBatch.add` prefills new requests together (one row per request, widened
to its ``n`` samples afterwards) through the offline engine's decode states and joins them;
:meth:`ContinuousBatch.step` picks one token for every row, reports them, drops finished
and cancelled requests and feeds the rest. A request's samples stay in the batch until all
of them finish, fed padding once done, exactly as in the offline engine: a seeded request
draws the same random numbers here as in ``Pipeline.generate``, whatever else is being
decoded beside it.

Beam search is not continuous (beams of one request are re-ranked together); the
scheduler runs those requests with :func:`blipserve.engine.generate.generate`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from blipserve.engine.encoder_decoder import EncoderDecoderRows, EncoderDecoderState
from blipserve.engine.generate import (
    DecodeState,
    FinishReason,
    decode_state,
    decode_step,
    process_scores,
    row_budget,
)
from blipserve.engine.kv_cache import KVCache, RightAlignedCache
from blipserve.engine.params import GenerationParams
from blipserve.engine.sampling import (
    greedy_pick,
    make_generator,
    mark_seen,
    sample,
)
from blipserve.errors import InvalidRequest
from blipserve.model.blip2 import LanguageModel
from blipserve.model.opt import OPTForCausalLM


@dataclass(eq=False)
class DecodeRequest:
    """One image + prompt to continue, ``params.num_return_sequences`` times."""

    prefix: torch.Tensor  # (Q, D) projected query embeddings, model dtype and device
    prompt_ids: list[int]  # BOS first (OPT), </s> last (T5)
    params: GenerationParams
    stop: Callable[[list[int]], bool] | None = None  # new ids of one sample -> stop now?
    cancelled: bool = False  # set from any thread; honoured at the next step
    # engine state
    new_ids: list[list[int]] = field(default_factory=list)  # per sample
    finished: list[FinishReason | None] = field(default_factory=list)  # per sample
    generator: torch.Generator | None = None
    budget: int = 0  # new tokens per sample: max_new_tokens, or fewer where OPT's positions end

    @property
    def done(self) -> bool:
        return bool(self.finished) and all(reason is not None for reason in self.finished)


@dataclass(frozen=True)
class StepEvent:
    """One new token of one sample of one request; ``finish_reason`` on its last."""

    request: DecodeRequest
    sample: int
    token_id: int
    finish_reason: FinishReason | None


class DecoderOnlyRows:
    """OPT rows of a continuous batch: the right-aligned cache and each row's next position
    (its real tokens so far: padding takes no position)."""

    def __init__(self, lm: OPTForCausalLM, slots: RightAlignedCache) -> None:
        self.lm = lm
        self.slots = slots
        self.next_position = slots.key_mask[:, : slots.length].sum(dim=1)  # (B,)

    @classmethod
    def from_state(cls, state: DecodeState) -> DecoderOnlyRows:
        """The rows of a prefilled state, widened or not."""
        return cls(state.lm, RightAlignedCache(state.cache, state.key_mask, state.length))

    @classmethod
    def stack(cls, parts: list[DecoderOnlyRows], capacity: int) -> DecoderOnlyRows:
        """The rows of ``parts``, in order; ``capacity`` slots."""
        return cls(parts[0].lm, RightAlignedCache.stack([part.slots for part in parts], capacity))

    def select(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (in that order)."""
        self.slots.select(index)
        self.next_position = self.next_position.index_select(0, index)

    def feed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """One (B,) token per row into slot ``length``; -> (B, V) logits for the next pick."""
        slots = self.slots
        key_mask = slots.open_slot()
        logits = decode_step(
            self.lm, token_ids, self.next_position, key_mask, slots.cache, slots.length
        )
        slots.length += 1
        self.next_position = self.next_position + 1
        return logits


BatchRows = DecoderOnlyRows | EncoderDecoderRows


def running_rows(state: DecodeState | EncoderDecoderState) -> BatchRows:
    """A prefilled decode state's rows, as a continuous batch holds them."""
    if isinstance(state, EncoderDecoderState):
        return EncoderDecoderRows.from_state(state)
    return DecoderOnlyRows.from_state(state)


class ContinuousBatch:
    def __init__(
        self,
        lm: LanguageModel,
        *,
        eos_token_ids: list[int],
        pad_token_id: int,
        image_token_id: int | None,
    ) -> None:
        self.lm = lm
        self.eos = set(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.image_token_id = image_token_id
        self._eos_ids: torch.Tensor | None = None
        self._reset()

    def _reset(self) -> None:
        """No rows: the state of a new batch."""
        self.requests: list[DecodeRequest] = []  # in row order; each owns n adjacent rows
        self.rows: BatchRows | None = None
        self.seen = torch.zeros(0, 0, dtype=torch.bool)  # (B, V) ids each row has seen
        self.logits: torch.Tensor | None = None  # (B, V) for the next pick

    @property
    def num_rows(self) -> int:
        return sum(r.params.num_return_sequences for r in self.requests)

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def cache(self) -> KVCache | None:
        """The self-attention cache of every row (None without rows)."""
        return None if self.rows is None else self.rows.slots.cache

    @property
    def key_mask(self) -> torch.Tensor:
        """(B, capacity) real self-attention slots."""
        if self.rows is None:
            return torch.zeros(0, 0, dtype=torch.bool)
        return self.rows.slots.key_mask

    @property
    def length(self) -> int:
        """Filled self-attention slots, the same for every row."""
        return 0 if self.rows is None else self.rows.slots.length

    # -- joining ---------------------------------------------------------------------------

    @torch.inference_mode()
    def add(self, requests: list[DecodeRequest]) -> None:
        """Prefill ``requests`` (greedy or sampling, no beams) and join the running rows."""
        if not requests:
            return
        lm = self.lm
        q = requests[0].prefix.shape[0]
        for request in requests:
            if request.params.num_beams != 1:
                raise InvalidRequest("continuous batching runs greedy and sampling requests only")
            request.budget = row_budget(
                lm, q, len(request.prompt_ids), request.params.max_new_tokens
            )
        prefix = torch.stack([r.prefix for r in requests])  # (b, Q, D)
        state = decode_state(
            lm,
            prefix,
            [r.prompt_ids for r in requests],
            max_new_tokens=1,  # the batch's cache takes the steps: only the prefill here
            track_seen=True,
            pad_token_id=self.pad_token_id,
            image_token_id=self.image_token_id,
        )
        logits = state.prefill()  # (b, V)
        repeats = torch.tensor(
            [r.params.num_return_sequences for r in requests], device=prefix.device
        )
        state.repeat_interleave(repeats)
        logits = logits.repeat_interleave(repeats, dim=0)
        for request in requests:
            n = request.params.num_return_sequences
            request.new_ids = [[] for _ in range(n)]
            request.finished = [None] * n
            if request.params.do_sample:
                request.generator = make_generator(request.params.seed, prefix.device)
        self._join(running_rows(state), logits, state.seen.mask, requests)

    def _join(
        self,
        rows: BatchRows,
        logits: torch.Tensor,
        seen: torch.Tensor,
        requests: list[DecodeRequest],
    ) -> None:
        """Append prefilled ``rows`` to the running ones."""
        everyone = self.requests + requests
        end = max(self.length, rows.slots.length)
        capacity = end + max(r.budget - len(r.new_ids[0]) for r in everyone)
        first = self.rows is None
        self.rows = type(rows).stack([rows] if first else [self.rows, rows], capacity)
        self.logits = logits if first else torch.cat([self.logits, logits])
        self.seen = seen if first else torch.cat([self.seen, seen])
        self.requests = everyone

    # -- stepping --------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[StepEvent]:
        """Pick the next token of every row; -> the new tokens of unfinished samples.

        Requests that finish (all samples) or were cancelled leave the batch."""
        self._keep([r for r in self.requests if not r.cancelled])
        if not self.requests:
            return []
        scores = self.logits.float()  # (B, V)
        tokens = greedy_pick(scores)
        if self._eos_ids is None:
            self._eos_ids = torch.tensor(sorted(self.eos), device=scores.device)
        row = 0
        for request in self.requests:
            n, p = request.params.num_return_sequences, request.params
            num_new = len(request.new_ids[0])
            if p.do_sample or p.repetition_penalty != 1.0 or num_new < p.min_new_tokens:
                rows = slice(row, row + n)
                processed = process_scores(scores[rows], self.seen[rows], p, num_new, self._eos_ids)
                tokens[rows] = (
                    sample(processed, request.generator) if p.do_sample else greedy_pick(processed)
                )
            row += n
        picked = tokens.tolist()
        events, row = [], 0
        for request in self.requests:
            for i in range(request.params.num_return_sequences):
                if request.finished[i] is None:
                    events.append(self._record(request, i, picked[row]))
                else:
                    picked[row] = self.pad_token_id  # a finished sample steps on padding
                row += 1
        tokens = torch.tensor(picked, device=tokens.device)
        self._keep([r for r in self.requests if not r.done], tokens)
        return events

    def _record(self, request: DecodeRequest, sample_index: int, token: int) -> StepEvent:
        ids = request.new_ids[sample_index]
        ids.append(token)
        reason: FinishReason | None = None
        if token in self.eos or (request.stop is not None and request.stop(ids)):
            reason = "stop"
        elif len(ids) == request.budget:
            reason = "length"
        request.finished[sample_index] = reason
        return StepEvent(request, sample_index, token, reason)

    def _keep(self, kept: list[DecodeRequest], tokens: torch.Tensor | None = None) -> None:
        """Keep ``kept`` requests' rows (and feed them ``tokens`` (B,) when given)."""
        if len(kept) != len(self.requests):
            rows, row = [], 0
            for request in self.requests:
                n = request.params.num_return_sequences
                if request in kept:
                    rows += range(row, row + n)
                row += n
            self.requests = kept
            if not kept:
                self._reset()
                return
            index = torch.tensor(rows, device=self.logits.device)
            self.rows.select(index)
            self.seen = self.seen.index_select(0, index)
            self.logits = self.logits.index_select(0, index)
            if tokens is not None:
                tokens = tokens.index_select(0, index)
        if tokens is not None:
            mark_seen(self.seen, tokens)
            self.logits = self.rows.feed(tokens)
