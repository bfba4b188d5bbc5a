"""Prefix embeddings + prompt ids -> new token ids, token-identical to the reference.

The reference (transformers 5.x ``Blip2ForConditionalGeneration.generate``) feeds its OPT
``generate`` one left-padded row per image:

    input_ids:  <pad> <pad> | <image> x Q | </s> Question : what is it ? Answer :
    embeds:     pad   pad   | q0 ... q31  | embed(</s> Question ...)
    positions:  -     -     | 0  ... 31   | 32 ...          (cumsum(mask) * mask - 1)

This module builds the same rows (:func:`build_prompt_batch`), runs one :func:`prefill`
over them into a preallocated :class:`KVCache`, then :func:`decode_step` one token per row.
The prefix is computed once per image and the prefilled cache is widened to the request's
beams or samples afterwards. What the reference does that we match:

- the repetition penalty sees the ``<image>`` ids (when ``image_token_id`` is given), BOS,
  the prompt and the new tokens, never the left padding;
- eos ids are suppressed while fewer than ``min_new_tokens`` new tokens exist;
- a finished row stays in the batch, fed ``pad_token_id``, so the batch keeps its shape and
  a seeded batch draws the same random numbers; its result ends at (and includes) the eos;
- beam search: see :mod:`blipserve.engine.beam_search`.

``temperature``, ``top_k`` and ``top_p`` only act with ``do_sample=True``; given without it
they are ignored, as in the reference (an API layer that wants "temperature implies
sampling" sets ``do_sample`` itself). Beam sampling (``do_sample`` with ``num_beams > 1``)
is refused.

A T5 language model (the Flan-T5 checkpoints) takes the same loops over another decode
state: the prefix and prompt go to its encoder once, the decoder steps from its start
token (:mod:`blipserve.engine.encoder_decoder`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from blipserve.engine.beam_search import BeamSearch
from blipserve.engine.conversation import ConversationCache, ReusedSlots
from blipserve.engine.encoder_decoder import EncoderDecoderState, build_encoder_batch
from blipserve.engine.kv_cache import KVCache
from blipserve.engine.params import GenerationParams
from blipserve.engine.rows import check_prompt_rows
from blipserve.engine.sampling import (
    SeenRows,
    apply_repetition_penalty,
    apply_temperature,
    greedy_pick,
    make_generator,
    sample,
    suppress_tokens,
    top_k_filter,
    top_p_filter,
)
from blipserve.errors import InvalidRequest
from blipserve.model.blip2 import LanguageModel
from blipserve.model.opt import OPTConfig, OPTForCausalLM
from blipserve.model.t5 import T5ForConditionalGeneration

FinishReason = Literal["stop", "length"]
StopChecker = Callable[[int, list[int]], bool]  # (input row, new token ids) -> stop now?


@dataclass(frozen=True)
class SequenceOutput:
    """One result: new tokens only (eos included when produced) and why it ended."""

    token_ids: list[int]
    finish_reason: FinishReason


@dataclass(frozen=True)
class TokenEvent:
    """One new token of one sequence; ``finish_reason`` is set on its last token."""

    row: int  # input row (image) index
    sample: int  # 0 .. num_return_sequences - 1
    token_id: int
    finish_reason: FinishReason | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


# -- prompt rows, prefill and decode ----------------------------------------------------------


@dataclass(frozen=True)
class PromptBatch:
    """Left-padded prefill rows ``[pad ... | prefix | embed(prompt ids)]``."""

    embeds: torch.Tensor  # (B, L, D)
    key_mask: torch.Tensor  # (B, L) bool, True on real entries
    padded: bool  # some row has left padding (else the model may skip its attention mask)
    position_ids: torch.Tensor  # (B, L) 0-based over real entries; -1 on padding
    history_ids: torch.Tensor  # (B, L) ids the repetition penalty sees; -1 = none


def build_prompt_batch(
    lm: OPTForCausalLM,
    prefix_embeds: torch.Tensor,
    prompt_ids: list[list[int]],
    *,
    pad_token_id: int,
    image_token_id: int | None,
) -> PromptBatch:
    """(B, Q, D) prefix + B prompts (each starting with BOS) -> left-padded prefill rows."""
    check_prompt_rows(prompt_ids, prefix_embeds.shape[0], "starting with BOS")
    device = prefix_embeds.device
    q = prefix_embeds.shape[1]
    longest = max(len(ids) for ids in prompt_ids)
    pads = [longest - len(ids) for ids in prompt_ids]
    text_ids = torch.tensor(
        [[pad_token_id] * n + ids for n, ids in zip(pads, prompt_ids, strict=True)], device=device
    )  # (B, T)
    text_embeds = lm.embed_tokens(text_ids).to(prefix_embeds.dtype)  # (B, T, D)
    image_id = -1 if image_token_id is None else image_token_id
    rows, history = [], []
    for i, (n, ids) in enumerate(zip(pads, prompt_ids, strict=True)):
        rows.append(torch.cat([text_embeds[i, :n], prefix_embeds[i], text_embeds[i, n:]]))
        history.append([-1] * n + [image_id] * q + ids)
    embeds = torch.stack(rows)  # (B, L, D), L = Q + T
    slot = torch.arange(q + longest, device=device)[None, :]
    key_mask = slot >= torch.tensor(pads, device=device)[:, None]  # (B, L)
    position_ids = key_mask.long().cumsum(-1) * key_mask - 1
    history_ids = torch.tensor(history, dtype=torch.long, device=device)
    return PromptBatch(embeds, key_mask, any(pads), position_ids, history_ids)


def prefill(lm: OPTForCausalLM, batch: PromptBatch, cache: KVCache) -> torch.Tensor:
    """Run the prompt rows once, filling cache slots ``0:L``; -> (B, V) next-token logits."""
    key_mask = batch.key_mask if batch.padded else None
    logits = lm(batch.embeds, batch.position_ids, key_mask, cache, 0, last_only=True)
    return logits[:, -1]


def decode_step(
    lm: OPTForCausalLM,
    token_ids: torch.Tensor,
    position_ids: torch.Tensor,
    key_mask: torch.Tensor | None,
    cache: KVCache,
    cache_start: int,
) -> torch.Tensor:
    """(N,) tokens at (N,) positions into slot ``cache_start``; -> (N, V) next-token logits.

    ``key_mask`` (N, cache_start + 1) marks the real slots, the new one included (None: all).
    """
    embeds = lm.embed_tokens(token_ids[:, None])  # (N, 1, D)
    logits = lm(embeds, position_ids[:, None], key_mask, cache, cache_start)
    return logits[:, -1]


class DecodeState:
    """What decode steps carry: the KV cache, the key mask, next positions, seen ids."""

    def __init__(
        self,
        lm: OPTForCausalLM,
        batch: PromptBatch,
        max_new_tokens: int,
        track_seen: bool,
        reuse: ReusedSlots | None = None,
    ) -> None:
        b, length = batch.key_mask.shape
        total = length + max_new_tokens
        self.lm = lm
        self.batch = batch
        self.cache = KVCache.for_model(lm.config, b, total, batch.embeds.dtype, batch.embeds.device)
        self.reused = 0  # slots copied from an earlier turn (one unpadded row only)
        if reuse is not None and b == 1 and not batch.padded:
            self.reused = reuse.slots
            self.cache.k[:, :, :, : reuse.slots] = reuse.cache.k[:, :1, :, : reuse.slots]
            self.cache.v[:, :, :, : reuse.slots] = reuse.cache.v[:, :1, :, : reuse.slots]
        self.key_mask = torch.zeros(b, total, dtype=torch.bool, device=batch.embeds.device)
        self.key_mask[:, :length] = batch.key_mask
        self.next_position = batch.key_mask.sum(dim=1)  # (B,) real tokens so far
        self.length = length  # filled cache slots
        self.seen = SeenRows(batch.history_ids, lm.config.vocab_size, track_seen)

    @property
    def batch_size(self) -> int:
        """Input rows (images), before widening to beams or samples."""
        return self.batch.key_mask.shape[0]

    def prefill(self) -> torch.Tensor:
        """-> (B, V) logits for the first new token (only the slots not reused are run)."""
        if not self.reused:
            return prefill(self.lm, self.batch, self.cache)
        start, batch = self.reused, self.batch
        embeds, positions = batch.embeds[:, start:], batch.position_ids[:, start:]
        key_mask = self.key_mask[:, : self.length]  # all real: needed past cached slots
        logits = self.lm(embeds, positions, key_mask, self.cache, start, last_only=True)
        return logits[:, -1]

    def repeat_interleave(self, repeats: int | torch.Tensor) -> None:
        """Each row becomes ``repeats`` consecutive rows (its beams or samples); a (B,)
        tensor gives each row its own count."""
        self.cache.repeat_interleave(repeats)
        self.key_mask = self.key_mask.repeat_interleave(repeats, dim=0)
        self.next_position = self.next_position.repeat_interleave(repeats, dim=0)
        self.seen.repeat_interleave(repeats)

    def reorder(self, index: torch.Tensor) -> None:
        """Row ``i`` becomes old row ``index[i]``."""
        self.cache.select(index)
        self.seen.select(index)

    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Feed one (N,) token per row; -> (N, V) logits for the next."""
        self.seen.mark(token_ids)
        self.key_mask[:, self.length] = True
        # A row past its last position has finished (its budget ran out): it steps on
        # padding, at the last position, while the others go on.
        last = self.lm.config.max_position_embeddings - 1
        logits = decode_step(
            self.lm,
            token_ids,
            self.next_position.clamp(max=last),
            self.key_mask[:, : self.length + 1] if self.batch.padded else None,
            self.cache,
            self.length,
        )
        self.length += 1
        self.next_position = self.next_position + 1
        return logits


