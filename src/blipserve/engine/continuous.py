"""Continuous batching: sequences join a running decode batch at step boundaries and leave
as soon as they finish, so no request waits for the slowest one in its batch.

A :class:`ContinuousBatch` holds the rows being decoded, one KV cache for all of them,
right-aligned: every row's newest token sits in the same cache slot, rows that joined
with shorter histories are left-padded and masked. Each row keeps its own positions, so
a row decodes exactly as it would alone (:func:`blipserve.engine.generate.stream`):

    slots:   0 ........................................ length-1
    row 0:   [pad pad | q0..qQ | </s> prompt | new tokens ...]
    row 1:   [q0..qQ | </s> a longer prompt ..... | new tokens]

:meth:`ContinuousBatch.add` prefills new requests together (one row per request, widened
to its ``n`` samples afterwards) and joins them; :meth:`ContinuousBatch.step` picks one
token for every row, reports them, drops finished and cancelled requests and feeds the
rest. A request's samples stay in the batch until all of them finish, fed padding once
done, exactly as in the offline engine: a seeded request draws the same random numbers
here as in ``Pipeline.generate``, whatever else is being decoded beside it.

Beam search is not continuous (beams of one request are re-ranked together); the
scheduler runs those requests with :func:`blipserve.engine.generate.generate`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from blipserve.engine.generate import (
    FinishReason,
    build_prompt_batch,
    decode_step,
    process_scores,
    token_budget,
)
from blipserve.engine.kv_cache import KVCache, stack_right_aligned
from blipserve.engine.params import GenerationParams
from blipserve.engine.sampling import (
    greedy_pick,
    make_generator,
    mark_seen,
    sample,
    seen_token_mask,
)
from blipserve.errors import InvalidRequest
from blipserve.model.opt import OPTForCausalLM


@dataclass(eq=False)
class DecodeRequest:
    """One image + prompt to continue, ``params.num_return_sequences`` times."""

    prefix: torch.Tensor  # (Q, D) projected query embeddings, model dtype and device
    prompt_ids: list[int]  # BOS first
    params: GenerationParams
    stop: Callable[[list[int]], bool] | None = None  # new ids of one sample -> stop now?
    cancelled: bool = False  # set from any thread; honoured at the next step
    # engine state
    new_ids: list[list[int]] = field(default_factory=list)  # per sample
    finished: list[FinishReason | None] = field(default_factory=list)  # per sample
    generator: torch.Generator | None = None
    budget: int = 0  # new tokens per sample: max_new_tokens, or fewer where positions run out

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


class ContinuousBatch:
    def __init__(
        self,
        lm: OPTForCausalLM,
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
        self.cache: KVCache | None = None
        self.key_mask = torch.zeros(0, 0, dtype=torch.bool)  # (B, capacity)
        self.next_position = torch.zeros(0, dtype=torch.long)  # (B,)
        self.seen = torch.zeros(0, 0, dtype=torch.bool)  # (B, V) ids each row has seen
        self.logits: torch.Tensor | None = None  # (B, V) for the next pick
        self.length = 0  # filled slots, the same for every row

    @property
    def num_rows(self) -> int:
        return sum(r.params.num_return_sequences for r in self.requests)

    def __len__(self) -> int:
        return len(self.requests)

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
            positions = q + len(request.prompt_ids)
            request.budget = token_budget(lm.config, positions, q, request.params.max_new_tokens)
        prefix = torch.stack([r.prefix for r in requests])  # (b, Q, D)
        batch = build_prompt_batch(
            lm,
            prefix,
            [r.prompt_ids for r in requests],
            pad_token_id=self.pad_token_id,
            image_token_id=self.image_token_id,
        )
        b, length = batch.key_mask.shape
        cache = KVCache.for_model(lm.config, b, length, prefix.dtype, prefix.device)
        key_mask = batch.key_mask if batch.padded else None
        logits = lm(batch.embeds, batch.position_ids, key_mask, cache, 0, last_only=True)[:, -1]
        seen = seen_token_mask(batch.history_ids, lm.config.vocab_size)  # (b, V)

        repeats = torch.tensor(
            [r.params.num_return_sequences for r in requests], device=prefix.device
        )
        cache.k = cache.k.repeat_interleave(repeats, dim=1)
        cache.v = cache.v.repeat_interleave(repeats, dim=1)
        new_mask = batch.key_mask.repeat_interleave(repeats, dim=0)
        logits = logits.repeat_interleave(repeats, dim=0)
        seen = seen.repeat_interleave(repeats, dim=0)
        for request in requests:
            n = request.params.num_return_sequences
            request.new_ids = [[] for _ in range(n)]
            request.finished = [None] * n
            if request.params.do_sample:
                request.generator = make_generator(request.params.seed, prefix.device)
        self._join(cache, new_mask, logits, seen, length, requests)

    def _join(self, cache, key_mask, logits, seen, length, requests) -> None:
        """Append prefilled rows (``cache`` with ``length`` slots) to the running ones."""
        everyone = self.requests + requests
        end = max(self.length, length)
        capacity = end + max(r.budget - len(r.new_ids[0]) for r in everyone)
        parts = (
            [(cache, length)]
            if self.cache is None
            else [(self.cache, self.length), (cache, length)]
        )
        self.cache = stack_right_aligned(parts, capacity)
        old = self.key_mask.shape[0]
        mask = torch.zeros(
            old + key_mask.shape[0], capacity, dtype=torch.bool, device=key_mask.device
        )
        mask[:old, end - self.length : end] = self.key_mask[:, : self.length]
        mask[old:, end - length : end] = key_mask
        self.key_mask = mask
        self.next_position = mask.sum(dim=1)  # positions count real tokens only
        self.logits = logits if old == 0 else torch.cat([self.logits, logits])
        self.seen = seen if old == 0 else torch.cat([self.seen, seen])
        self.length = end
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
            index = torch.tensor(rows, device=self.key_mask.device)
            self.cache.select(index)
            self.key_mask = self.key_mask.index_select(0, index)
            self.next_position = self.next_position.index_select(0, index)
            self.seen = self.seen.index_select(0, index)
            self.logits = self.logits.index_select(0, index)
            if tokens is not None:
                tokens = tokens.index_select(0, index)
            self._drop_leading_padding()
        if tokens is not None:
            self._feed(tokens)

    def _drop_leading_padding(self) -> None:
        """Forget leading slots that are padding in every remaining row."""
        used = self.key_mask[:, : self.length].any(dim=0)
        first = int(used.long().argmax().item())
        if first > 0:
            self.cache.drop_leading(first)
            self.key_mask = self.key_mask[:, first:]
            self.length -= first

    def _feed(self, tokens: torch.Tensor) -> None:
        """One (B,) token per row into slot ``length``; sets the logits for the next pick."""
        mark_seen(self.seen, tokens)
        self.key_mask[:, self.length] = True
        mask = self.key_mask[:, : self.length + 1]
        padded = not bool(mask.all())
        self.logits = decode_step(
            self.lm, tokens, self.next_position, mask if padded else None, self.cache, self.length
        )
        self.length += 1
        self.next_position = self.next_position + 1
