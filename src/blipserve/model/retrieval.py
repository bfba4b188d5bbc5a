"""BLIP-2's first stage: the Q-Former that matches images with text (no language model).

The layout of ``Salesforce/blip2-itm-vit-g`` (transformers' ``Blip2ForImageTextRetrieval``),
and what stage-1 training (:mod:`blipserve.train.stage1`) produces:

    pixels -> vision_model -> image (B, 257, d_v)
    image-text contrast (ITC), unimodal:
        queries attend to the image   -> (B, Q, d) -> vision_projection -> (B, Q, 256), L2-normed
        text attends to itself        -> [CLS] (B, d) -> text_projection -> (B, 256), L2-normed
        similarity(image, text) = max over the Q queries of the cosine
    image-text matching (ITM), bidirectional:
        [queries | text] in one sequence, queries also attend to the image
        -> itm_head on the query positions (B, Q, 2) -> mean over queries -> (B, 2)
           (index 1: "matches")

The precision policy is :mod:`blip2`'s: query tokens and the Q-Former stay float32.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from blipserve.errors import UnsupportedModel
from blipserve.model.qformer import QFormer, QFormerConfig, TextEmbeddings
from blipserve.model.vision import VisionConfig, VisionTransformer

RETRIEVAL_ARCHITECTURE = "Blip2ForImageTextRetrieval"


@dataclass(frozen=True)
class Blip2RetrievalConfig:
    vision: VisionConfig
    qformer: QFormerConfig  # with use_qformer_text_input
    num_query_tokens: int = 32
    image_text_hidden_size: int = 256

    @classmethod
    def from_hf(cls, d: dict) -> Blip2RetrievalConfig:
        if d.get("model_type", "blip-2") != "blip-2":
            raise UnsupportedModel(f"model_type {d.get('model_type')!r} is not BLIP-2")
        vision = VisionConfig.from_hf(d.get("vision_config") or {})
        qformer = QFormerConfig.from_hf(
            d.get("qformer_config") or {}, encoder_hidden_size=vision.hidden_size
        )
        return cls(
            vision=vision,
            qformer=replace(qformer, use_qformer_text_input=True),
            num_query_tokens=d.get("num_query_tokens", 32),
            image_text_hidden_size=d.get("image_text_hidden_size", 256),
        )

    def to_hf(self) -> dict:
        """A ``config.json`` that transformers' ``Blip2ForImageTextRetrieval`` loads."""
        return {
            "architectures": [RETRIEVAL_ARCHITECTURE],
            "model_type": "blip-2",
            "vision_config": self.vision.to_hf(),
            "qformer_config": self.qformer.to_hf(),
            "num_query_tokens": self.num_query_tokens,
            "image_text_hidden_size": self.image_text_hidden_size,
        }


def is_retrieval_config(d: dict) -> bool:
    """Whether a ``config.json`` describes an image-text matching (stage-1) checkpoint."""
    return RETRIEVAL_ARCHITECTURE in (d.get("architectures") or [])


class Blip2Retrieval(nn.Module):
    """Image-text contrast and matching; parameter names match the reference's."""

    def __init__(self, config: Blip2RetrievalConfig) -> None:
        super().__init__()
        self.config = config
        d = config.qformer.hidden_size
        self.vision_model = VisionTransformer(config.vision)
        self.query_tokens = nn.Parameter(torch.empty(1, config.num_query_tokens, d))
        self.embeddings = TextEmbeddings(config.qformer)
        self.qformer = QFormer(config.qformer)
        self.vision_projection = nn.Linear(d, config.image_text_hidden_size)
        self.text_projection = nn.Linear(d, config.image_text_hidden_size)
        self.itm_head = nn.Linear(d, 2)

    @torch.no_grad()
    def vision_features(self, pixels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """(N, 3, H, W) pixels -> (N, S, d_vision) frozen image-encoder outputs, float32,
        computed ``batch_size`` images at a time on the model's device."""
        device = self.query_tokens.device
        dtype = self.vision_model.embeddings.patch_embedding.weight.dtype
        parts = [
            self.vision_model(pixels[i : i + batch_size].to(device, dtype)).float()
            for i in range(0, len(pixels), batch_size)
        ]
        return torch.cat(parts)

    def query_image(self, image: torch.Tensor) -> torch.Tensor:
        """(B, S, d_vision) image sequence -> (B, Q, d) query outputs, float32."""
        queries = self.query_tokens.expand(image.shape[0], -1, -1)
        return self.qformer(queries, image.to(queries.dtype))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and 0/1 mask -> (B, T, d) text outputs (text attends to itself only)."""
        text = self.embeddings(input_ids)  # (B, T, d)
        empty = text.new_zeros(text.shape[0], 0, text.shape[2]).to(self.query_tokens.dtype)
        return self.qformer(empty, None, text, key_mask(attention_mask))

    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        """(B, S, d_vision) -> (B, Q, 256) L2-normalised query features."""
        out = self.query_image(image)
        return F.normalize(
            self.vision_projection(out.to(self.vision_projection.weight.dtype)), dim=-1
        )

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids ([CLS] first) -> (B, 256) L2-normalised [CLS] features."""
        cls = self.encode_text(input_ids, attention_mask)[:, 0]
        return F.normalize(self.text_projection(cls.to(self.text_projection.weight.dtype)), dim=-1)

    def match_logits(
        self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Image sequences (B, S, d_vision) and texts (B, T) -> (B, 2) ITM logits, pairwise."""
        queries = self.query_tokens.expand(image.shape[0], -1, -1)
        q = queries.shape[1]
        text = self.embeddings(input_ids)
        mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], q), attention_mask], 1)
        out = self.qformer(queries, image.to(queries.dtype), text, key_mask(mask))
        logits = self.itm_head(out[:, :q].to(self.itm_head.weight.dtype))  # (B, Q, 2)
        return logits.mean(dim=1)


def similarity(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """(Bi, Q, D) and (Bt, D) normalised features -> (Bi, Bt) cosine, max over queries."""
    return torch.einsum("iqd,td->iqt", image_features, text_features).amax(dim=1)


def key_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) 0/1 padding mask -> (B, 1, 1, L) boolean: every position may attend to the
    non-padding ones (bidirectional)."""
    return attention_mask.bool()[:, None, None, :]
