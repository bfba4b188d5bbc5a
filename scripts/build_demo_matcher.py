"""Build the bundled demo matcher (``blipserve match --model demo``) with stage-1 training.

    python scripts/build_demo_matcher.py                  # writes src/blipserve/demo_matcher/
    python scripts/build_demo_matcher.py --output DIR --steps 100   # a quick try elsewhere

The recipe is ``blipserve train --stage 1 --model demo`` (docs/stage1.md): the demo
model's frozen image encoder, a fresh Q-Former of the demo's shape (2 layers, 4 queries,
hidden 128) whose text vocabulary is the demo tokenizer plus ``[CLS]`` and ``[DEC]``, on
synthetic scenes (seed 0). The encoder runs once per training image (the features are
kept), so the run fits in minutes on a CPU. It then measures image -> caption retrieval
(ITC, top-1 among every held-out caption) on scenes from seed 1000, and on the
examples/ images against their six captions, and writes both to ``build_record.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from blipserve.matching import load_matcher
from blipserve.model.retrieval import Blip2Retrieval
from blipserve.processing.image_processor import ImageProcessor
from blipserve.train import synthetic
from blipserve.train.stage1 import Stage1Config, save_stage1, stage1_start, train_stage1

ROOT = Path(__file__).parents[1]
OUTPUT = ROOT / "src" / "blipserve" / "demo_matcher"
EXAMPLES = ROOT / "examples"


def scene_features(
    model: Blip2Retrieval, processor: ImageProcessor, count: int, seed: int
) -> tuple[torch.Tensor, list[str]]:
    """(count, S, d_vision) frozen encoder outputs of synthetic scenes, and their captions."""
    scenes = synthetic.scenes(count, seed)
    features = []
    with torch.no_grad():
        for start in range(0, count, 256):
            pixels = [processor.preprocess_one(synthetic.render(s)) for s in scenes[start:][:256]]
            features.append(model.vision_features(torch.stack(pixels)))
    return torch.cat(features), [synthetic.caption(s) for s in scenes]


def top1(scores: torch.Tensor, texts: list[str], truth: list[str]) -> float:
    """Share of rows whose best-scoring text is their own caption (ties of equal text count)."""
    best = scores.argmax(dim=1).tolist()
    return sum(texts[j] == t for j, t in zip(best, truth, strict=True)) / len(truth)


def evaluate(directory: Path, eval_scenes: int) -> dict[str, float]:
    """Retrieval quality of the saved matcher, loaded as users load it."""
    matcher = load_matcher(str(directory), device="cpu", dtype="float32")
    scenes = synthetic.scenes(eval_scenes, 1000)
    images = [synthetic.render(s) for s in scenes]
    captions = [synthetic.caption(s) for s in scenes]
    held_out = top1(matcher.similarity(images, captions), captions, captions)
    rows = [line.split("\t") for line in (EXAMPLES / "captions.tsv").read_text().splitlines()]
    names, truth = [str(EXAMPLES / n) for n, _ in rows], [c for _, c in rows]
    examples = top1(matcher.similarity(names, truth), truth, truth)
    return {"held_out_top1": held_out, "examples_top1": examples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--scenes", type=int, default=6000)
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--eval-scenes", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)  # reproducible sums, and no thrashing beside other processes
    torch.manual_seed(0)
    start = time.perf_counter()
    model, codec, processor = stage1_start("demo", device="cpu", dtype="float32", seed=0)
    images, captions = scene_features(model, processor, args.scenes, seed=0)
    config = Stage1Config(
        max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=100
    )
    heads, result = train_stage1(model, images, captions, codec, config)
    save_stage1(model, heads, codec, args.output, processor)
    seconds = round(time.perf_counter() - start, 1)
    last = result.losses[-1]
    record = {
        "recipe": {k: v for k, v in vars(args).items() if k != "output"},
        "seconds": seconds,
        "torch": torch.__version__,
        "final_losses": {"itc": last.itc, "itm": last.itm, "itg": last.itg},
        "eval": evaluate(args.output, args.eval_scenes),
    }
    (args.output / "build_record.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
