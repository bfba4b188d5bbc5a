"""A blip2-opt-2.7b-sized checkpoint with random weights, in the Hub layout.

The real weights cannot be downloaded here, so the full-size evidence uses the real
architecture (REFERENCE.md section 1) with transformers' own random initialisation,
saved by transformers' ``save_pretrained`` exactly as the Hub files are laid out. The
tokenizer is a synthetic byte-level BPE with the real vocabulary size and special-token
ids (its merges are arbitrary byte pairs): the evidence compares token ids, not words.

    python benchmarks/full_size.py --out /tmp/blip2-opt-2.7b-random --dtype float32
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from blipserve.processing.image_processor import BLIP2_PREPROCESSOR_CONFIG

REAL_VOCAB_SIZE = 50304  # BLIP-2's OPT embedding (OPT itself: 50272)
IMAGE_TOKEN_ID = 50265
NEWLINE_EOS_ID = 50118

BLIP2_OPT_27B = {
    "model_type": "blip-2",
    "num_query_tokens": 32,
    "image_token_index": IMAGE_TOKEN_ID,
    "vision_config": {},  # all reference defaults: EVA ViT-g/14
    "qformer_config": {},  # all reference defaults: BERT-base sized, cross-attention every 2
    "text_config": {
        "model_type": "opt",
        "vocab_size": REAL_VOCAB_SIZE,
        "hidden_size": 2560,
        "ffn_dim": 10240,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "max_position_embeddings": 2048,
        "word_embed_proj_dim": 2560,
        "bos_token_id": 2,
        "pad_token_id": 1,
        "eos_token_id": NEWLINE_EOS_ID,
    },
}


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in printable]
    codes = printable + [256 + i for i in range(len(extra))]
    order = printable + extra
    return [chr(c) for _, c in sorted(zip(order, codes, strict=True))]


def write_synthetic_tokenizer(directory: Path) -> None:
    """vocab.json + merges.txt with OPT's special ids and the real vocabulary size."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    alphabet = byte_alphabet()
    for symbol in alphabet:
        vocab[symbol] = len(vocab)
    merges = []
    for a, b in itertools.product(alphabet, repeat=2):
        if len(vocab) >= IMAGE_TOKEN_ID:
            break
        vocab[a + b] = len(vocab)
        merges.append(f"{a} {b}")
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (directory / "added_tokens.json").write_text(json.dumps({"<image>": IMAGE_TOKEN_ID}))
    special = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>"}
    (directory / "special_tokens_map.json").write_text(json.dumps(special))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "GPT2Tokenizer", "add_bos_token": True, **special})
    )


def build(out: Path, dtype: torch.dtype, seed: int = 0, device: str = "cpu") -> Path:
    """Build, randomly initialise (transformers' init) and save the full-size model."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    if (out / "config.json").exists():
        print(f"reusing {out}")
        return out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    started = time.perf_counter()
    with torch.device(device):  # initialising on a GPU is much faster where there is one
        model = Blip2ForConditionalGeneration(Blip2Config(**BLIP2_OPT_27B)).to(dtype).eval()
    with torch.no_grad():
        # The reference init zeroes the queries and draws the vision tower with std 1e-10
        # (made for loading, not for use): give both content so outputs depend on images.
        model.query_tokens.normal_(0.0, 0.02)
        for param in model.vision_model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.02)
    count = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out, max_shard_size="10GB")
    (out / "preprocessor_config.json").write_text(json.dumps(BLIP2_PREPROCESSOR_CONFIG, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 2, "eos_token_id": NEWLINE_EOS_ID, "pad_token_id": 1})
    )
    write_synthetic_tokenizer(out)
    print(
        f"built {count / 1e9:.2f} B parameters into {out} in {time.perf_counter() - started:.0f} s"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", help="where to run the random init")
    args = parser.parse_args()
    build(args.out, getattr(torch, args.dtype), device=args.device)


if __name__ == "__main__":
    main()
