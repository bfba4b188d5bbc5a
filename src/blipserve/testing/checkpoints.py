"""Tiny random BLIP-2 checkpoints written by transformers, in every layout we load.

The reference (transformers) builds and saves each model, so our loader reads exactly
what ``save_pretrained`` writes; the layout variants then rewrite the weight files the
way older or other exporters did (``.bin``, legacy vision biases, explicit ``lm_head``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    BlipImageProcessor,
    GenerationConfig,
)

from blipserve.processing.image_processor import BLIP2_PREPROCESSOR_CONFIG
from blipserve.testing.tokenizers import build_test_tokenizer

LAYOUTS = ("sharded", "single", "bin", "bin-sharded", "with-lm-head", "legacy-qv-bias")


def tokenizer_dir(root: Path) -> Path:
    directory = root / "tokenizer"
    if not (directory / "vocab.json").exists():
        build_test_tokenizer(directory, with_tokenizer_json=False)
    return directory


def tiny_config(vocab: dict[str, int], image_token_id: int, variant: int = 0) -> Blip2Config:
    """Small BLIP-2 configs; ``variant`` changes depth, widths, queries and cross-attention."""
    newline = vocab["Ċ"]  # byte-level BPE's "\n": the BLIP-2 OPT eos
    shapes = [
        dict(vis=(32, 64, 2, 4), qf=(32, 64, 2, 4, 2), lm=(32, 64, 2, 4), queries=8),
        dict(vis=(48, 96, 3, 4), qf=(24, 48, 3, 2, 1), lm=(64, 128, 3, 8), queries=32),
        dict(vis=(40, 80, 1, 5), qf=(32, 96, 4, 8, 3), lm=(48, 96, 2, 6), queries=4),
    ][variant]
    vh, vi, vl, vn = shapes["vis"]
    qh, qi, ql, qn, freq = shapes["qf"]
    th, tf, tl, tn = shapes["lm"]
    return Blip2Config(
        vision_config=dict(
            hidden_size=vh,
            intermediate_size=vi,
            num_hidden_layers=vl,
            num_attention_heads=vn,
            image_size=224,
            patch_size=14,
        ),
        qformer_config=dict(
            hidden_size=qh,
            intermediate_size=qi,
            num_hidden_layers=ql,
            num_attention_heads=qn,
            cross_attention_frequency=freq,
        ),
        text_config=dict(
            model_type="opt",
            vocab_size=len(vocab) + 4,
            hidden_size=th,
            ffn_dim=tf,
            num_hidden_layers=tl,
            num_attention_heads=tn,
            max_position_embeddings=256,
            word_embed_proj_dim=th,
            bos_token_id=2,
            pad_token_id=1,
            eos_token_id=newline,
        ),
        num_query_tokens=shapes["queries"],
        image_token_index=image_token_id,
    )


# Standard deviations per part. transformers' own init (zero query tokens, 1e-10 vision
# weights) makes outputs ignore the image, and a tied embedding that dominates the residual
# makes greedy decoding copy its last input token; these scales give outputs that depend on
# the image and the prompt, so the parity tests can tell a broken path from a working one.
INIT_STD = {"vision_model": 0.1, "qformer": 0.5, "query_tokens": 0.5, "language_projection": 0.5}
EMBEDDING_STD, LANGUAGE_MODEL_STD = 0.1, 0.3


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Seeded random values for every parameter except LayerNorms (kept at 1 and 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name.lower():
                continue
            part = name.split(".")[0]
            std = INIT_STD.get(part, EMBEDDING_STD if "embed" in name else LANGUAGE_MODEL_STD)
            param.copy_(std * torch.randn(param.shape, generator=generator))


def build_reference(root: Path, variant: int = 0, seed: int = 0) -> Blip2ForConditionalGeneration:
    directory = tokenizer_dir(root)
    vocab = json.loads((directory / "vocab.json").read_text())
    image_token_id = json.loads((directory / "added_tokens.json").read_text())["<image>"]
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(tiny_config(vocab, image_token_id, variant)).eval()
    randomize(model, seed)
    return model


def save_checkpoint(model: Blip2ForConditionalGeneration, root: Path, layout: str) -> Path:
    """Write ``model`` as a complete checkpoint directory in ``layout``."""
    assert layout in LAYOUTS, layout
    directory = root / layout
    shard = "20KB" if layout in ("sharded", "bin-sharded") else "50GB"
    model.save_pretrained(directory, max_shard_size=shard)
    _copy_tokenizer(tokenizer_dir(root), directory)
    BlipImageProcessor(**BLIP2_PREPROCESSOR_CONFIG).save_pretrained(directory)
    text = model.config.text_config
    GenerationConfig(
        bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id,
        pad_token_id=text.pad_token_id,
    ).save_pretrained(directory)
    if layout.startswith("bin"):
        _to_bin(directory)
    elif layout == "with-lm-head":
        _rewrite_single(directory, _add_lm_head)
    elif layout == "legacy-qv-bias":
        _rewrite_single(directory, _split_qkv_bias)
    return directory


def _copy_tokenizer(source: Path, directory: Path) -> None:
    for path in source.iterdir():
        (directory / path.name).write_bytes(path.read_bytes())


def _safetensors_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def _rewrite_single(directory: Path, change) -> None:
    (path,) = _safetensors_files(directory)
    state = change(load_file(path))
    save_file(state, path, metadata={"format": "pt"})


def _add_lm_head(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    assert "language_model.lm_head.weight" not in state, "transformers now stores lm_head"
    head = state["language_model.model.decoder.embed_tokens.weight"].clone()
    return {**state, "language_model.lm_head.weight": head}


def _split_qkv_bias(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old conversions stored the vision qkv bias as separate q_bias and v_bias."""
    out = {}
    for name, tensor in state.items():
        if name.endswith("self_attn.qkv.bias"):
            q, _, v = tensor.chunk(3)
            prefix = name.removesuffix("qkv.bias")
            out[prefix + "q_bias"], out[prefix + "v_bias"] = q.clone(), v.clone()
        else:
            out[name] = tensor
    return out


def _to_bin(directory: Path) -> None:
    """Turn safetensors (single or sharded) into pytorch_model*.bin with the same split."""
    files = _safetensors_files(directory)
    weight_map = {}
    for i, path in enumerate(files, start=1):
        name = (
            "pytorch_model.bin"
            if len(files) == 1
            else f"pytorch_model-{i:05d}-of-{len(files):05d}.bin"
        )
        state = load_file(path)
        torch.save(state, directory / name)
        weight_map.update({key: name for key in state})
        path.unlink()
    index = directory / "model.safetensors.index.json"
    if index.exists():
        index.unlink()
        (directory / "pytorch_model.bin.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