def process_scores(
    scores: torch.Tensor,
    seen: torch.Tensor | None,
    params: GenerationParams,
    num_new: int,
    eos_ids: torch.Tensor,
) -> torch.Tensor:
    """(N, V) float32 scores -> processed scores, in the reference's processor order."""
    if params.repetition_penalty != 1.0:
        assert seen is not None
        scores = apply_repetition_penalty(scores, seen, params.repetition_penalty)
    if num_new < params.min_new_tokens:
        scores = suppress_tokens(scores, eos_ids)
    if params.do_sample:
        if params.temperature != 1.0:
            scores = apply_temperature(scores, params.temperature)
        if params.top_k != 0:
            scores = top_k_filter(scores, params.top_k)
        if params.top_p < 1.0:
            scores = top_p_filter(scores, params.top_p)
    return scores


# -- the loops ----------------------------------------------------------------------------


def token_budget(
    config: OPTConfig, prompt_positions: int, queries: int, max_new_tokens: int
) -> int:
    """New tokens a prompt of ``prompt_positions`` (``queries`` image queries included) may
    get: ``max_new_tokens``, or fewer where the model's learned positions run out first (the
    sequence then ends with ``finish_reason="length"``). A prompt that leaves no room for
    even one new token is refused."""
    limit = config.max_position_embeddings
    room = limit - prompt_positions
    if room < 1:
        raise InvalidRequest(
            f"the prompt takes {prompt_positions} positions ({queries} image queries, BOS and "
            f"{prompt_positions - queries - 1} text tokens) and the model has {limit}: no room "
            "is left to generate; shorten the prompt"
        )
    return min(max_new_tokens, room)


