"""BLIP-2 assembled: vision encoder -> Q-Former -> projection -> OPT decoder or T5.

The model owns no generation loop; :mod:`blipserve.engine` drives it. What it offers:

- :meth:`Blip2Model.image_prefix` runs the frozen image encoder and the Q-Former once
  per image and returns the 32 prefix embeddings the language model continues from;
- ``language_model`` is the OPT decoder the engine prefills and steps, or the T5
  encoder-decoder (Flan-T5 checkpoints: :mod:`blipserve.model.t5`), picked by
  ``text_config.model_type``.

A real OPT input sequence for the VQA prompt "Question: what is it? Answer:" looks like

    position:  0 ... 31 | 32    33        34  35   36  37 38 39      40
    content:   q0 ... q31 | </s> Question  :   what is  it ?  Answer  :
               ^ prefix_embeds (projected Q-Former output), then embed(token ids)

with BOS (``</s>``, id 2) first in the text, as the reference tokenizer adds it.
Precision policy (the reference's): ``query_tokens`` and the Q-Former stay fp32 whatever
the model dtype; their output is cast back to the vision dtype before the projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from blipserve.errors import UnsupportedModel
from blipserve.model.opt import OPTConfig, OPTForCausalLM
from blipserve.model.qformer import QFormer, QFormerConfig
from blipserve.model.t5 import T5Config, T5ForConditionalGeneration
from blipserve.model.vision import VisionConfig, VisionTransformer

# Parameters kept in float32 whatever dtype the model is loaded in (the reference's
# `_keep_in_fp32_modules`). Names are state-dict prefixes.
FP32_PREFIXES = ("query_tokens", "qformer.")

TextConfig = OPTConfig | T5Config
LanguageModel = OPTForCausalLM | T5ForConditionalGeneration
# text_config.model_type -> its config and module
LANGUAGE_MODELS: dict[str, tuple[type[TextConfig], type[LanguageModel]]] = {
    "opt": (OPTConfig, OPTForCausalLM),
    "t5": (T5Config, T5ForConditionalGeneration),
}


@dataclass(frozen=True)
class Blip2Config:
    vision: VisionConfig
    qformer: QFormerConfig
    text: TextConfig
    num_query_tokens: int = 32
    image_token_index: int | None = None
    tie_word_embeddings: bool = True

    @classmethod
    def from_hf(cls, d: dict) -> Blip2Config:
        """Parse a checkpoint's ``config.json`` (a compact diff over the reference defaults)."""
        model_type = d.get("model_type", "blip-2")
        if model_type != "blip-2":
            raise UnsupportedModel(
                f"model_type {model_type!r} is not BLIP-2; blipserve runs 'blip-2' checkpoints"
            )
        text = dict(d.get("text_config") or {})
        text_type = text.get("model_type", "opt")  # the reference's default language model
        if text_type not in LANGUAGE_MODELS:
            raise UnsupportedModel(
                f"BLIP-2 with a {text_type!r} language model is not supported; blipserve runs "
                "the OPT family (Salesforce/blip2-opt-2.7b, -6.7b and their -coco fine-tunes) "
                "and the Flan-T5 one (Salesforce/blip2-flan-t5-xl, -xl-coco, -xxl)"
            )
        text_config_class = LANGUAGE_MODELS[text_type][0]
        vision = VisionConfig.from_hf(d.get("vision_config") or {})
        qformer = QFormerConfig.from_hf(
            d.get("qformer_config") or {}, encoder_hidden_size=vision.hidden_size
        )
        return cls(
            vision=vision,
            qformer=qformer,
            text=text_config_class.from_hf(text),
            num_query_tokens=d.get("num_query_tokens", 32),
            image_token_index=d.get("image_token_index", d.get("image_token_id")),
            tie_word_embeddings=text.get("tie_word_embeddings", d.get("tie_word_embeddings", True)),
        )

    def to_hf(self) -> dict:
        """A complete ``config.json``, read by :meth:`from_hf` and by the reference's
        ``Blip2Config`` / ``Blip2ForConditionalGeneration.from_pretrained``."""
        tie = self.tie_word_embeddings
        return {
            "architectures": ["Blip2ForConditionalGeneration"],
            "model_type": "blip-2",
            "vision_config": self.vision.to_hf(),
            "qformer_config": self.qformer.to_hf(),
            "text_config": {**self.text.to_hf(), "tie_word_embeddings": tie},
            "num_query_tokens": self.num_query_tokens,
            "image_token_index": self.image_token_index,
            "tie_word_embeddings": tie,
            "use_decoder_only_language_model": not self.is_encoder_decoder,
        }

    @property
    def is_encoder_decoder(self) -> bool:
        """True for a T5 language model (the prompt goes to its encoder)."""
        return self.text.is_encoder_decoder


def keeps_fp32(name: str) -> bool:
    """True for state-dict entries the precision policy keeps in float32."""
    return name.startswith(FP32_PREFIXES)


class Blip2Model(nn.Module):
    """BLIP-2 with an OPT decoder or a T5; parameter names match
    ``Blip2ForConditionalGeneration``."""

    def __init__(self, config: Blip2Config) -> None:
        super().__init__()
        self.config = config
        self.vision_model = VisionTransformer(config.vision)
        self.query_tokens = nn.Parameter(
            torch.empty(1, config.num_query_tokens, config.qformer.hidden_size)
        )
        self.qformer = QFormer(config.qformer)
        self.language_projection = nn.Linear(config.qformer.hidden_size, config.text.hidden_size)
        language_model_class = LANGUAGE_MODELS[config.text.model_type][1]
        self.language_model: LanguageModel = language_model_class(config.text)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the frozen image encoder and language model."""
        return self.language_model.input_embedding.weight.dtype

    def image_prefix(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float pixels -> (B, Q, d_lm) prefix embeddings in the model dtype."""
        return self.query_image(self.vision_model(pixel_values))  # from (B, 257, d_vision)

    def query_image(self, image: torch.Tensor) -> torch.Tensor:
        """(B, S, d_vision) image sequence -> (B, Q, d_lm) prefix embeddings in its dtype.

        The projection runs in its own dtype: the model dtype at inference, float32 while
        stage-2 training keeps float32 master weights for it.
        """
        qformer_dtype = self.query_tokens.dtype
        queries = self.query_tokens.expand(image.shape[0], -1, -1)  # (B, Q, d_qformer)
        query_output = self.qformer(queries, image.to(qformer_dtype))  # (B, Q, d_qformer), fp32
        projection = self.language_projection
        prefix = projection(query_output.to(projection.weight.dtype))  # (B, Q, d_lm)
        return prefix.to(image.dtype)

    def tie_weights(self) -> None:
        """Share the input embedding with the output head (OPT's tied ``lm_head``)."""
        lm = self.language_model
        lm.lm_head.weight = lm.input_embedding.weight
