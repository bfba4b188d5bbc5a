"""GPU memory and step time of stage-2 fine-tuning at blip2-opt-2.7b size.

Builds (or reuses) the full-size random checkpoint, then runs a few steps of
:func:`blipserve.train.stage2.train_stage2` (frozen bf16 ViT-g and OPT-2.7b, float32
Q-Former with AdamW, bf16 autocast) and reports the peak GPU memory and seconds per step:

    python benchmarks/finetune_memory.py --checkpoint /tmp/ck --batch-size 16
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import blipserve
from blipserve.train.data import TrainExample
from blipserve.train.stage2 import TrainConfig, train_stage2
from blipserve.train.synthetic import samples
from full_size import build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    build(args.checkpoint, torch.bfloat16, device="cuda")
    pipe = blipserve.load(str(args.checkpoint), device="cuda", dtype="bfloat16", for_training=True)
    examples = [TrainExample(s.image, s.text, s.prompt) for s in samples(args.batch_size * 2, 3)]
    weights_gib = torch.cuda.memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    config = TrainConfig(
        max_steps=args.steps,
        batch_size=args.batch_size,
        warmup_steps=1,
        save_every=None,
        progress=False,
    )
    started = time.perf_counter()
    result = train_stage2(
        pipe.model,
        pipe.tokenizer,
        pipe.image_processor,
        examples,
        config,
        output_dir=tempfile.mkdtemp(),
        generation_config=pipe.generation_config(),
    )
    seconds = time.perf_counter() - started
    print(
        f"{torch.cuda.get_device_name()}: batch {args.batch_size}, {result.step} steps, "
        f"weights {weights_gib:.1f} GiB, peak during training "
        f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, "
        f"{seconds / result.step:.2f} s/step including the final save and evaluation, "
        f"losses {[round(x, 3) for x in result.losses]}"
    )


if __name__ == "__main__":
    main()
