"""The CUDA path end to end on a tiny random checkpoint (run where a GPU is present).

Loads the same small checkpoint the test suite uses on ``cuda`` in every dtype and runs
every generation mode, comparing float32 CUDA output with transformers on CUDA:

    python benchmarks/cuda_smoke.py [cuda|cpu]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import blipserve
from blipserve.testing import checkpoints
from blipserve.testing.reference import PROMPTS, reference_generate
from photos import photo_batch


def main() -> None:
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    assert device != "cuda" or torch.cuda.is_available(), "no CUDA device"
    root = Path(tempfile.mkdtemp())
    reference = checkpoints.build_reference(root, variant=0, seed=0).to(device)
    directory = checkpoints.save_checkpoint(reference, root, "sharded")
    images = photo_batch(4)
    failures = 0
    for gen in (
        dict(max_new_tokens=12),
        dict(num_beams=3, num_return_sequences=2, max_new_tokens=8),
    ):
        pipe = blipserve.load(str(directory), device=device, dtype="float32", exif_transpose=False)
        ours = [[g.token_ids for g in row] for row in pipe.generate(images, PROMPTS, **gen)]
        with torch.device(device):
            theirs = reference_generate(reference, directory, images, PROMPTS, **gen)
        same = ours == theirs
        failures += not same
        print(f"{device} float32 {gen}: identical to transformers on {device}: {same}")
    for dtype in ("bfloat16", "float16"):
        pipe = blipserve.load(str(directory), device=device, dtype=dtype)
        greedy = pipe.caption(images, max_new_tokens=8)
        sampled = pipe.generate(
            images, do_sample=True, top_p=0.9, seed=0, num_return_sequences=2, max_new_tokens=8
        )
        again = pipe.generate(
            images, do_sample=True, top_p=0.9, seed=0, num_return_sequences=2, max_new_tokens=8
        )
        repeatable = [[g.token_ids for g in r] for r in sampled] == [
            [g.token_ids for g in r] for r in again
        ]
        streamed = "".join(pipe.stream(images[0], max_new_tokens=8)).strip()
        failures += not repeatable or streamed != greedy[0]
        print(
            f"{device} {dtype}: greedy {len(greedy)} captions, "
            f"seeded sampling repeatable {repeatable}, "
            f"stream equals greedy {streamed == greedy[0]}"
        )
    print("CUDA SMOKE", "OK" if failures == 0 else f"FAILED ({failures})")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