def row_budget(lm: LanguageModel, queries: int, prompt_length: int, max_new_tokens: int) -> int:
    """New tokens one row (``queries`` image queries + a prompt of ``prompt_length`` ids) may
    get: OPT's :func:`token_budget`; T5 has no position limit, so ``max_new_tokens``."""
    if isinstance(lm, T5ForConditionalGeneration):
        return max_new_tokens
    return token_budget(lm.config, queries + prompt_length, queries, max_new_tokens)


def decode_state(
    lm: LanguageModel,
    prefix_embeds: torch.Tensor,
    prompt_ids: list[list[int]],
    *,
    max_new_tokens: int,
    track_seen: bool,
    pad_token_id: int,
    image_token_id: int | None,
    reuse: ReusedSlots | None = None,
) -> DecodeState | EncoderDecoderState:
    """The decode state of the prompt rows, before prefill, with room for ``max_new_tokens``
    steps: :class:`DecodeState` (OPT) or :class:`EncoderDecoderState` (T5)."""
    if isinstance(lm, T5ForConditionalGeneration):
        encoder_batch = build_encoder_batch(
            lm, prefix_embeds, prompt_ids, pad_token_id=pad_token_id
        )
        return EncoderDecoderState(lm, encoder_batch, max_new_tokens, track_seen)
    batch = build_prompt_batch(
        lm, prefix_embeds, prompt_ids, pad_token_id=pad_token_id, image_token_id=image_token_id
    )
    return DecodeState(lm, batch, max_new_tokens, track_seen, reuse)


