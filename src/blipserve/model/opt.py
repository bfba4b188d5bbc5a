"""OPT decoder (pre-LN), the language model of the BLIP-2 OPT checkpoints.

Embeddings in, logits out; the engine owns the loop. One call handles both phases:

- prefill: ``inputs_embeds`` (B, L, D) is the whole left-padded prompt
  ``[pad ... | 32 prefix embeddings | embed(</s> prompt ids)]``, ``key_mask`` (B, L) marks
  the real entries, and keys/values are written to the cache at ``cache_start=0``;
- decode: ``inputs_embeds`` (B, 1, D) is the embedding of the last picked token, written
  at ``cache_start = tokens already cached``; ``key_mask`` (B, cache_start + 1) covers them all.

``key_mask=None`` means every slot holds a real token (no left padding in the batch): the
attention then runs without an explicit mask (causal at prefill, none for one new token),
which lets ``scaled_dot_product_attention`` pick its fastest kernels, as the reference does.

Positions are 0-based over real tokens only (``cumsum(mask) * mask - 1``); the learned
position table is read at ``position + 2``, OPT's offset. Parameter names match the
Hugging Face state dict (``model.decoder.*``, ``lm_head``) so weights load without renaming.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from blipserve.errors import UnsupportedModel
from blipserve.model.common import KVCacheLike, activation

POSITION_OFFSET = 2  # OPT's learned position table starts at row 2


@dataclass(frozen=True)
class OPTConfig:
    """OPT hyper-parameters; defaults are the reference's ``OPTConfig`` class defaults."""

    model_type: ClassVar[str] = "opt"
    is_encoder_decoder: ClassVar[bool] = False

    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    max_position_embeddings: int = 2048
    num_attention_heads: int = 12
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int | None = None  # None: hidden_size (filled in on construction)
    activation_function: str = "relu"
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    pad_token_id: int | None = 1
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = True
    _remove_final_layer_norm: bool = False

    def __post_init__(self) -> None:
        if self.word_embed_proj_dim is None:
            object.__setattr__(self, "word_embed_proj_dim", self.hidden_size)
        if not self.do_layer_norm_before:
            raise UnsupportedModel(
                "do_layer_norm_before=False (post-LN OPT, e.g. opt-350m) is not supported; "
                "blipserve runs pre-LN OPT decoders"
            )
        if self.word_embed_proj_dim != self.hidden_size:
            raise UnsupportedModel(
                f"word_embed_proj_dim={self.word_embed_proj_dim} differs from hidden_size="
                f"{self.hidden_size} (project_in/project_out layers); not supported"
            )
        if self._remove_final_layer_norm:
            raise UnsupportedModel("_remove_final_layer_norm=True is not supported")
        if self.hidden_size % self.num_attention_heads:
            raise UnsupportedModel(
                f"hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        activation(self.activation_function)  # raises UnsupportedModel naming the activation

    @classmethod
    def from_hf(cls, d: dict) -> OPTConfig:
        """Read a checkpoint's ``text_config``; omitted fields take the reference defaults."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def to_hf(self) -> dict:
        """The ``text_config`` entry of a ``config.json`` (the reference's ``OPTConfig``)."""
        return {"model_type": self.model_type, **asdict(self)}

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def attention_mask(
    key_mask: torch.Tensor | None, num_new: int, cache_start: int
) -> tuple[torch.Tensor | None, bool]:
    """The ``(attn_mask, is_causal)`` pair for ``scaled_dot_product_attention``.

    Without padding (``key_mask`` None) no mask is built: one new token sees every cached
    slot, and a prefill from an empty cache is plain causal attention.
    """
    if key_mask is None and num_new == 1:
        return None, False
    if key_mask is None and cache_start == 0:
        return None, True
    assert key_mask is not None, "several new tokens after cached ones need a key_mask"
    return padded_attention_mask(key_mask, num_new, cache_start), False


def padded_attention_mask(key_mask: torch.Tensor, num_new: int, cache_start: int) -> torch.Tensor:
    """(B, S) real-key flags -> (B, 1, T, S) bool: causal over cache slots and real keys only.

    The T new queries sit at cache slots ``cache_start ... cache_start + T - 1``. Each query
    also sees its own slot, so padding queries attend to something and never produce NaN;
    real queries never see padding keys.
    """
    device = key_mask.device
    query_slot = torch.arange(cache_start, cache_start + num_new, device=device)[:, None]  # (T, 1)
    key_slot = torch.arange(key_mask.shape[1], device=device)[None, :]  # (1, S)
    visible = (key_slot <= query_slot)[None] & key_mask[:, None, :]  # (B, T, S)
    visible = visible | (key_slot == query_slot)[None]
    return visible[:, None]


class OPTAttention(nn.Module):
    def __init__(self, config: OPTConfig, layer_idx: int) -> None:
        super().__init__()
        d, bias = config.hidden_size, config.enable_bias
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.k_proj = nn.Linear(d, d, bias=bias)
        self.v_proj = nn.Linear(d, d, bias=bias)
        self.out_proj = nn.Linear(d, d, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        mask: tuple[torch.Tensor | None, bool],
        cache: KVCacheLike | None,
        cache_start: int,
    ) -> torch.Tensor:
        b, t, d = x.shape
        heads = (b, t, self.num_heads, self.head_dim)
        q = (self.q_proj(x) * self.scaling).view(heads).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(heads).transpose(1, 2)
        v = self.v_proj(x).view(heads).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, cache_start)  # (B, H, S, hd)
        attn_mask, is_causal = mask
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=1.0
        )
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class OPTDecoderLayer(nn.Module):
    """``x + attn(ln(x))`` then ``x + fc2(act(fc1(ln(x))))``."""

    def __init__(self, config: OPTConfig, layer_idx: int) -> None:
        super().__init__()
        d, affine = config.hidden_size, config.layer_norm_elementwise_affine
        self.self_attn = OPTAttention(config, layer_idx)
        self.self_attn_layer_norm = nn.LayerNorm(d, elementwise_affine=affine)
        self.fc1 = nn.Linear(d, config.ffn_dim, bias=config.enable_bias)
        self.fc2 = nn.Linear(config.ffn_dim, d, bias=config.enable_bias)
        self.final_layer_norm = nn.LayerNorm(d, elementwise_affine=affine)
        self.act = activation(config.activation_function)

    def forward(
        self,
        x: torch.Tensor,
        mask: tuple[torch.Tensor | None, bool],
        cache: KVCacheLike | None,
        cache_start: int,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask, cache, cache_start)
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


