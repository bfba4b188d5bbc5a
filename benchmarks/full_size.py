"""A full-size BLIP-2 checkpoint with random weights, in the Hub layout: blip2-opt-2.7b's
shapes (``--family opt``, the default) or blip2-flan-t5-xl's (``--family t5``).

The real weights cannot be downloaded here, so the full-size evidence uses the real
architecture (REFERENCE.md sections 1 and 6) with transformers' own random initialisation,
saved by transformers' ``save_pretrained`` exactly as the Hub files are laid out. The
tokenizer is synthetic with the real vocabulary size and special-token ids (a byte-level
BPE with arbitrary merges for OPT, a Unigram of arbitrary pieces for Flan-T5): the
evidence compares token ids, not words. ``--tiny`` keeps a family's vocabulary, special
ids and layer kinds but shrinks every width and depth: the same code paths in seconds.

    python benchmarks/full_size.py --out /tmp/blip2-opt-2.7b-random --dtype float32
    python benchmarks/full_size.py --out /tmp/blip2-flan-t5-xl-random --family t5
"""

from __future__ import annotations

import argparse
import copy
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

T5_VOCAB_SIZE = 32128  # the head's rows; the tokenizer has 32100 ids, then <image>
T5_IMAGE_TOKEN_ID = 32100
T5_PAD_ID, T5_EOS_ID, T5_UNK_ID = 0, 1, 2

BLIP2_FLAN_T5_XL = {
    "model_type": "blip-2",
    "num_query_tokens": 32,
    "image_token_index": T5_IMAGE_TOKEN_ID,
    "use_decoder_only_language_model": False,
    "vision_config": {},
    "qformer_config": {},
    "text_config": {  # the published config.json's values (REFERENCE.md section 6)
        "model_type": "t5",
        "vocab_size": T5_VOCAB_SIZE,
        "d_model": 2048,
        "d_ff": 5120,
        "d_kv": 64,
        "num_layers": 24,
        "num_decoder_layers": 24,
        "num_heads": 32,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False,
        "decoder_start_token_id": T5_PAD_ID,
        "pad_token_id": T5_PAD_ID,
        "eos_token_id": T5_EOS_ID,
        "bos_token_id": T5_EOS_ID,
    },
}

FAMILIES = {"opt": BLIP2_OPT_27B, "t5": BLIP2_FLAN_T5_XL}
GENERATION_CONFIGS = {
    "opt": {"bos_token_id": 2, "eos_token_id": NEWLINE_EOS_ID, "pad_token_id": 1},
    "t5": {
        "bos_token_id": T5_EOS_ID,
        "eos_token_id": T5_EOS_ID,
        "pad_token_id": T5_PAD_ID,
        "decoder_start_token_id": T5_PAD_ID,
    },
}
# --tiny: widths and depths small enough for a test; vocabularies and ids stay real.
TINY_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
TINY_QFORMER = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
TINY_TEXT = {
    "opt": {
        "hidden_size": 64,
        "ffn_dim": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "word_embed_proj_dim": 64,
    },
    "t5": {"d_model": 64, "d_ff": 128, "d_kv": 16, "num_layers": 2, "num_decoder_layers": 2},
}
HEADS = {"num_attention_heads": 4}


def family_config(family: str, tiny: bool = False) -> dict:
    """The ``Blip2Config`` keyword arguments of ``family``, full size or ``tiny``."""
    config = copy.deepcopy(FAMILIES[family])
    if tiny:
        config["vision_config"] |= TINY_VISION | HEADS
        config["qformer_config"] |= TINY_QFORMER | HEADS
        config["text_config"] |= TINY_TEXT[family] | ({"num_heads": 4} if family == "t5" else {})
    return config


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


def write_synthetic_t5_tokenizer(directory: Path) -> None:
    """tokenizer.json + tokenizer_config.json laid out like Flan-T5's: ``<pad>`` 0, ``</s>`` 1,
    ``<unk>`` 2, arbitrary pieces up to id 32099, then ``<image>``; ``</s>`` after every text."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    letters = "abcdefghijklmnopqrstuvwxyz"
    for length in itertools.count(1):
        for chars in itertools.product(letters, repeat=length):
            pieces.append(("▁" + "".join(chars), -float(len(pieces))))
            if len(pieces) == T5_IMAGE_TOKEN_ID:
                break
        if len(pieces) == T5_IMAGE_TOKEN_ID:
            break
    backend = Tokenizer(models.Unigram(pieces, unk_id=T5_UNK_ID, byte_fallback=False))
    metaspace = dict(replacement="▁", prepend_scheme="always", split=True)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(**metaspace)]
    )
    backend.decoder = decoders.Metaspace(**metaspace)
    special = [AddedToken(t, normalized=False, special=True) for t in ("<pad>", "</s>", "<unk>")]
    image = AddedToken("<image>", normalized=False, special=True)
    backend.add_special_tokens([*special, image])
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", T5_EOS_ID)]
    )
    backend.save(str(directory / "tokenizer.json"))
    added = {str(backend.token_to_id(t.content)): t.__getstate__() for t in [*special, image]}
    config = {
        "added_tokens_decoder": added,
        "eos_token": "</s>",
        "extra_ids": 0,
        "pad_token": "<pad>",
        "tokenizer_class": "T5Tokenizer",
        "unk_token": "<unk>",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


TOKENIZER_WRITERS = {"opt": write_synthetic_tokenizer, "t5": write_synthetic_t5_tokenizer}


def build(
    out: Path,
    dtype: torch.dtype,
    seed: int = 0,
    device: str = "cpu",
    family: str = "opt",
    tiny: bool = False,
) -> Path:
    """Build, randomly initialise (transformers' init) and save the model of ``family``."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    if (out / "config.json").exists():
        print(f"reusing {out}")
        return out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    started = time.perf_counter()
    config = Blip2Config(**family_config(family, tiny))
    with torch.device(device):  # initialising on a GPU is much faster where there is one
        model = Blip2ForConditionalGeneration(config).to(dtype).eval()
    with torch.no_grad():
        # The reference init zeroes the queries and draws the vision tower with std 1e-10
        # (made for loading, not for use): give both content so outputs depend on images.
        model.query_tokens.normal_(0.0, 0.02)
        for param in model.vision_model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.02)
        if family == "t5":  # transformers ties T5's head at init; Flan-T5's is its own
            lm = model.language_model
            lm.lm_head.weight = torch.nn.Parameter(lm.lm_head.weight.clone().normal_(0.0, 0.05))
    count = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out, max_shard_size="10GB")
    (out / "preprocessor_config.json").write_text(json.dumps(BLIP2_PREPROCESSOR_CONFIG, indent=2))
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIGS[family]))
    TOKENIZER_WRITERS[family](out)
    print(
        f"built {count / 1e9:.2f} B parameters into {out} in {time.perf_counter() - started:.0f} s"
    )
    return out


def add_family_flags(parser: argparse.ArgumentParser) -> None:
    """``--family`` and ``--tiny``, for the scripts that build a checkpoint when it is missing."""
    parser.add_argument("--family", default="opt", choices=sorted(FAMILIES), help="default opt")
    parser.add_argument(
        "--tiny", action="store_true", help="the family's vocabulary with tiny widths and depths"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", help="where to run the random init")
    add_family_flags(parser)
    args = parser.parse_args()
    build(
        args.out, getattr(torch, args.dtype), device=args.device, family=args.family, tiny=args.tiny
    )


if __name__ == "__main__":
    main()
