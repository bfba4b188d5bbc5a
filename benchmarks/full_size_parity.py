"""Full-size parity: blipserve vs transformers on a blip2-opt-2.7b-sized random checkpoint,
or a blip2-flan-t5-xl-sized one (``--family t5``).

Builds (or reuses) the checkpoint from :mod:`full_size`, then in two child processes (so
only one 15 GB fp32 model is in memory at a time) runs the reference and blipserve on
real photos with two prompts of different lengths in one padded batch (left-padded for
OPT, right-padded for T5, as each reference pads), and compares the first-step logits and
``--max-new-tokens`` greedy tokens. ``--tiny`` runs the same on a tiny model of the family.

    python benchmarks/full_size_parity.py --checkpoint /tmp/blip2-opt-2.7b-random
    python benchmarks/full_size_parity.py --checkpoint /tmp/blip2-flan-t5-xl-random --family t5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from full_size import add_family_flags, build
from photos import reference_image_processor, sample_photos

PHOTOS = ["chelsea", "coffee", "astronaut", "china"]
CAPTION_IDS = [2]  # BOS only: plain captioning
VQA_IDS = [2, 45641, 35, 61, 343, 16, 42, 116, 31652, 35]  # "Question: which city is this? Answer:"
# Flan-T5: the empty prompt is "</s>" alone; a question is its pieces, then "</s>" (the ids
# of the synthetic tokenizer: arbitrary pieces, the real special ids).
T5_CAPTION_IDS = [1]
T5_VQA_IDS = [3, 4061, 35, 611, 343, 16, 42, 116, 3165, 1]
PROMPTS = {
    "opt": [CAPTION_IDS, VQA_IDS, CAPTION_IDS, VQA_IDS],
    "t5": [T5_CAPTION_IDS, T5_VQA_IDS, T5_CAPTION_IDS, T5_VQA_IDS],
}


def family_of(checkpoint: Path) -> str:
    """``opt`` or ``t5``: the checkpoint's language model."""
    config = json.loads((checkpoint / "config.json").read_text())
    return config["text_config"]["model_type"]


def images() -> list:
    photos = sample_photos()
    return [photos[name] for name in PHOTOS]


def reference_rows(prompts: list[list[int]], queries: int, image_id: int, pad_id: int, left: bool):
    """The reference's ``input_ids`` and ``attention_mask``: ``<image>`` x Q, then the prompt,
    padded on the left (OPT) or the right (T5)."""
    longest = max(len(p) for p in prompts)
    rows, masks = [], []
    for p in prompts:
        pad, real = [pad_id] * (longest - len(p)), [image_id] * queries + p
        rows.append(pad + real if left else real + pad)
        masks.append([0] * len(pad) + [1] * len(real) if left else [1] * len(real) + [0] * len(pad))
    return torch.tensor(rows), torch.tensor(masks)


def run_reference(checkpoint: Path, device: str, dtype: torch.dtype, max_new: int) -> dict:
    from transformers import Blip2ForConditionalGeneration

    model = Blip2ForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype).to(device).eval()
    processor = reference_image_processor(checkpoint)
    pixels = processor(images(), return_tensors="pt")["pixel_values"].to(device, dtype)
    config, family = model.config, family_of(checkpoint)
    prompts, t5 = PROMPTS[family], family == "t5"
    input_ids, mask = reference_rows(
        prompts,
        config.num_query_tokens,
        config.image_token_index,
        config.text_config.pad_token_id,
        left=not t5,
    )
    inputs = {
        "pixel_values": pixels,
        "input_ids": input_ids.to(device),
        "attention_mask": mask.to(device),
    }
    first = {}
    if t5:  # the decoder's first step: its start token
        start = config.text_config.decoder_start_token_id
        first["decoder_input_ids"] = torch.full((len(prompts), 1), start, device=device)
    with torch.no_grad():
        logits = model(**inputs, **first).logits[:, -1]
        out = model.generate(
            **inputs, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False
        )
    if t5:
        new = out[:, 1:]  # after the decoder's start token
    else:
        new = out[:, input_ids.shape[1] :] if out.shape[1] > input_ids.shape[1] else out
    return {"logits": logits.float().cpu(), "tokens": new.cpu().tolist()}


