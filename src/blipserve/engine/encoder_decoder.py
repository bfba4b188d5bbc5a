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

The server's continuous batch keeps T5 rows as :class:`EncoderDecoderRows`: each joining
request is prefilled here (encoder, cross-attention K/V, start token), then its rows sit
beside the running ones, the cross-attention K/V right-padded to the longest encoder row
(masked), the decoder's self-attention right-aligned (masked on the left).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blipserve.engine.kv_cache import KVCache, RightAlignedCache
from blipserve.engine.rows import check_prompt_rows
from blipserve.engine.sampling import SeenRows
from blipserve.model.t5 import CrossKeyValues, T5ForConditionalGeneration


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
        self.seen = SeenRows(start, config.vocab_size, track_seen)

    @property
    def batch_size(self) -> int:
        """Input rows (images), before widening to beams or samples."""
        return self.batch.mask.shape[0]

    def prefill(self) -> torch.Tensor:
        """Encode once, keep the cross-attention K/V, feed the start token; -> (B, V) logits."""
        encoder_hidden = self.lm.encode(self.batch.embeds, self.batch.mask)  # (B, S, d)
        self.cross_kv = self.lm.cross_key_values(encoder_hidden)  # (L, B, H, S, d_kv) each
        return self._decode(self.start_ids)

    def repeat_interleave(self, repeats: int | torch.Tensor) -> None:
        """Each row becomes ``repeats`` consecutive rows (its beams or samples); a (B,)
        tensor gives each row its own count."""
        assert self.cross_kv is not None, "prefill first"
        self.cross_kv.repeat_interleave(repeats)
        self.cache.repeat_interleave(repeats)
        self.encoder_mask = self.encoder_mask.repeat_interleave(repeats, dim=0)
        self.seen.repeat_interleave(repeats)

    def reorder(self, index: torch.Tensor) -> None:
        """Row ``i`` becomes old row ``index[i]``. Beam parents stay within their image, whose
        rows share one encoder output: the cross-attention K/V need no reordering."""
        self.cache.select(index)
        self.seen.select(index)

    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Feed one (N,) token per row; -> (N, V) logits for the next."""
        self.seen.mark(token_ids)
        return self._decode(token_ids[:, None])

    def _decode(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(N, 1) ids into cache slot ``length``; -> (N, V) logits."""
        assert self.cross_kv is not None
        logits = self.lm.decode(
            token_ids, self.cross_kv, self.encoder_mask, self.cache, self.length
        )  # (N, 1, V)
        self.length += 1
        return logits[:, -1]


class EncoderDecoderRows:
    """T5 rows of a continuous batch (:class:`blipserve.engine.continuous.ContinuousBatch`),
    each decoding as it would alone:

        cross-attention K/V (L, B, H, S, d_kv):  row 0  q0 .. q31 | prompt </s> | pad pad
                                                 row 1  q0 .. q31 | a longer prompt </s>
        decoder self-attention (right-aligned):  row 0  [pad pad | <pad> a cat]
                                                 row 1  [<pad> a photo of a]

    The encoder padding is masked (``encoder_mask``), as in a batch of prompts; the decoder's
    left padding is masked too, and its slots keep each row's offsets, all that T5's
    relative position bias sees.
    """

    def __init__(
        self,
        lm: T5ForConditionalGeneration,
        slots: RightAlignedCache,
        cross_kv: CrossKeyValues,
        encoder_mask: torch.Tensor,
    ) -> None:
        self.lm = lm
        self.slots = slots
        self.cross_kv = cross_kv
        self.encoder_mask = encoder_mask  # (B, S) bool, True on real entries

    @classmethod
    def from_state(cls, state: EncoderDecoderState) -> EncoderDecoderRows:
        """The rows of a prefilled state (encoded, the start token fed), widened or not."""
        assert state.cross_kv is not None, "prefill first"
        b = state.encoder_mask.shape[0]
        real = torch.ones(b, state.length, dtype=torch.bool, device=state.encoder_mask.device)
        slots = RightAlignedCache(state.cache, real, state.length)
        return cls(state.lm, slots, state.cross_kv, state.encoder_mask)

    @classmethod
    def stack(cls, parts: list[EncoderDecoderRows], capacity: int) -> EncoderDecoderRows:
        """The rows of ``parts``, in order; ``capacity`` decoder slots."""
        slots = RightAlignedCache.stack([part.slots for part in parts], capacity)
        width = max(part.encoder_mask.shape[1] for part in parts)
        k = torch.cat([_pad_right(part.cross_kv.k, width, dim=3) for part in parts], dim=1)
        v = torch.cat([_pad_right(part.cross_kv.v, width, dim=3) for part in parts], dim=1)
        mask = torch.cat([_pad_right(part.encoder_mask, width, dim=1) for part in parts])
        return cls(parts[0].lm, slots, CrossKeyValues(k, v), mask)

    def select(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (in that order); forget padding no kept row needs."""
        self.slots.select(index)
        self.cross_kv.select(index)
        self.encoder_mask = self.encoder_mask.index_select(0, index)
        width = int(self.encoder_mask.sum(dim=1).max().item())  # real entries come first
        if width < self.encoder_mask.shape[1]:
            self.encoder_mask = self.encoder_mask[:, :width]
            self.cross_kv = CrossKeyValues(
                self.cross_kv.k[:, :, :, :width], self.cross_kv.v[:, :, :, :width]
            )

    def feed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """One (B,) token per row into slot ``length``; -> (B, V) logits for the next pick."""
        slots = self.slots
        self_mask = slots.open_slot()
        logits = self.lm.decode(
            token_ids[:, None],
            self.cross_kv,
            self.encoder_mask,
            slots.cache,
            slots.length,
            self_mask=self_mask,
        )  # (B, 1, V)
        slots.length += 1
        return logits[:, -1]


def _pad_right(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``x`` with zeros (False) appended along ``dim`` up to ``width`` entries."""
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_zeros(shape)], dim=dim)
