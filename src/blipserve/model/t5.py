"""T5 encoder-decoder (T5 v1.1 / Flan-T5), the language model of the BLIP-2 Flan-T5 checkpoints.

Embeddings in, logits out; the engine owns the loop. Three separable calls:

- ``encode(inputs_embeds, attention_mask)``: ``inputs_embeds`` (B, S, d) is
  ``[32 query embeddings | embed(prompt ids) </s> | pad ...]``, ``attention_mask`` (B, S)
  marks the real entries; returns the encoder's final hidden states (B, S, d);
- ``cross_key_values(encoder_hidden)``: every decoder block's cross-attention keys and values
  of those states, (L, B, H, S, d_kv) each, computed once per image and kept
  (:class:`CrossKeyValues`);
- ``decode(decoder_input_ids, cross_kv, encoder_mask, cache, cache_start)``:
  ``decoder_input_ids`` (B, T) sit at decoder positions ``cache_start ...``; the first is
  ``decoder_start_token_id`` (the pad id, 0). With a ``cache`` the self-attention keys and
  values are written to its slots ``cache_start : cache_start + T`` and the queries see every
  slot before theirs; returns logits (B, T, V).

A real BLIP-2 Flan-T5 input for the VQA prompt "Question: what is it? Answer:":

    encoder:  q0 ... q31 | Question : what is it ? Answer : </s>      (bidirectional)
    decoder:  <pad> a cat </s>                                          (causal, cached)
              ^ decoder_start_token_id; the answer is what follows it

T5's quirks, ported as the reference has them:

- attention scores are ``q @ k^T`` with no ``1/sqrt(d_kv)`` (folded into the init);
- no position embeddings: block 0 of each stack holds a table of ``relative_attention_num_buckets``
  biases per head, looked up by ``relative_position_bucket(key - query)`` (bidirectional in
  the encoder, causal in the decoder); the (1, H, T, S) bias is computed once per stack and
  call and added to the scores of every block; padding and causality are added to it as
  ``-inf``-like values (``finfo.min``). Only offsets matter, so a prompt's padding side does not;
- RMS norm without bias or mean subtraction, its statistics in float32;
- feed-forward ``wo(gelu_tanh(wi_0 x) * wi_1 x)`` for ``gated-gelu``, ``wo(relu(wi x))``
  for ``relu``;
- the decoder output is scaled by ``d_model ** -0.5`` before the head when the checkpoint
  says ``scale_decoder_outputs`` (or, in files older than transformers 5, has
  ``tie_word_embeddings`` not false: original T5); Flan-T5 has its own ``lm_head`` and no scaling.

Parameter names match the Hugging Face ``T5ForConditionalGeneration`` state dict except
``{encoder,decoder}.embed_tokens.weight``, copies of ``shared.weight`` that we don't hold.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from blipserve.errors import UnsupportedModel
from blipserve.model.common import KeyValueRows, KVCacheLike, activation


@dataclass(frozen=True)
class T5Config:
    """T5 hyper-parameters; defaults are the reference's ``T5Config`` class defaults.

    ``tie_word_embeddings``: the head may be ``shared.weight`` (used when a checkpoint holds
    no ``lm_head.weight``). ``scale_decoder_outputs``: None reads it from
    ``tie_word_embeddings`` as the reference does; transformers 5 writes both (``true`` and
    ``false`` for an untied Flan-T5 head).
    """

    model_type: ClassVar[str] = "t5"
    is_encoder_decoder: ClassVar[bool] = True

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None  # None: num_layers (filled in on construction)
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool | None = None  # None: tie_word_embeddings (filled in)
    decoder_start_token_id: int = 0  # not a reference class default; every T5 checkpoint has 0
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1

    def __post_init__(self) -> None:
        if self.num_decoder_layers is None:
            object.__setattr__(self, "num_decoder_layers", self.num_layers)
        if self.scale_decoder_outputs is None:
            object.__setattr__(self, "scale_decoder_outputs", self.tie_word_embeddings)
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise UnsupportedModel(
                f"feed_forward_proj={self.feed_forward_proj!r} is not of the form "
                "'gated-{act}' or '{act}' (e.g. 'gated-gelu', 'relu')"
            )
        activation(self.act_name)  # raises UnsupportedModel naming the activation

    @classmethod
    def from_hf(cls, d: dict) -> T5Config:
        """Read a checkpoint's ``text_config``; omitted fields take the reference defaults."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def to_hf(self) -> dict:
        """The ``text_config`` entry of a ``config.json`` (the reference's ``T5Config``)."""
        return {"model_type": self.model_type, **asdict(self)}

    @property
    def hidden_size(self) -> int:
        """The reference's alias of ``d_model`` (the width BLIP-2 projects its queries to)."""
        return self.d_model

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def act_name(self) -> str:
        """The reference's ``dense_act_fn``: ``gated-gelu`` means the tanh GELU."""
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.split("-")[-1]


def relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """(key - query) offsets -> bucket ids in ``[0, num_buckets)``, as Mesh TensorFlow's T5.

    Half of the buckets hold exact offsets, the other half log-spaced ones up to
    ``max_distance``. Bidirectional: the upper half of the buckets is for keys after the query.
    Causal: keys after the query all fall in bucket 0 (and are masked anyway).
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = -relative_position.clamp(max=0)
    max_exact = num_buckets // 2
    log_ratio = torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


def padding_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, S) real-key flags -> (B, 1, 1, S) additive bias: finfo.min on padding, else 0."""
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill(~mask.bool(), torch.finfo(dtype).min)[:, None, None]


def causal_bias(
    query_start: int, num_queries: int, num_keys: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """(T, S) additive bias hiding from the queries at positions ``query_start ...`` the keys
    after them."""
    query = torch.arange(query_start, query_start + num_queries, device=device)[:, None]
    future = torch.arange(num_keys, device=device)[None, :] > query
    bias = torch.zeros(num_queries, num_keys, dtype=dtype, device=device)
    return bias.masked_fill(future, torch.finfo(dtype).min)


@dataclass
class CrossKeyValues(KeyValueRows):
    """The decoder's cross-attention keys and values of one batch of encoder outputs, for
    every block: (L, B, H, S, d_kv) each. Computed once per image; the engine widens the rows
    to beams or samples and picks rows as requests come and go."""

    k: torch.Tensor
    v: torch.Tensor

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, S, d_kv) keys and values of block ``index``."""
        return self.k[index], self.v[index]


class T5LayerNorm(nn.Module):
    """RMS norm: ``weight * x / rms(x)``, the statistics in float32; no bias, no mean."""

    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps)).to(self.weight.dtype)


class T5Attention(nn.Module):
    def __init__(
        self, config: T5Config, has_relative_attention_bias: bool, layer_idx: int = 0
    ) -> None:
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.num_heads, self.d_kv, self.layer_idx = config.num_heads, config.d_kv, layer_idx
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(
                config.relative_attention_num_buckets, config.num_heads
            )

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, H * d_kv) -> (B, H, T, d_kv)."""
        return x.view(x.shape[0], -1, self.num_heads, self.d_kv).transpose(1, 2)

    def key_values(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, d) -> keys and values, (B, H, S, d_kv) each."""
        return self._heads(self.k(source)), self._heads(self.v(source))

    def forward(
        self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        """Queries from ``x`` (B, T, d) over (B, H, S, d_kv) ``k``/``v``; ``bias`` broadcasts
        to (B, H, T, S)."""
        b, t, _ = x.shape
        q = self._heads(self.q(x))  # (B, H, T, d_kv)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)
        return self.o(out.transpose(1, 2).reshape(b, t, -1))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool, layer_idx: int):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias, layer_idx)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(
        self,
        x: torch.Tensor,
        bias: torch.Tensor,
        cache: KVCacheLike | None = None,
        cache_start: int = 0,
    ) -> torch.Tensor:
        attention = self.SelfAttention
        h = self.layer_norm(x)
        k, v = attention.key_values(h)  # (B, H, T, d_kv)
        if cache is not None:
            k, v = cache.update(attention.layer_idx, k, v, cache_start)  # (B, H, S, d_kv)
        return x + attention(h, k, v, bias)


class T5LayerCrossAttention(nn.Module):
    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.EncDecAttention = T5Attention(config, has_relative_attention_bias=False)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(
        self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], bias: torch.Tensor
    ) -> torch.Tensor:
        return x + self.EncDecAttention(self.layer_norm(x), *kv, bias)


class T5DenseActDense(nn.Module):
    """``wo(act(wi_0 x) * wi_1 x)`` when gated, else ``wo(act(wi x))``."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.is_gated = config.is_gated
        if self.is_gated:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.act = activation(config.act_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.is_gated else self.act(self.wi(x))
        if self.wo.weight.dtype.is_floating_point:  # an int8 ``wo`` takes any float input
            h = h.to(self.wo.weight.dtype)  # Flan-T5 may keep ``wo`` in float32
        return self.wo(h)


class T5LayerFF(nn.Module):
    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.DenseReluDense = T5DenseActDense(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    """``layer``: [self-attention, (cross-attention in the decoder,) feed-forward]."""

    def __init__(self, config: T5Config, is_decoder: bool, layer_idx: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(config, layer_idx == 0, layer_idx)])
        if is_decoder:
            self.layer.append(T5LayerCrossAttention(config))
        self.layer.append(T5LayerFF(config))

    def forward(
        self,
        x: torch.Tensor,
        self_bias: torch.Tensor,
        cross_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        cross_bias: torch.Tensor | None = None,
        cache: KVCacheLike | None = None,
        cache_start: int = 0,
    ) -> torch.Tensor:
        x = self.layer[0](x, self_bias, cache, cache_start)
        if cross_kv is not None:
            x = self.layer[1](x, cross_kv, cross_bias)
        return self.layer[-1](x)


class T5Stack(nn.Module):
    """The encoder or the decoder: blocks then a final RMS norm (embeddings live outside)."""

    def __init__(self, config: T5Config, is_decoder: bool) -> None:
        super().__init__()
        self.config, self.is_decoder = config, is_decoder
        n = config.num_decoder_layers if is_decoder else config.num_layers
        self.block = nn.ModuleList(T5Block(config, is_decoder, i) for i in range(n))
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def position_bias(
        self, query_start: int, num_queries: int, num_keys: int, device: torch.device
    ) -> torch.Tensor:
        """(1, H, T, S) relative position bias from block 0's table, shared by all blocks:
        queries at positions ``query_start ... query_start + T - 1``, keys at ``0 ... S - 1``."""
        query = torch.arange(query_start, query_start + num_queries, device=device)[:, None]
        key = torch.arange(num_keys, device=device)[None, :]
        bucket = relative_position_bucket(
            key - query,
            bidirectional=not self.is_decoder,
            num_buckets=self.config.relative_attention_num_buckets,
            max_distance=self.config.relative_attention_max_distance,
        )  # (T, S)
        table = self.block[0].layer[0].SelfAttention.relative_attention_bias
        return table(bucket).permute(2, 0, 1)[None]

    def forward(
        self,
        x: torch.Tensor,
        self_bias: torch.Tensor,
        cross_kv: CrossKeyValues | None = None,
        cross_bias: torch.Tensor | None = None,
        cache: KVCacheLike | None = None,
        cache_start: int = 0,
    ) -> torch.Tensor:
        for i, block in enumerate(self.block):
            layer_kv = None if cross_kv is None else cross_kv.layer(i)
            x = block(x, self_bias, layer_kv, cross_bias, cache, cache_start)
        return self.final_layer_norm(x)


class T5ForConditionalGeneration(nn.Module):
    """Shared token embedding, encoder, decoder and output head."""

    input_embedding_key: ClassVar[str] = "shared.weight"  # state-dict name

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, is_decoder=False)
        self.decoder = T5Stack(config, is_decoder=True)
        # A checkpoint without ``lm_head.weight`` uses ``shared.weight``; the loader ties it.
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    @property
    def input_embedding(self) -> nn.Embedding:
        """The token embedding table of encoder and decoder (what a tied ``lm_head`` shares)."""
        return self.shared

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, d) input embeddings (encoder and decoder alike)."""
        return self.shared(input_ids)

    def encode(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, S, d) embeddings, (B, S) real-entry flags -> (B, S, d) encoder hidden states."""
        s = inputs_embeds.shape[1]
        bias = self.encoder.position_bias(0, s, s, inputs_embeds.device)  # (1, H, S, S)
        bias = bias + padding_bias(attention_mask, bias.dtype)  # (B, H, S, S)
        return self.encoder(inputs_embeds, bias)

    def cross_key_values(self, encoder_hidden: torch.Tensor) -> CrossKeyValues:
        """(B, S, d) encoder states -> every decoder block's cross-attention keys and values,
        (L, B, H, S, d_kv) each."""
        pairs = [
            block.layer[1].EncDecAttention.key_values(encoder_hidden)
            for block in self.decoder.block
        ]
        return CrossKeyValues(
            torch.stack([k for k, _ in pairs]), torch.stack([v for _, v in pairs])
        )

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        cross_kv: CrossKeyValues,
        encoder_mask: torch.Tensor,
        cache: KVCacheLike | None = None,
        cache_start: int = 0,
        self_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) decoder ids at positions ``cache_start ...`` -> (B, T, V) logits.

        ``encoder_mask`` (B, S) flags the real encoder entries. Without a ``cache`` the ids
        are the whole decoder sequence so far (``cache_start`` 0); with one, its slots
        ``0 : cache_start`` hold the earlier positions' keys and values. ``self_mask``
        (B, cache_start + T) flags the real ones among all those slots (None: all are): rows
        of different lengths, left-padded, decode together; only offsets between slots
        reach the relative position bias, so the padding shifts nothing.
        """
        assert cache is not None or cache_start == 0, "cache_start needs a cache"
        x = self.embed_tokens(decoder_input_ids)  # (B, T, d)
        t, device = x.shape[1], x.device
        keys = cache_start + t
        self_bias = self.decoder.position_bias(cache_start, t, keys, device)  # (1, H, T, keys)
        if t > 1:
            self_bias = self_bias + causal_bias(cache_start, t, keys, self_bias.dtype, device)
        if self_mask is not None:
            self_bias = self_bias + padding_bias(self_mask, self_bias.dtype)  # (B, H, T, keys)
        cross_bias = padding_bias(encoder_mask, self_bias.dtype)  # (B, 1, 1, S)
        hidden = self.decoder(x, self_bias, cross_kv, cross_bias, cache, cache_start)
        if self.config.scale_decoder_outputs:
            hidden = hidden * self.config.d_model**-0.5
        return self.lm_head(hidden)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        decoder_input_ids: torch.Tensor,
    ) -> torch.Tensor:
        """Encode then decode without a cache: (B, S, d), (B, S), (B, T) -> (B, T, V) logits."""
        encoder_hidden = self.encode(inputs_embeds, attention_mask)
        return self.decode(decoder_input_ids, self.cross_key_values(encoder_hidden), attention_mask)