def _prepare(
    lm: LanguageModel,
    prefix_embeds: torch.Tensor,
    prompt_ids: list[list[int]],
    params: GenerationParams,
    pad_token_id: int,
    image_token_id: int | None,
    reuse: ReusedSlots | None = None,
) -> tuple[DecodeState | EncoderDecoderState, list[int]]:
    """The decode state of the prompt rows, and each row's :func:`row_budget`."""
    params.validate()
    q = prefix_embeds.shape[1]
    budgets = [row_budget(lm, q, len(ids), params.max_new_tokens) for ids in prompt_ids]
    state = decode_state(
        lm,
        prefix_embeds,
        prompt_ids,
        max_new_tokens=max(budgets, default=0),  # no rows: refused by the batch builder
        track_seen=params.repetition_penalty != 1.0,
        pad_token_id=pad_token_id,
        image_token_id=image_token_id,
        reuse=reuse,
    )
    return state, budgets


def _token_stream(
    state: DecodeState | EncoderDecoderState,
    budgets: list[int],
    params: GenerationParams,
    eos_token_ids: list[int],
    pad_token_id: int,
    stop_checker: StopChecker | None,
) -> Iterator[TokenEvent]:
    """Greedy or sampled decoding; every row steps until all have finished (row ``r`` ends
    with "length" after ``budgets[r]`` tokens)."""
    n = params.num_return_sequences
    logits = state.prefill()  # (B, V)
    state.repeat_interleave(n)
    logits = logits.repeat_interleave(n, dim=0)  # (N, V), N = B * n
    device = logits.device
    generator = make_generator(params.seed, device) if params.do_sample else None
    eos_ids = torch.tensor(eos_token_ids, dtype=torch.long, device=device)
    eos = set(eos_token_ids)
    new_ids: list[list[int]] = [[] for _ in range(logits.shape[0])]
    finished = [False] * len(new_ids)
    done = torch.zeros(len(new_ids), dtype=torch.bool, device=device)  # finished, on device
    for num_new in range(max(budgets)):
        scores = process_scores(logits.float(), state.seen.mask, params, num_new, eos_ids)
        tokens = sample(scores, generator) if params.do_sample else greedy_pick(scores)
        tokens = tokens.masked_fill(done, pad_token_id)  # finished rows step on padding
        for i, token in enumerate(tokens.tolist()):
            if finished[i]:
                continue
            new_ids[i].append(token)
            reason: FinishReason | None = None
            if token in eos or (stop_checker is not None and stop_checker(i // n, new_ids[i])):
                reason = "stop"
            elif len(new_ids[i]) == budgets[i // n]:
                reason = "length"
            finished[i] = reason is not None
            yield TokenEvent(row=i // n, sample=i % n, token_id=token, finish_reason=reason)
        if all(finished):
            return
        done = torch.tensor(finished, device=device)
        logits = state.step(tokens)


def _beam_search(
    state: DecodeState | EncoderDecoderState,
    budgets: list[int],
    params: GenerationParams,
    eos_token_ids: list[int],
    stop_checker: StopChecker | None,
) -> list[list[SequenceOutput]]:
    k = params.num_beams
    logits = state.prefill()  # (B, V)
    state.repeat_interleave(k)
    logits = logits.repeat_interleave(k, dim=0)  # (B * K, V)
    device = logits.device
    eos_ids = torch.tensor(eos_token_ids, dtype=torch.long, device=device)
    beams = BeamSearch.start(
        state.batch_size,
        k,
        max(budgets),
        params.length_penalty,
        params.early_stopping,
        eos_token_ids,
        device,
        row_limits=budgets,
    )
    while True:
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        log_probs = process_scores(log_probs, state.seen.mask, params, beams.step, eos_ids)
        parent = beams.advance(log_probs, stop_checker)
        if beams.finished:
            break
        state.reorder(parent)
        logits = state.step(beams.last_tokens())
    return [
        [SequenceOutput(h.token_ids, "stop" if h.ended else "length") for h in row]
        for row in beams.hypotheses(params.num_return_sequences)
    ]


@torch.inference_mode()
def stream(
    lm: LanguageModel,
    prefix_embeds: torch.Tensor,
    prompt_ids: list[list[int]],
    params: GenerationParams,
    *,
    eos_token_ids: list[int],
    pad_token_id: int,
    image_token_id: int | None,
    stop_checker: StopChecker | None = None,
    conversation: ConversationCache | None = None,
    image_key: str | None = None,
) -> Iterator[TokenEvent]:
    """Yield each new token as it is produced, for every row and sample.

    ``prefix_embeds`` (B, Q, D) are the projected query embeddings in the model dtype;
    ``prompt_ids`` one token list per image, each starting with BOS (OPT) or ending with
    ``</s>`` (T5). Beam search only knows
    its results at the end: with ``num_beams > 1`` the events of the final sequences are
    yielded after the search, row by row.

    With a ``conversation`` and the image's ``image_key``, one image generating one sequence
    (greedy or sampling) reuses the cached slots of an earlier turn its prompt extends, and
    leaves its own for the next turn (:mod:`blipserve.engine.conversation`; OPT only: a T5
    prompt is encoded whole).
    """
    single = len(prompt_ids) == 1 and params.num_beams == 1 and params.num_return_sequences == 1
    decoder_only = isinstance(lm, OPTForCausalLM)
    follows = conversation is not None and image_key is not None and single and decoder_only
    reuse = None
    if follows:
        reuse = conversation.lookup(image_key, prompt_ids[0], prefix_embeds.shape[1])
    state, budgets = _prepare(
        lm, prefix_embeds, prompt_ids, params, pad_token_id, image_token_id, reuse
    )
    if follows:
        new_ids = []
        tokens = _token_stream(state, budgets, params, eos_token_ids, pad_token_id, stop_checker)
        for event in tokens:
            new_ids.append(event.token_id)
            yield event
        # The cache holds every id but the last new one, which was never fed back.
        conversation.remember(image_key, prompt_ids[0] + new_ids[:-1], state.cache)
        return
    if params.num_beams > 1:
        results = _beam_search(state, budgets, params, eos_token_ids, stop_checker)
        for row, outputs in enumerate(results):
            for i, out in enumerate(outputs):
                for j, token in enumerate(out.token_ids):
                    last = j == len(out.token_ids) - 1
                    reason = out.finish_reason if last else None
                    yield TokenEvent(row=row, sample=i, token_id=token, finish_reason=reason)
        return
    yield from _token_stream(state, budgets, params, eos_token_ids, pad_token_id, stop_checker)


@torch.inference_mode()
def generate(
    lm: LanguageModel,
    prefix_embeds: torch.Tensor,
    prompt_ids: list[list[int]],
    params: GenerationParams,
    *,
    eos_token_ids: list[int],
    pad_token_id: int,
    image_token_id: int | None,
    stop_checker: StopChecker | None = None,
    conversation: ConversationCache | None = None,
    image_key: str | None = None,
) -> list[list[SequenceOutput]]:
    """Per input row, ``num_return_sequences`` results (best first for beam search);
    ``conversation`` and ``image_key`` as for :func:`stream`."""
    if params.num_beams > 1:
        state, budgets = _prepare(
            lm, prefix_embeds, prompt_ids, params, pad_token_id, image_token_id
        )
        return _beam_search(state, budgets, params, eos_token_ids, stop_checker)
    n = params.num_return_sequences
    tokens: list[list[list[int]]] = [[[] for _ in range(n)] for _ in prompt_ids]
    reasons: dict[tuple[int, int], FinishReason] = {}
    for event in stream(
        lm,
        prefix_embeds,
        prompt_ids,
        params,
        eos_token_ids=eos_token_ids,
        pad_token_id=pad_token_id,
        image_token_id=image_token_id,
        stop_checker=stop_checker,
        conversation=conversation,
        image_key=image_key,
    ):
        tokens[event.row][event.sample].append(event.token_id)
        if event.finish_reason is not None:
            reasons[event.row, event.sample] = event.finish_reason
    return [
        [SequenceOutput(ids, reasons[row, i]) for i, ids in enumerate(row_tokens)]
        for row, row_tokens in enumerate(tokens)
    ]


__all__ = [
    "DecodeState",
    "GenerationParams",
    "PromptBatch",
    "SequenceOutput",
    "TokenEvent",
    "build_prompt_batch",
    "decode_state",
    "decode_step",
    "generate",
    "prefill",
    "process_scores",
    "row_budget",
    "stream",
    "token_budget",
]
