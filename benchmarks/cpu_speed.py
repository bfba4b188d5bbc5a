"""CPU speed at full size: transformers vs blipserve (default, and int8), same weights, same run.

    python benchmarks/cpu_speed.py                     # builds the checkpoint if missing
    python benchmarks/cpu_speed.py --profile           # also: where blipserve's time goes
    python benchmarks/cpu_speed.py --family t5         # blip2-flan-t5-xl's shapes instead

Each variant runs in its own process, one after the other: load time, single-caption
latency (median), a batch of 8 (seconds per image), a chat follow-up about the same image
(first turn, then the second), and peak RSS. transformers runs in the dtype this CPU
multiplies fastest (bfloat16 with AVX512-BF16 or AMX, else float32), the same rule as
blipserve's ``dtype="auto"``; the CPU's capability is printed first. Ratios are
"blipserve advantage": > 1 means blipserve is better.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import ImageOps

sys.path.insert(0, str(Path(__file__).parent))
from bench_vs_transformers import Transformers as TransformersBaseline
from bench_vs_transformers import peak_rss_mb, run_in_children
from full_size import add_family_flags, build
from photos import photo_batch

DEFAULT_CHECKPOINTS = {
    "opt": Path("/tmp/blip2-opt-2.7b-random-fp32"),
    "t5": Path("/tmp/blip2-flan-t5-xl-random-fp32"),
}
VARIANTS = ("transformers", "blipserve", "blipserve-int8")


def cpu_capability() -> dict:
    """What decides the fast path: the processor, its bf16 support, torch's kernels."""
    from blipserve.resolve import cpu_has_native_bf16

    model = "unknown"
    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    return {
        "cpu": model,
        "cores": torch.get_num_threads(),
        "flags": [f for f in wanted if f in flags],
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_has_native_bf16(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def fast_dtype() -> str:
    from blipserve.resolve import cpu_has_native_bf16

    return "bfloat16" if cpu_has_native_bf16() else "float32"


class Blipserve:
    def __init__(self, checkpoint: str, quantize: str | None) -> None:
        import blipserve

        options = {"quantize": quantize} if quantize else {}
        self.pipe = blipserve.load(checkpoint, device="cpu", exif_transpose=False, **options)
        self.dtype = str(self.pipe.model.dtype).removeprefix("torch.")

    def caption(self, images: list, max_new_tokens: int) -> list[list[int]]:
        rows = self.pipe.generate(images, max_new_tokens=max_new_tokens)
        return [row[0].token_ids for row in rows]

    def chat(self, image, messages: list[dict], max_new_tokens: int) -> str:
        return self.pipe.chat(image, messages, max_new_tokens=max_new_tokens)


class Transformers(TransformersBaseline):
    """transformers' ``generate`` (bench_vs_transformers.py's baseline) with chat turns."""

    def __init__(self, checkpoint: str, dtype: str) -> None:
        from blipserve.processing.prompts import chat_prompt
        from blipserve.processing.tokenizer import Tokenizer

        super().__init__(checkpoint, "cpu", dtype)
        self.dtype = dtype
        self.tokenizer = Tokenizer.from_pretrained(Path(checkpoint))  # the reference's ids
        self.chat_prompt = chat_prompt

    def caption(self, images: list, max_new_tokens: int) -> list[list[int]]:
        return self.run(images, max_new_tokens)

    def chat(self, image, messages: list[dict], max_new_tokens: int) -> str:
        ids = self.tokenizer.encode(self.chat_prompt(messages))
        (new,) = self.generate([image], ids, max_new_tokens)
        return self.tokenizer.decode(new)


def timed(run) -> tuple[float, object]:
    started = time.perf_counter()
    result = run()
    return time.perf_counter() - started, result


def measure(variant: str, args: argparse.Namespace) -> dict:
    torch.set_grad_enabled(False)
    if variant == "transformers":
        import transformers  # noqa: F401  (library import is not load time)

        load_s, impl = timed(lambda: Transformers(str(args.checkpoint), fast_dtype()))
    else:
        import blipserve.api  # noqa: F401

        quantize = "int8" if variant.endswith("int8") else None
        load_s, impl = timed(lambda: Blipserve(str(args.checkpoint), quantize))
    photos = photo_batch(8)
    n = args.max_new_tokens
    impl.caption(photos[:1], n)  # warm-up
    latencies = [timed(lambda: impl.caption(photos[:1], n))[0] for _ in range(args.repeats)]
    tokens_single = impl.caption(photos[:1], n)
    batch_s, tokens_batch = timed(lambda: impl.caption(photos[:8], n))
    # A conversation about an image not seen before: the first turn, then a follow-up,
    # each answered in --chat-tokens tokens (VQA answers are a few words).
    image, m = ImageOps.mirror(photos[0]), args.chat_tokens  # a picture not seen above
    messages = [{"role": "user", "content": "what is in the picture?"}]
    first_s, reply = timed(lambda: impl.chat(image, messages, m))
    messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "where?"}]
    follow_up_s, _ = timed(lambda: impl.chat(image, messages, m))
    return {
        "variant": variant,
        "dtype": impl.dtype,
        "load_s": load_s,
        "latency_s": statistics.median(latencies),
        "batch8_s_per_image": batch_s / 8,
        "chat_first_s": first_s,
        "chat_follow_up_s": follow_up_s,
        "peak_rss_gb": peak_rss_mb() / 1024,
        "tokens_single": tokens_single,
        "tokens_batch": tokens_batch,
    }


