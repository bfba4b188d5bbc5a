"""How close int8 stays to bfloat16 at full size: first-step logits on real photos.

    python benchmarks/int8_agreement.py [--checkpoint DIR]   # builds the checkpoint if missing

Loads the same checkpoint twice (bfloat16, and bfloat16 with ``quantize="int8"``), runs
the captioning prompt and the VQA prompt on six photos, and reports, per row, the cosine
similarity of the two next-token logit vectors and whether their top-1 tokens agree.
Random weights make nearly tied scores, so top-1 agreement here is a lower bound.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from cpu_speed import DEFAULT_CHECKPOINT, cpu_capability
from full_size import build
from photos import photo_batch

PROMPTS = ["", "Question: what is in the picture? Answer:"]


@torch.inference_mode()
def first_step_logits(pipe, images: list, prompt: str) -> torch.Tensor:
    """(B, V) float32 logits for the first new token of each image's prompt."""
    prefix = pipe.image_prefix(pipe.preprocess(images))  # (B, Q, D)
    ids = torch.tensor(pipe.tokenizer.encode_batch([prompt] * len(images)))  # equal lengths
    lm = pipe.model.language_model
    embeds = torch.cat([prefix, lm.embed_tokens(ids)], dim=1)
    positions = torch.arange(embeds.shape[1])[None].expand(len(images), -1)
    return lm(embeds, positions, None, None, 0, last_only=True)[:, -1].float()


def main() -> None:
    import blipserve

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    args = parser.parse_args()
    print(json.dumps(cpu_capability()), file=sys.stderr)
    build(args.checkpoint, torch.float32)
    images = photo_batch(6)
    logits = {}
    for name, options in (("bf16", {}), ("int8", {"quantize": "int8"})):
        pipe = blipserve.load(str(args.checkpoint), device="cpu", dtype="bfloat16", **options)
        logits[name] = torch.cat([first_step_logits(pipe, images, p) for p in PROMPTS])
        del pipe
    cosine = F.cosine_similarity(logits["int8"], logits["bf16"], dim=-1)
    same = logits["int8"].argmax(-1) == logits["bf16"].argmax(-1)
    top5 = logits["bf16"].topk(5, dim=-1).indices
    in_top5 = (top5 == logits["int8"].argmax(-1)[:, None]).any(-1)
    rows = len(cosine)
    print(
        f"{rows} rows (6 photos x captioning and VQA prompts): logits cosine "
        f"min {cosine.min():.4f} / mean {cosine.mean():.4f}; top-1 agrees on "
        f"{int(same.sum())} of {rows}; int8's top-1 is in bf16's top 5 on {int(in_top5.sum())}"
    )


if __name__ == "__main__":
    main()