def run_blipserve(checkpoint: Path, device: str, dtype: torch.dtype, max_new: int) -> dict:
    from blipserve.engine.encoder_decoder import EncoderDecoderState, build_encoder_batch
    from blipserve.engine.generate import (
        DecodeState,
        GenerationParams,
        build_prompt_batch,
        generate,
    )
    from blipserve.model.blip2 import Blip2Config
    from blipserve.processing.image_processor import ImageProcessor
    from blipserve.weights import load_model

    config = Blip2Config.from_hf(json.loads((checkpoint / "config.json").read_text()))
    model = load_model(checkpoint, config, device=device, dtype=dtype)
    pixels = ImageProcessor.from_pretrained(checkpoint)(images()).to(device)
    prompts = PROMPTS[family_of(checkpoint)]
    tokens = {
        "pad_token_id": config.text.pad_token_id,
        "image_token_id": config.image_token_index,
    }
    with torch.inference_mode():
        prefix = model.image_prefix(pixels)
        lm = model.language_model
        if config.is_encoder_decoder:
            batch = build_encoder_batch(lm, prefix, prompts, pad_token_id=tokens["pad_token_id"])
            state = EncoderDecoderState(lm, batch, 1, track_seen=False)
        else:
            state = DecodeState(lm, build_prompt_batch(lm, prefix, prompts, **tokens), 1, False)
        logits = state.prefill()
        params = GenerationParams(max_new_tokens=max_new, min_new_tokens=max_new)
        out = generate(
            lm, prefix, prompts, params, eos_token_ids=[config.text.eos_token_id], **tokens
        )
    return {"logits": logits.float().cpu(), "tokens": [row[0].token_ids for row in out]}


def child(args: argparse.Namespace) -> None:
    run = {"reference": run_reference, "blipserve": run_blipserve}[args.child]
    started = time.perf_counter()
    result = run(args.checkpoint, args.device, getattr(torch, args.dtype), args.max_new_tokens)
    result["seconds"] = time.perf_counter() - started
    torch.save(result, args.workdir / f"{args.child}.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description="full-size blipserve vs transformers parity")
    parser.add_argument("--checkpoint", type=Path, required=True, help="built here if missing")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--child", choices=["reference", "blipserve"], help=argparse.SUPPRESS)
    add_family_flags(parser)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.child:
        child(args)
        return

    build(args.checkpoint, getattr(torch, args.dtype), family=args.family, tiny=args.tiny)
    for side in ("reference", "blipserve"):
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", side], check=True)
    ref = torch.load(args.workdir / "reference.pt")
    ours = torch.load(args.workdir / "blipserve.pt")
    diff = (ref["logits"] - ours["logits"]).abs()
    same = [a == b for a, b in zip(ref["tokens"], ours["tokens"], strict=True)]
    print(f"checkpoint {args.checkpoint} ({args.dtype}, {args.device}), photos {PHOTOS}")
    print(
        f"first-step logits: max |diff| {diff.max().item():.3e}, "
        f"mean |diff| {diff.mean().item():.3e}, logit scale (std) {ref['logits'].std().item():.3f}"
    )
    print(
        f"argmax equal per row: {(ref['logits'].argmax(-1) == ours['logits'].argmax(-1)).tolist()}"
    )
    print(f"{args.max_new_tokens} greedy tokens identical per row: {same}")
    for name, a, b in zip(PHOTOS, ref["tokens"], ours["tokens"], strict=True):
        print(f"  {name:10s} reference {a}\n  {'':10s} blipserve {b}")
    print(f"time: reference {ref['seconds']:.0f} s, blipserve {ours['seconds']:.0f} s (load + run)")
    sys.exit(0 if all(same) else 1)


if __name__ == "__main__":
    main()