def profile(args: argparse.Namespace) -> dict:
    """Where one blipserve caption's time goes: vision encoder, Q-Former (+ projection),
    prefill, and each decode step; then torch.profiler's top operators of the decode."""
    import blipserve
    from blipserve.engine.generate import DecodeState, build_prompt_batch

    torch.set_grad_enabled(False)
    quantize = {"quantize": "int8"} if args.profile == "int8" else {}
    pipe = blipserve.load(str(args.checkpoint), device="cpu", exif_transpose=False, **quantize)
    model, lm = pipe.model, pipe.model.language_model
    pixels = pipe.preprocess(photo_batch(1))
    prompt_ids = pipe.tokenizer.encode_batch([""])
    tokens = pipe.defaults.engine_tokens()

    def one_caption() -> dict:
        phases = {}
        phases["vision"], image = timed(lambda: model.vision_model(pixels.to(model.dtype)))
        phases["qformer"], prefix = timed(lambda: model.query_image(image))
        batch = build_prompt_batch(
            lm,
            prefix,
            prompt_ids,
            pad_token_id=tokens["pad_token_id"],
            image_token_id=tokens["image_token_id"],
        )
        state = DecodeState(lm, batch, args.max_new_tokens, track_seen=False)
        phases["prefill"], logits = timed(state.prefill)
        steps = []
        for _ in range(args.max_new_tokens - 1):
            token = logits.argmax(-1)
            seconds, logits = timed(lambda token=token: state.step(token))
            steps.append(seconds)
        phases["decode_total"] = sum(steps)
        phases["decode_per_token"] = statistics.median(steps)
        return phases

    one_caption()  # warm-up
    phases = one_caption()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        one_caption()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return {"phases": phases, "operators": table}


def report(capability: dict, results: dict[str, dict], args: argparse.Namespace) -> str:
    ref = results.get("transformers")
    lines = [
        f"CPU: {capability['cpu']}, {capability['cores']} threads, flags "
        f"{' '.join(capability['flags'])}, torch {capability['torch']} "
        f"({capability['torch_capability']}), native bf16: {capability['native_bf16']}",
        f"checkpoint {args.checkpoint}, greedy, max_new_tokens {args.max_new_tokens} "
        f"({args.chat_tokens} per chat turn)",
        "",
        "| measure | " + " | ".join(f"{v} ({r['dtype']})" for v, r in results.items()) + " |",
        "|---|" + "---|" * len(results),
    ]
    rows = [
        ("load (s)", "load_s"),
        ("single caption (s)", "latency_s"),
        ("batch of 8 (s per image)", "batch8_s_per_image"),
        ("chat, first turn (s)", "chat_first_s"),
        ("chat, follow-up (s)", "chat_follow_up_s"),
        ("peak RSS (GB)", "peak_rss_gb"),
    ]
    for label, key in rows:
        cells = []
        for result in results.values():
            cell = f"{result[key]:.2f}"
            if ref is not None and result is not ref:
                cell += f" ({ref[key] / result[key]:.2f}x)"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    for variant, result in results.items():
        speedup = result["chat_first_s"] / result["chat_follow_up_s"]
        line = f"{variant}: chat follow-up {speedup:.2f}x faster than the first turn"
        if ref is not None and result is not ref:
            same = result["tokens_single"] == ref["tokens_single"]
            rows_same = sum(
                a == b for a, b in zip(result["tokens_batch"], ref["tokens_batch"], strict=True)
            )
            line += f"; tokens as transformers: single {same}, batch {rows_same} of 8 rows"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", type=Path, help="default: /tmp/blip2-{opt-2.7b,flan-t5-xl}-random-fp32"
    )
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chat-tokens", type=int, default=5, help="new tokens per chat turn")
    parser.add_argument("--profile", nargs="?", const="default", choices=["default", "int8"])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    add_family_flags(parser)
    args = parser.parse_args()
    args.checkpoint = args.checkpoint or DEFAULT_CHECKPOINTS[args.family]
    if args.profile and args.family != "opt":
        parser.error("--profile times OPT's prefill and decode steps; drop it for --family t5")
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return
    capability = cpu_capability()
    print(json.dumps(capability), file=sys.stderr)
    build(args.checkpoint, torch.float32, family=args.family, tiny=args.tiny)
    results = run_in_children(__file__, args.variants.split(","))
    text = report(capability, results, args)
    print(text)
    profiled = profile(args) if args.profile else None
    if profiled:
        print("\nblipserve, one caption, seconds by phase:")
        print(json.dumps({k: round(v, 4) for k, v in profiled["phases"].items()}))
        print(profiled["operators"])
    if args.out:
        record = {"capability": capability, "results": results, "report": text}
        args.out.write_text(json.dumps(record | {"profile": profiled}, indent=2))


if __name__ == "__main__":
    main()
