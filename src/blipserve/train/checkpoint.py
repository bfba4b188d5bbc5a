"""Save a :class:`Blip2Model` as a Hugging Face checkpoint; build a fresh one from parts.

:func:`save_checkpoint` writes a directory that :func:`blipserve.load` and transformers'
``Blip2ForConditionalGeneration.from_pretrained`` / ``Blip2Processor.from_pretrained`` read:

    config.json                 Blip2Config.to_hf(), plus the dtype of the saved weights
    model.safetensors           every tensor, except lm_head when it is tied to embed_tokens
    tokenizer.json, tokenizer_config.json
    preprocessor_config.json    the image processor's settings
    processor_config.json       num_query_tokens
    generation_config.json      as given (bos 2, eos "\\n", pad 1 for the Salesforce OPT models;
                                eos 1, pad 0, decoder start 0 for Flan-T5)

:func:`assemble` joins a pre-trained image encoder and language model (OPT or T5) with a freshly
initialised Q-Former, query tokens and projection: the starting point of stage-2 training.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from blipserve.errors import InvalidRequest
from blipserve.model.blip2 import Blip2Config, Blip2Model, LanguageModel, keeps_fp32
from blipserve.model.qformer import QFormer, QFormerConfig
from blipserve.model.retrieval import Blip2Retrieval, Blip2RetrievalConfig
from blipserve.model.vision import VisionTransformer
from blipserve.processing.image_processor import ImageProcessor
from blipserve.processing.tokenizer import Tokenizer
from blipserve.weights import TIED_HEAD

WEIGHTS_NAME = "model.safetensors"
INIT_STD = 0.02  # BERT's initializer range, used for the fresh Q-Former, queries and projection
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def save_checkpoint(
    model: Blip2Model,
    tokenizer: Tokenizer,
    image_processor: ImageProcessor,
    directory: str | Path,
    *,
    generation_config: dict[str, Any],
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``model`` and its processing files to ``directory``; returns the directory.

    ``dtype`` casts the image encoder, projection and language model; the query tokens and
    Q-Former stay float32 (the precision policy). ``None`` saves every tensor as it is.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(checkpoint_tensors(model, dtype), directory / WEIGHTS_NAME)
    saved_dtype = dtype or model.language_model.lm_head.weight.dtype
    _write_json(
        directory / "config.json", {**model.config.to_hf(), "dtype": DTYPE_NAMES[saved_dtype]}
    )
    tokenizer.save_pretrained(directory)
    _write_json(directory / "preprocessor_config.json", image_processor.to_dict())
    processor = {
        "num_query_tokens": model.config.num_query_tokens,
        "processor_class": "Blip2Processor",
    }
    _write_json(directory / "processor_config.json", processor)
    _write_json(directory / "generation_config.json", generation_config)
    return directory


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file, readable like every other output: ``save_file`` creates it 0600,
    so it gets 0666 less the umask (0644 usually), as ``open`` would give."""
    save_file(tensors, path, metadata={"format": "pt"})
    umask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def checkpoint_tensors(
    model: Blip2Model, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The state dict as safetensors wants it: on the CPU, contiguous, no shared storage."""
    tied = model.config.tie_word_embeddings
    if tied:
        lm = model.language_model
        assert lm.lm_head.weight is lm.model.decoder.embed_tokens.weight, "lm_head is not tied"
    tensors = {}
    for name, tensor in model.state_dict().items():
        if tied and name == TIED_HEAD:
            continue  # the loaders tie it to embed_tokens again
        if dtype is not None and tensor.is_floating_point() and not keeps_fp32(name):
            tensor = tensor.to(dtype)
        tensors[name] = tensor.detach().to("cpu").contiguous()
    return tensors


# The Q-Former settings that shape its query path (text-only settings may differ).
QUERY_PATH_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "layer_norm_eps",
    "cross_attention_frequency",
    "encoder_hidden_size",
)


# -- a fresh model from pre-trained parts ----------------------------------------------------


def assemble(
    vision: VisionTransformer,
    language_model: LanguageModel,
    qformer_config: QFormerConfig,
    num_query_tokens: int = 32,
    image_token_index: int | None = None,
    seed: int = 0,
) -> Blip2Model:
    """A BLIP-2 model around ``vision`` and ``language_model`` (used as they are, not copied)
    with a new Q-Former, query tokens and projection, initialised from ``seed``:
    linear weights and queries ~ N(0, 0.02), biases 0, LayerNorms 1 and 0.

    The Q-Former and queries are float32; the projection takes the language model's dtype.
    """
    weight = language_model.lm_head.weight
    vision_weight = vision.embeddings.patch_embedding.weight
    assert (vision_weight.device, vision_weight.dtype) == (weight.device, weight.dtype), (
        "the image encoder and the language model must share a device and dtype"
    )
    qformer_config = replace(qformer_config, encoder_hidden_size=vision.config.hidden_size)
    text = language_model.config
    config = Blip2Config(
        vision=vision.config,
        qformer=qformer_config,
        text=text,
        num_query_tokens=num_query_tokens,
        image_token_index=image_token_index,
        tie_word_embeddings=text.tie_word_embeddings,
    )
    with torch.device("meta"):  # the shell only: its vision and language model are replaced
        model = Blip2Model(config)
    model.vision_model = vision
    model.language_model = language_model

    generator = torch.Generator().manual_seed(seed)
    queries = torch.empty(1, num_query_tokens, qformer_config.hidden_size)
    model.query_tokens = nn.Parameter(_normal(queries, generator).to(weight.device))
    model.qformer = _initialised(QFormer(qformer_config), generator).to(weight.device)
    projection = nn.Linear(qformer_config.hidden_size, text.hidden_size)
    model.language_projection = _initialised(projection, generator).to(weight.device, weight.dtype)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def assemble_retrieval(
    vision: VisionTransformer,
    qformer_config: QFormerConfig,
    num_query_tokens: int = 32,
    image_text_hidden_size: int = 256,
    seed: int = 0,
) -> Blip2Retrieval:
    """A stage-1 model around ``vision`` (used as it is) with a new text-reading Q-Former,
    query tokens, text embeddings, projections and matching head, initialised from ``seed``
    as :func:`assemble` does (embeddings ~ N(0, 0.02) too). Trainable parts are float32."""
    qformer_config = replace(
        qformer_config, encoder_hidden_size=vision.config.hidden_size, use_qformer_text_input=True
    )
    config = Blip2RetrievalConfig(
        vision=vision.config,
        qformer=qformer_config,
        num_query_tokens=num_query_tokens,
        image_text_hidden_size=image_text_hidden_size,
    )
    device = vision.embeddings.patch_embedding.weight.device
    with torch.device("meta"):
        model = Blip2Retrieval(config)
    model.vision_model = vision
    generator = torch.Generator().manual_seed(seed)
    fresh = {name: child for name, child in model.named_children() if name != "vision_model"}
    for name, child in fresh.items():
        child = child.to_empty(device="cpu")
        for embedding in (m for m in child.modules() if isinstance(m, nn.Embedding)):
            _normal(embedding.weight, generator)
        setattr(model, name, _initialised(child, generator).to(device))
    queries = torch.empty(1, num_query_tokens, qformer_config.hidden_size)
    model.query_tokens = nn.Parameter(_normal(queries, generator).to(device))
    return model


def adopt_stage1_qformer(model: Blip2Model, stage1: Blip2Retrieval) -> None:
    """Start stage 2 where stage 1 ended (the paper's order): copy the query tokens and the
    Q-Former's query path (attention, cross-attention, query feed-forward) into ``model``;
    the text-only parts stay behind. The two Q-Formers must have the same shape."""
    ours, theirs = model.config.qformer, stage1.config.qformer
    differ = [f for f in QUERY_PATH_FIELDS if getattr(ours, f) != getattr(theirs, f)]
    if model.query_tokens.shape != stage1.query_tokens.shape:
        differ.append("num_query_tokens")
    if differ:
        shown = ", ".join(
            f"{f} {_shape_field(stage1, f)} vs {_shape_field(model, f)}" for f in differ
        )
        raise InvalidRequest(
            f"the stage-1 Q-Former does not fit this model's (stage 1 vs this model: {shown})"
        )
    wanted = model.qformer.state_dict()
    state = {k: v for k, v in stage1.qformer.state_dict().items() if k in wanted}
    with torch.no_grad():
        model.qformer.load_state_dict(state, strict=True)
        model.query_tokens.copy_(stage1.query_tokens)


def _shape_field(model: Blip2Model | Blip2Retrieval, name: str) -> Any:
    source = model.config if name == "num_query_tokens" else model.config.qformer
    return getattr(source, name)


def _initialised(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """BERT-style initialisation of every Linear and LayerNorm in ``module`` (on the CPU)."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.Linear):
                _normal(sub.weight, generator)
                if sub.bias is not None:
                    sub.bias.zero_()
            elif isinstance(sub, nn.LayerNorm):
                nn.init.ones_(sub.weight)
                nn.init.zeros_(sub.bias)
    return module


def _normal(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    with torch.no_grad():
        return tensor.copy_(INIT_STD * torch.randn(tensor.shape, generator=generator))


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
