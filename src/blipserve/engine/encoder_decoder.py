"""Decode state for an encoder-decoder language model (BLIP-2's Flan-T5), token-identical to
the reference's ``generate``.

transformers 5.x ``Blip2ForConditionalGeneration.generate`` hands T5's ``generate`` the
query embeddings scattered over the ``<image>`` slots of the processor's ids, the prompt
after them, and the attention mask. With the T5 tokenizer's right padding:

    encoder:  q0 ... q31 | Question : what is it ? Answer : </s> | pad ...    (once per image)
    decoder:  <pad>  a  cat  </s>                                             (one token a step)
              ^ decoder_start_token_id (0); the new tokens are what follows it

:func:`build_encoder_batch` makes those rows; :class:`EncoderDecoderState` runs the encoder
once, keeps every decoder block's cross-attention keys and values of its output
(:class:`~blipserve.model.t5.CrossKeyValues`, widened to the beams or samples after the
first step), and steps the decoder through a preallocated self-attention :class:`KVCache`.
It offers what :mod:`blipserve.engine.generate`'s loops use from the OPT state
(``prefill``, ``step``, ``repeat_interleave``, ``reorder``, ``seen``, ``batch_size``), so
greedy, sampling, beam search, the penalties and stop checks are shared, not copied.

What differs from OPT, as the reference does it:

- the repetition penalty sees the decoder's ids only: the start token and the new tokens
  (never the image queries or the prompt, which went to the encoder);
- the encoder has no position limit (relative buckets), so every row may make
  ``max_new_tokens``;
- relative positions make the encoder blind to where the padding sits only when the real
  entries are contiguous: the reference's default (right padding) is what we match. A
  left-padding tokenizer would put the padding *between* the queries and the prompt
  (``Blip2Processor`` prepends the queries after padding) and change the offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blipserve.engine.kv_cache import KVCache
from blipserve.engine.rows import check_prompt_rows
from blipserve.engine.sampling import mark_seen, seen_token_mask
from blipserve.model.t5 import T5ForConditionalGeneration


@dataclass(frozen=True)
class EncoderBatch:
    """Right-padded encoder rows ``[prefix | embed(prompt ids) | pad ...]``."""

    embeds: torch.Tensor  # (B, S, d)
    mask: torch.Tensor  # (B, S) bool, True on real entries


def build_encoder_batch(
    lm: T5ForConditionalGeneration,
    prefix_embeds: torch.Tensor,
    prompt_ids: list[list[int]],
    *,
    pad_token_id: int,
) -> EncoderBatch:
    """(B, Q, d) prefix + B prompts (each ending with ``</s>``) -> right-padded encoder rows."""
    check_prompt_rows(prompt_ids, prefix_embeds.shape[0], "ending with </s>")
    device = prefix_embeds.device
    q = prefix_embeds.shape[1]
    longest = max(len(ids) for ids in prompt_ids)
    lengths = torch.tensor([len(ids) for ids in prompt_ids], device=device)
    text_ids = torch.tensor(
        [ids + [pad_token_id] * (longest - len(ids)) for ids in prompt_ids], device=device
    )  # (B, T)
    text_embeds = lm.embed_tokens(text_ids).to(prefix_embeds.dtype)  # (B, T, d)
    embeds = torch.cat([prefix_embeds, text_embeds], dim=1)  # (B, Q + T, d)
    slot = torch.arange(q + longest, device=device)[None, :]
    mask = slot < q + lengths[:, None]  # (B, Q + T)
    return EncoderBatch(embeds, mask)


class EncoderDecoderState:
    """What decode steps carry for T5: cross-attention K/V, encoder mask, self-attention
    cache, the decoder position, and the ids the repetition penalty has seen."""

    def __init__(
        self,
        lm: T5ForConditionalGeneration,
        batch: EncoderBatch,
        max_new_tokens: int,
        track_seen: bool,
    ) -> None:
        config = lm.config
        b = batch.mask.shape[0]
        self.lm = lm
        self.batch = batch
        self.encoder_mask = batch.mask  # (B, S), widened with the rows
        # Slots: the start token, then every new token but the last (never fed back).
        self.cache = KVCache(
            config.num_decoder_layers,
            b,
            config.num_heads,
            max_new_tokens,
            config.d_kv,
            batch.embeds.dtype,
            batch.embeds.device,
        )
        self.cross_kv = None
        self.length = 0  # filled decoder slots
        start = torch.full((b, 1), config.decoder_start_token_id, device=batch.embeds.device)
        self.start_ids = start  # (B, 1)
        self.seen = seen_token_mask(start, config.vocab_size) if track_seen else None

    @property
    def batch_size(self) -> int:
        """Input rows (images), before widening to beams or samples."""
        return self.batch.mask.shape[0]

    def prefill(self) -> torch.Tensor:
        """Encode once, keep the cross-attention K/V, feed the start token; -> (B, V) logits."""
        encoder_hidden = self.lm.encode(self.batch.embeds, self.batch.mask)  # (B, S, d)
        self.cross_kv = self.lm.cross_key_values(encoder_hidden)  # (L, B, H, S, d_kv) each
        return self._decode(self.start_ids)

    def repeat_interleave(self, repeats: int) -> None:
        """Each row becomes ``repeats`` consecutive rows (its beams or samples)."""
        assert self.cross_kv is not None, "prefill first"
        self.cross_kv.repeat_interleave(repeats)
        self.cache.repeat_interleave(repeats)
        self.encoder_mask = self.encoder_mask.repeat_interleave(repeats, dim=0)
        if self.seen is not None:
            self.seen = self.seen.repeat_interleave(repeats, dim=0)

    def reorder(self, index: torch.Tensor) -> None:
        """Row ``i`` becomes old row ``index[i]``. Beam parents stay within their image, whose
        rows share one encoder output: the cross-attention K/V need no reordering."""
        self.cache.reorder(index)
        if self.seen is not None:
            self.seen = self.seen.index_select(0, index)

    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Feed one (N,) token per row; -> (N, V) logits for the next."""
        if self.seen is not None:
            mark_seen(self.seen, token_ids)
        return self._decode(token_ids[:, None])

    def _decode(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(N, 1) ids into cache slot ``length``; -> (N, V) logits."""
        assert self.cross_kv is not None
        logits = self.lm.decode(
            token_ids, self.cross_kv, self.encoder_mask, self.cache, self.length
        )  # (N, 1, V)
        self.length += 1
        return logits[:, -1]
