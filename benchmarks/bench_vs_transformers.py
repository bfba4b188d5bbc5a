"""blipserve vs transformers on the same checkpoint, in one run.

Each implementation runs in a child process of its own (so load time and peak memory
are its own) on the same weights, photos and settings (greedy, ``--max-new-tokens``):

- load: from the load call (library already imported) to a model ready on the device;
- latency: one image, end to end (pixels from a PIL image to generated token ids),
  median over ``--repeats`` after one warm-up;
- throughput: ``--images`` photos in batches of ``--batch-size``, images per second;
- peak memory: CUDA peak allocated, or on CPU the process's peak resident set.

It also checks both produced the same token ids. Usage:

    python benchmarks/full_size.py --out /tmp/blip2-full --dtype bfloat16
    python benchmarks/bench_vs_transformers.py --checkpoint /tmp/blip2-full \
        --device cuda --dtype bfloat16

A Flan-T5 checkpoint (``full_size.py --family t5``) runs the same way: the language model
is read from the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from photos import photo_batch, reference_image_processor


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_in_children(script: str, variants: Sequence[str]) -> dict[str, dict]:
    """Each variant measured in its own process (``script`` with this run's arguments plus
    ``--child VARIANT``), one after the other: -> the JSON its last stdout line holds."""
    results = {}
    for variant in variants:
        argv = [sys.executable, script, *sys.argv[1:], "--child", variant]
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{variant}: done", file=sys.stderr)
    return results


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not getrusage's ru_maxrss: Linux carries
    ru_maxrss across exec, so a child started by a parent that had just built a 15 GB
    checkpoint would report the parent's peak."""
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.is_file() else []:
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Blipserve:
    def __init__(self, checkpoint: str, device: str, dtype: str) -> None:
        import blipserve

        self.pipe = blipserve.load(checkpoint, device=device, dtype=dtype, exif_transpose=False)

    def run(self, images: list, max_new_tokens: int) -> list[list[int]]:
        rows = self.pipe.generate(images, max_new_tokens=max_new_tokens)
        return [row[0].token_ids for row in rows]


class Transformers:
    def __init__(self, checkpoint: str, device: str, dtype: str) -> None:
        from transformers import Blip2ForConditionalGeneration

        self.device = device
        # device_map loads straight onto a GPU (it needs accelerate, which the CPU run lacks)
        placement = {} if device == "cpu" else {"device_map": device}
        self.model = Blip2ForConditionalGeneration.from_pretrained(
            checkpoint, dtype=getattr(torch, dtype), **placement
        ).eval()
        self.processor = reference_image_processor(checkpoint)
        config = self.model.config
        self.queries = [config.image_token_index] * config.num_query_tokens
        text = config.text_config
        self.encoder_decoder = text.is_encoder_decoder
        # the empty prompt's ids: BOS (OPT), or "</s>" alone (T5's tokenizer appends it)
        self.empty_prompt = [text.eos_token_id if self.encoder_decoder else text.bos_token_id]

    def run(self, images: list, max_new_tokens: int) -> list[list[int]]:
        """Captions: the reference's empty prompt."""
        return self.generate(images, self.empty_prompt, max_new_tokens)

    @torch.inference_mode()
    def generate(self, images: list, prompt_ids: list[int], max_new_tokens: int) -> list:
        """New token ids per image for one prompt (``prompt_ids`` start with BOS for OPT,
        end with ``</s>`` for T5)."""
        pixels = self.processor(images, return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device, self.model.dtype)
        input_ids = torch.tensor([self.queries + prompt_ids] * len(images), device=self.device)
        out = self.model.generate(
            pixel_values=pixels,
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
        if self.encoder_decoder:
            new = out[:, 1:]  # T5's output: the decoder's start token, then the new tokens
        else:  # transformers returns the prompt ids too when it was given them (5.x does)
            new = out[:, input_ids.shape[1] :] if out.shape[1] > input_ids.shape[1] else out
        eos = self.model.generation_config.eos_token_id
        return [trim_after_eos(row.tolist(), eos) for row in new]


def trim_after_eos(ids: list[int], eos: int) -> list[int]:
    """Padding after eos is transformers' batch filler, not output."""
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def measure(impl_name: str, args: argparse.Namespace) -> dict:
    torch.set_grad_enabled(False)
    impl_class = {"blipserve": Blipserve, "transformers": Transformers}[impl_name]
    # Library imports are not load time: import the module under test before the clock.
    if impl_name == "blipserve":
        import blipserve.api  # noqa: F401
    else:
        from transformers import Blip2ForConditionalGeneration, BlipImageProcessor  # noqa: F401
    started = time.perf_counter()
    impl = impl_class(str(args.checkpoint), args.device, args.dtype)
    synchronize(args.device)
    load_s = time.perf_counter() - started

    single = photo_batch(1)
    tokens_single = impl.run(single, args.max_new_tokens)  # warm-up
    latencies = []
    for _ in range(args.repeats):
        synchronize(args.device)
        t0 = time.perf_counter()
        impl.run(single, args.max_new_tokens)
        synchronize(args.device)
        latencies.append(time.perf_counter() - t0)

    images = photo_batch(args.images)
    impl.run(images[: args.batch_size], args.max_new_tokens)  # warm-up at batch size
    synchronize(args.device)
    t0 = time.perf_counter()
    tokens_batch = []
    for i in range(0, len(images), args.batch_size):
        tokens_batch += impl.run(images[i : i + args.batch_size], args.max_new_tokens)
    synchronize(args.device)
    batch_s = time.perf_counter() - t0
    return {
        "impl": impl_name,
        "load_s": load_s,
        "latency_s": statistics.median(latencies),
        "throughput_img_s": len(images) / batch_s,
        "generated_tokens": sum(len(t) for t in tokens_batch),
        "peak_memory_mb": peak_memory_mb(args.device),
        "tokens_single": tokens_single,
        "tokens_batch": tokens_batch,
    }


def report(results: dict[str, dict], args: argparse.Namespace) -> str:
    ours, ref = results["blipserve"], results["transformers"]
    same_single = ours["tokens_single"] == ref["tokens_single"]
    same_batch = ours["tokens_batch"] == ref["tokens_batch"]
    rows = [
        ("load time (s)", "load_s", True),
        ("single-image caption latency (s)", "latency_s", True),
        (f"batch throughput, batch {args.batch_size} (images/s)", "throughput_img_s", False),
        ("peak memory (MiB)", "peak_memory_mb", True),
    ]
    lines = [
        f"checkpoint {args.checkpoint}, device {args.device}, dtype {args.dtype}, "
        f"greedy, max_new_tokens {args.max_new_tokens}, {args.images} photos",
        "",
        "| measure | transformers | blipserve | blipserve advantage |",
        "|---|---|---|---|",
    ]
    for label, key, lower_is_better in rows:
        a, b = ref[key], ours[key]
        ratio = a / b if lower_is_better else b / a
        lines.append(f"| {label} | {a:.3f} | {b:.3f} | {ratio:.2f}x |")
    lines.append("")
    lines.append(
        f"identical tokens: single image {same_single}, batch {same_batch} "
        f"({ours['generated_tokens']} vs {ref['generated_tokens']} tokens)"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="blipserve vs transformers, same weights")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--child", choices=["blipserve", "transformers"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(measure(args.child, args)))
        return
    results = run_in_children(__file__, ("transformers", "blipserve"))
    text = report(results, args)
    print(text)
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "args": vars(args) | {"checkpoint": str(args.checkpoint), "out": str(args.out)},
                    "results": results,
                    "report": text,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
