"""Full-size parity: blipserve vs transformers on a blip2-opt-2.7b-sized random checkpoint.

Builds (or reuses) the checkpoint from :mod:`full_size`, then in two child processes (so
only one 15 GB fp32 model is in memory at a time) runs the reference and blipserve on
real photos with two prompts of different lengths in one left-padded batch, and compares
the first-step logits and ``--max-new-tokens`` greedy tokens.

    python benchmarks/full_size_parity.py --checkpoint /tmp/blip2-opt-2.7b-random
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
from full_size import IMAGE_TOKEN_ID, build
from photos import reference_image_processor, sample_photos

PHOTOS = ["chelsea", "coffee", "astronaut", "china"]
CAPTION_IDS = [2]  # BOS only: plain captioning
VQA_IDS = [2, 45641, 35, 61, 343, 16, 42, 116, 31652, 35]  # "Question: which city is this? Answer:"
PROMPTS = [CAPTION_IDS, VQA_IDS, CAPTION_IDS, VQA_IDS]
PAD_ID = 1


def images() -> list:
    photos = sample_photos()
    return [photos[name] for name in PHOTOS]


def run_reference(checkpoint: Path, device: str, dtype: torch.dtype, max_new: int) -> dict:
    from transformers import Blip2ForConditionalGeneration

    model = Blip2ForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype).to(device).eval()
    processor = reference_image_processor(checkpoint)
    pixels = processor(images(), return_tensors="pt")["pixel_values"].to(device, dtype)
    queries = model.config.num_query_tokens
    longest = max(len(p) for p in PROMPTS)
    rows = [[PAD_ID] * (longest - len(p)) + [IMAGE_TOKEN_ID] * queries + p for p in PROMPTS]
    input_ids = torch.tensor(rows, device=device)
    mask = torch.tensor(
        [[0] * (longest - len(p)) + [1] * (queries + len(p)) for p in PROMPTS], device=device
    )
    with torch.no_grad():
        logits = model(pixel_values=pixels, input_ids=input_ids, attention_mask=mask).logits[:, -1]
        out = model.generate(
            pixel_values=pixels,
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new,
            min_new_tokens=max_new,
            do_sample=False,
        )
    new = out[:, input_ids.shape[1] :] if out.shape[1] > input_ids.shape[1] else out
    return {"logits": logits.float().cpu(), "tokens": new.cpu().tolist()}


def run_blipserve(checkpoint: Path, device: str, dtype: torch.dtype, max_new: int) -> dict:
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
    with torch.inference_mode():
        prefix = model.image_prefix(pixels)
        lm = model.language_model
        batch = build_prompt_batch(
            lm, prefix, PROMPTS, pad_token_id=PAD_ID, image_token_id=IMAGE_TOKEN_ID
        )
        logits = DecodeState(lm, batch, 1, track_seen=False).prefill()
        params = GenerationParams(max_new_tokens=max_new, min_new_tokens=max_new)
        out = generate(
            lm,
            prefix,
            PROMPTS,
            params,
            eos_token_ids=[config.text.eos_token_id],
            pad_token_id=PAD_ID,
            image_token_id=IMAGE_TOKEN_ID,
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
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.child:
        child(args)
        return

    build(args.checkpoint, getattr(torch, args.dtype))
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