class OPTDecoder(nn.Module):
    def __init__(self, config: OPTConfig) -> None:
        super().__init__()
        d, affine = config.hidden_size, config.layer_norm_elementwise_affine
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + POSITION_OFFSET, d)
        self.layers = nn.ModuleList(
            OPTDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.final_layer_norm = nn.LayerNorm(d, elementwise_affine=affine)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        key_mask: torch.Tensor | None,
        cache: KVCacheLike | None,
        cache_start: int,
        last_only: bool,
    ) -> torch.Tensor:
        """(B, T, D) embeddings -> (B, T or 1, D) final hidden states."""
        if cache is None:
            assert cache_start == 0, "cache_start needs a cache"
        num_new = inputs_embeds.shape[1]
        if key_mask is not None:
            assert key_mask.shape[1] == cache_start + num_new, "key_mask must cover all slots"
        mask = attention_mask(key_mask, num_new, cache_start)  # ((B, 1, T, S) | None, causal)
        x = inputs_embeds + self.embed_positions(position_ids + POSITION_OFFSET)
        for layer in self.layers:
            x = layer(x, mask, cache, cache_start)
        if last_only:
            x = x[:, -1:]
        return self.final_layer_norm(x)


class OPTModel(nn.Module):
    """Holds ``decoder`` under the checkpoint's ``model`` prefix."""

    def __init__(self, config: OPTConfig) -> None:
        super().__init__()
        self.decoder = OPTDecoder(config)


class OPTForCausalLM(nn.Module):
    """OPT decoder with its (tied) output head."""

    input_embedding_key: ClassVar[str] = "model.decoder.embed_tokens.weight"  # state-dict name

    def __init__(self, config: OPTConfig) -> None:
        super().__init__()
        self.config = config
        self.model = OPTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def input_embedding(self) -> nn.Embedding:
        """The token embedding table (what a tied ``lm_head`` shares)."""
        return self.model.decoder.embed_tokens

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, D) input embeddings."""
        return self.model.decoder.embed_tokens(input_ids)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        key_mask: torch.Tensor | None,
        cache: KVCacheLike | None = None,
        cache_start: int = 0,
        last_only: bool = False,
    ) -> torch.Tensor:
        """(B, T, D) embeddings at 0-based ``position_ids`` (B, T) -> (B, T, V) logits.

        ``key_mask`` (B, cache_start + T) is True where a key slot holds a real token; None
        when all of them do.
        ``last_only`` computes logits for the last position only: (B, 1, V).
        """
        hidden = self.model.decoder(
            inputs_embeds, position_ids, key_mask, cache, cache_start, last_only
        )
        return self.lm_head(hidden)
