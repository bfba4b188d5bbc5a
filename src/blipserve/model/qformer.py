"""Querying Transformer: 32 learned queries read the image through cross-attention.

A BERT-style post-LN encoder. Layers ``i % cross_attention_frequency == 0`` also
cross-attend to the image sequence. For captioning (OPT checkpoints) it sees the query
tokens only:

    query_tokens (1, 32, 768) --layernorm--> (B, 32, 768)
    each layer:  x = LN(x + self_attn(x))
                 x = LN(x + cross_attn(x, image))      # cross-attention layers only
                 x = LN(x + ffn(x))                    # intermediate_query / output_query
    --> (B, 32, 768)

With ``use_qformer_text_input`` (stage 1 and image-text matching checkpoints) text embeddings
may follow the queries in one sequence ``[queries (Q) | text (T)]``: self-attention
spans both under a caller's mask (bidirectional, unimodal or causal), only the query
positions cross-attend to the image, and text positions take their own feed-forward
(``intermediate`` / ``output``). ``Q == 0`` encodes text alone.

The reference keeps the Q-Former in fp32 whatever the model dtype; :mod:`blip2` casts
its inputs and outputs. Parameter names match the ``qformer.*`` checkpoint keys.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blipserve.model.common import activation


@dataclass(frozen=True)
class QFormerConfig:
    """Q-Former hyper-parameters; defaults are the reference's (BERT-base sized)."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408
    # Text input (stage 1 and image-text matching; BERT-base-uncased's vocabulary).
    use_qformer_text_input: bool = False
    vocab_size: int = 30522
    max_position_embeddings: int = 512

    @classmethod
    def from_hf(cls, d: dict, *, encoder_hidden_size: int) -> QFormerConfig:
        """Read ``qformer_config``; like the reference, the cross-attention input width
        always follows the vision tower's hidden size, whatever the file says."""
        known = {name: d[name] for name in cls.__dataclass_fields__ if name in d}
        known["encoder_hidden_size"] = encoder_hidden_size
        config = cls(**known)
        assert config.hidden_size % config.num_attention_heads == 0, "hidden not divisible by heads"
        return config

    def to_hf(self) -> dict:
        """The ``qformer_config`` entry of a ``config.json`` (``Blip2QFormerConfig``)."""
        return {"model_type": "blip_2_qformer", **asdict(self)}

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def has_cross_attention(self, layer_idx: int) -> bool:
        return layer_idx % self.cross_attention_frequency == 0


class MultiHeadAttention(nn.Module):
    """Separate query/key/value projections; keys and values may come from the image."""

    def __init__(self, config: QFormerConfig, kv_size: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(kv_size, d)
        self.value = nn.Linear(kv_size, d)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, T, d) attends to context (B, S, kv_size) -> (B, T, d); ``mask`` is a
        boolean (B, 1, T, S), True where attending is allowed."""
        b, t, d = x.shape
        q = self.query(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = (
            self.key(context)
            .view(b, context.shape[1], self.num_heads, self.head_dim)
            .transpose(1, 2)
        )
        v = (
            self.value(context)
            .view(b, context.shape[1], self.num_heads, self.head_dim)
            .transpose(1, 2)
        )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim**-0.5)
        return out.transpose(1, 2).reshape(b, t, d)


class ResidualOutput(nn.Module):
    """Post-LN residual: ``LayerNorm(dense(h) + x)`` (BERT's SelfOutput / Output)."""

    def __init__(self, in_size: int, config: QFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(in_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + x)


class AttentionBlock(nn.Module):
    def __init__(self, config: QFormerConfig, kv_size: int) -> None:
        super().__init__()
        self.attention = MultiHeadAttention(config, kv_size)
        self.output = ResidualOutput(config.hidden_size, config)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.output(self.attention(x, context, mask), x)


class Intermediate(nn.Module):
    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class QFormerLayer(nn.Module):
    def __init__(self, config: QFormerConfig, layer_idx: int) -> None:
        super().__init__()
        self.attention = AttentionBlock(config, config.hidden_size)
        if config.has_cross_attention(layer_idx):
            self.crossattention = AttentionBlock(config, config.encoder_hidden_size)
        else:
            self.crossattention = None
        self.intermediate_query = Intermediate(config)
        self.output_query = ResidualOutput(config.intermediate_size, config)
        if config.use_qformer_text_input:
            self.intermediate = Intermediate(config)
            self.output = ResidualOutput(config.intermediate_size, config)

    def forward(
        self,
        x: torch.Tensor,
        image: torch.Tensor | None,
        num_queries: int | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, Q + T, d): ``num_queries`` query positions (all of them when None), then
        text; ``mask`` (B, 1, Q + T, Q + T) for self-attention -> (B, Q + T, d)."""
        x = self.attention(x, x, mask)
        q = x.shape[1] if num_queries is None else num_queries
        queries, text = x[:, :q], x[:, q:]
        if q and self.crossattention is not None:
            queries = self.crossattention(queries, image)
        queries = self.output_query(self.intermediate_query(queries), queries)
        if text.shape[1] == 0:
            return queries
        text = self.output(self.intermediate(text), text)
        return torch.cat([queries, text], dim=1)


class QFormerEncoder(nn.Module):
    """Holds ``layer`` under the checkpoint's ``encoder`` prefix."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(config, i) for i in range(config.num_hidden_layers))


class QFormer(nn.Module):
    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = QFormerEncoder(config)

    def forward(
        self,
        queries: torch.Tensor,
        image: torch.Tensor | None,
        text: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """queries (B, Q, d) and image (B, S, d_vision), in this module's dtype -> (B, Q, d).

        With ``text`` (B, T, d) embeddings (see :class:`TextEmbeddings`) and a boolean
        self-attention ``mask`` (B, 1, Q + T, Q + T): -> (B, Q + T, d). ``Q`` may be 0.
        """
        num_queries = queries.shape[1]
        x = queries if text is None else torch.cat([queries, text.to(queries.dtype)], dim=1)
        x = self.layernorm(x)
        for layer in self.encoder.layer:
            x = layer(x, image, num_queries, mask)
        return x


class TextEmbeddings(nn.Module):
    """Word + position embeddings of the Q-Former's text input (the layer norm is the
    Q-Former's own, applied to queries and text together)."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, d)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.word_embeddings(input_ids) + self.position_embeddings(positions)
