"""The reference side of the parity checks: transformers run as users run it.

- BLIP-2: :func:`reference_generate` drives ``Blip2ForConditionalGeneration.generate``
  through ``Blip2Processor`` (left-padded tokenizer + the PIL ``BlipImageProcessor``), on
  :data:`PROMPTS` of different lengths;
- OPT alone: :data:`TINY_OPT` is the one tiny OPT decoder shape the tests share;
  :func:`tiny_opt_config` is it as blipserve's config, :func:`reference_opt` builds it as
  transformers' model with seeded weights, and :func:`ours_from` loads that model's state
  dict into ours.
"""

from __future__ import annotations

import torch
import transformers
from transformers import AutoTokenizer, Blip2Processor

try:  # pin the reference's PIL preprocessing even where torchvision is installed
    from transformers import BlipImageProcessorPil as ReferenceImageProcessor
except ImportError:  # transformers before the backend split: the plain class is the PIL one
    from transformers import BlipImageProcessor as ReferenceImageProcessor

from blipserve.model.opt import OPTConfig, OPTForCausalLM

__all__ = [
    "PROMPTS",
    "TINY_OPT",
    "ReferenceImageProcessor",
    "left_padded",
    "ours_from",
    "reference_generate",
    "reference_opt",
    "strip_padding",
    "tiny_opt_config",
]

# -- BLIP-2 ------------------------------------------------------------------------------------

PROMPTS = [
    "",
    "a photo of",
    "Question: what is in the picture? Answer:",
    "Question: which city is this? Answer:",
]


def reference_generate(model, directory, images, prompts, **gen) -> list[list[list[int]]]:
    """New token ids per image (``num_return_sequences`` each), as transformers makes them.

    OPT: left padding, the new tokens follow the prompt. T5: the tokenizer's own (right)
    padding, and the output is the decoder's: its start token, then the new tokens.
    """
    encoder_decoder = model.config.text_config.is_encoder_decoder
    padding = {} if encoder_decoder else {"padding_side": "left"}
    tokenizer = AutoTokenizer.from_pretrained(directory, **padding)
    processor = Blip2Processor(
        image_processor=ReferenceImageProcessor.from_pretrained(directory),
        tokenizer=tokenizer,
        num_query_tokens=model.config.num_query_tokens,
    )
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    inputs = inputs.to(model.device)
    with torch.no_grad():
        out = model.generate(**inputs, **gen)
    new = out[:, 1 if encoder_decoder else inputs["input_ids"].shape[1] :]
    eos = gen.get("eos_token_id", model.config.text_config.eos_token_id)
    pad = model.config.text_config.pad_token_id
    rows = [strip_padding(row.tolist(), eos, pad) for row in new]
    n = gen.get("num_return_sequences", 1)
    return [rows[i : i + n] for i in range(0, len(rows), n)]


def strip_padding(ids: list[int], eos: int, pad: int) -> list[int]:
    """transformers pads finished rows; a row ends at its eos, or at the first pad."""
    if eos in ids:
        return ids[: ids.index(eos) + 1]
    while ids and ids[-1] == pad:
        ids = ids[:-1]
    return ids


# -- a tiny OPT decoder --------------------------------------------------------------------------

TINY_OPT = dict(
    vocab_size=1000,
    hidden_size=64,
    ffn_dim=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=128,
    pad_token_id=1,
    bos_token_id=2,
    eos_token_id=2,
)


def tiny_opt_config(**overrides) -> OPTConfig:
    """:data:`TINY_OPT` as blipserve's :class:`OPTConfig`, with ``overrides`` applied."""
    return OPTConfig(**{**TINY_OPT, **overrides})


def reference_opt(seed: int = 0, head_std: float = 0.3, **overrides) -> transformers.OPTForCausalLM:
    """A tiny reference OPT (:data:`TINY_OPT` + ``overrides``) with seeded weights large
    enough for confident logits.

    ``head_std`` scales an untied ``lm_head`` (``tie_word_embeddings=False``): about 0.3
    gives logits with clear winners that still vary from step to step.
    """
    torch.manual_seed(seed)
    model = transformers.OPTForCausalLM(transformers.OPTConfig(**{**TINY_OPT, **overrides}))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                std, mean = 0.1, (1.0 if name.endswith("weight") else 0.0)
            else:
                std = 1.0 if "embed" in name else head_std if name == "lm_head.weight" else 0.1
                mean = 0.0
            p.copy_(mean + std * torch.randn(p.shape, generator=generator))
    return model.eval()


def ours_from(reference: transformers.OPTForCausalLM) -> OPTForCausalLM:
    """Our model loaded from the reference state dict, built on the meta device."""
    config = OPTConfig.from_hf(reference.config.to_dict())
    with torch.device("meta"):
        model = OPTForCausalLM(config)
    model.load_state_dict(reference.state_dict(), assign=True, strict=True)
    return model.eval()


def left_padded(prompts: list[list[int]], pad: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of ``prompts`` left-padded with ``pad`` to the longest."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask
