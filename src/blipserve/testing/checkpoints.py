"""Tiny random BLIP-2 checkpoints written by transformers, in every layout we load.

The reference (transformers) builds and saves each model, so our loader reads exactly
what ``save_pretrained`` writes; the layout variants then rewrite the weight files the
way older or other exporters did (``.bin``, legacy vision biases, explicit ``lm_head``,
T5's embedding copies). :func:`build_reference` makes OPT models, :func:`build_t5_reference`
Flan-T5 ones (gated GELU, their own ``lm_head``, ``config.json`` as the Salesforce repos
write it).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    BlipImageProcessor,
    GenerationConfig,
)

from blipserve.processing.image_processor import BLIP2_PREPROCESSOR_CONFIG
from blipserve.testing.tokenizers import build_test_t5_tokenizer, build_test_tokenizer

LAYOUTS = ("sharded", "single", "bin", "bin-sharded", "with-lm-head", "legacy-qv-bias")
# A Flan-T5 head is never tied: no "with-lm-head"; older exports also hold embedding copies.
T5_LAYOUTS = ("sharded", "single", "bin", "bin-sharded", "legacy-qv-bias", "with-embedding-copies")


def tokenizer_dir(root: Path) -> Path:
    directory = root / "tokenizer"
    if not (directory / "vocab.json").exists():
        build_test_tokenizer(directory, with_tokenizer_json=False)
    return directory


def t5_tokenizer_dir(root: Path) -> Path:
    directory = root / "t5-tokenizer"
    if not (directory / "tokenizer.json").exists():
        build_test_t5_tokenizer(directory)
    return directory


def tiny_config(vocab: dict[str, int], image_token_id: int, variant: int = 0) -> Blip2Config:
    """Small BLIP-2 configs; ``variant`` changes depth, widths, queries and cross-attention."""
    newline = vocab["Ċ"]  # byte-level BPE's "\n": the BLIP-2 OPT eos
    shapes = [
        dict(vis=(32, 64, 2, 4), qf=(32, 64, 2, 4, 2), lm=(32, 64, 2, 4), queries=8),
        dict(vis=(48, 96, 3, 4), qf=(24, 48, 3, 2, 1), lm=(64, 128, 3, 8), queries=32),
        dict(vis=(40, 80, 1, 5), qf=(32, 96, 4, 8, 3), lm=(48, 96, 2, 6), queries=4),
    ][variant]
    th, tf, tl, tn = shapes["lm"]
    return Blip2Config(
        **_vision_and_qformer(shapes),
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


def _vision_and_qformer(shapes: dict) -> dict[str, dict]:
    """The ``vision_config`` and ``qformer_config`` of a ``shapes`` entry."""
    vh, vi, vl, vn = shapes["vis"]
    qh, qi, ql, qn, freq = shapes["qf"]
    return {
        "vision_config": dict(
            hidden_size=vh,
            intermediate_size=vi,
            num_hidden_layers=vl,
            num_attention_heads=vn,
            image_size=224,
            patch_size=14,
        ),
        "qformer_config": dict(
            hidden_size=qh,
            intermediate_size=qi,
            num_hidden_layers=ql,
            num_attention_heads=qn,
            cross_attention_frequency=freq,
        ),
    }


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


# lm: (d_model, d_kv, d_ff, encoder layers, decoder layers, heads, buckets, max distance). The
# decoder is never deeper than the encoder: transformers 5.24 sizes T5's generation cache by
# the encoder's depth and fails (IndexError) otherwise; ours is tested on that in test_t5.py.
T5_SHAPES = [
    dict(vis=(32, 64, 2, 4), qf=(32, 64, 2, 4, 2), lm=(32, 8, 48, 2, 2, 4, 32, 128), queries=8),
    dict(vis=(48, 96, 3, 4), qf=(24, 48, 3, 2, 1), lm=(64, 16, 96, 3, 2, 4, 32, 128), queries=16),
    dict(vis=(40, 80, 1, 5), qf=(32, 96, 4, 8, 3), lm=(48, 12, 80, 2, 1, 6, 16, 20), queries=4),
]


def tiny_t5_config(vocab_size: int, image_token_id: int, variant: int = 0) -> Blip2Config:
    """Small BLIP-2 Flan-T5 configs; ``variant`` changes depths, widths, heads, buckets and
    query count. Special ids are Flan-T5's: pad = decoder start 0, eos 1."""
    shapes = T5_SHAPES[variant]
    d, d_kv, d_ff, layers, decoder_layers, heads, buckets, distance = shapes["lm"]
    return Blip2Config(
        **_vision_and_qformer(shapes),
        text_config=dict(
            model_type="t5",
            vocab_size=vocab_size,
            d_model=d,
            d_kv=d_kv,
            d_ff=d_ff,
            num_layers=layers,
            num_decoder_layers=decoder_layers,
            num_heads=heads,
            relative_attention_num_buckets=buckets,
            relative_attention_max_distance=distance,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=1,
        ),
        num_query_tokens=shapes["queries"],
        image_token_index=image_token_id,
    )


def build_t5_reference(
    root: Path, variant: int = 0, seed: int = 0
) -> Blip2ForConditionalGeneration:
    """A tiny random BLIP-2 Flan-T5 over the test T5 tokenizer (``<image>`` its last id)."""
    image_token_id = json.loads((t5_tokenizer_dir(root) / "tokenizer.json").read_text())
    image_token_id = next(
        t["id"] for t in image_token_id["added_tokens"] if t["content"] == "<image>"
    )
    torch.manual_seed(seed)
    config = tiny_t5_config(image_token_id + 8, image_token_id, variant)  # T5 pads its head too
    model = Blip2ForConditionalGeneration(config).eval()
    lm = model.language_model
    # transformers 5.24 ties lm_head to shared at init whatever the config says; a Flan-T5
    # checkpoint holds its own head (and from_pretrained then keeps it untied).
    lm.lm_head.weight = nn.Parameter(torch.empty_like(lm.lm_head.weight))
    randomize(model, seed)
    return model


def is_t5(model: Blip2ForConditionalGeneration) -> bool:
    return model.config.text_config.model_type == "t5"


def save_checkpoint(model: Blip2ForConditionalGeneration, root: Path, layout: str) -> Path:
    """Write ``model`` as a complete checkpoint directory in ``layout``."""
    t5 = is_t5(model)
    assert layout in (T5_LAYOUTS if t5 else LAYOUTS), layout
    directory = root / layout
    shard = "20KB" if layout in ("sharded", "bin-sharded") else "50GB"
    model.save_pretrained(directory, max_shard_size=shard)
    _copy_tokenizer(t5_tokenizer_dir(root) if t5 else tokenizer_dir(root), directory)
    BlipImageProcessor(**BLIP2_PREPROCESSOR_CONFIG).save_pretrained(directory)
    text = model.config.text_config
    start = {"decoder_start_token_id": text.decoder_start_token_id} if t5 else {}
    GenerationConfig(
        bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id,
        pad_token_id=text.pad_token_id,
        **start,
    ).save_pretrained(directory)
    if t5:
        _write_flan_t5_text_config(directory)
    if layout.startswith("bin"):
        _to_bin(directory)
    elif layout == "with-lm-head":
        _rewrite_single(directory, _add_lm_head)
    elif layout == "legacy-qv-bias":
        _rewrite_single(directory, _split_qkv_bias)
    elif layout == "with-embedding-copies":
        _rewrite_single(directory, _add_embedding_copies)
    return directory


def _write_flan_t5_text_config(directory: Path) -> None:
    """``text_config`` as the Salesforce repos have it: ``tie_word_embeddings`` false and no
    ``scale_decoder_outputs`` (transformers 5.24 writes true and false)."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    text = config["text_config"]
    assert text.pop("scale_decoder_outputs") is False
    text["tie_word_embeddings"] = False
    path.write_text(json.dumps(config, indent=2))


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


def _add_embedding_copies(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Exports before transformers 5 store T5's embedding again under each stack."""
    shared = state["language_model.shared.weight"]
    copies = {
        f"language_model.{s}.embed_tokens.weight": shared.clone() for s in ("encoder", "decoder")
    }
    return {**state, **copies}


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
