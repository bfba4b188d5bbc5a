"""``blipserve batch`` vs a plain transformers loop: images/s over a folder of photos.

Both read the same JPEG files from disk and caption them greedily with the same checkpoint:

- blipserve: ``blipserve batch FOLDER OUT --format jsonl --batch-size B`` in-process
  (decoding threads overlapped with the model); images/s from its summary (model loading
  excluded);
- transformers: for each batch, open the files with PIL, ``BlipImageProcessor``,
  ``Blip2ForConditionalGeneration.generate``, ``batch_decode``: the loop people write.

Both run at each of ``--batch-sizes``; the table gives each size and the best of each side.

Each side runs in a child process of its own. Usage (full size, on a GPU):

    python benchmarks/full_size.py --out /tmp/blip2-full --dtype bfloat16
    python benchmarks/batch_vs_transformers.py --checkpoint /tmp/blip2-full \
        --device cuda --dtype bfloat16 --images 512 --batch-sizes 8 16 32 64
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from photos import photo_batch, reference_image_processor


def write_folder(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(photo_batch(count)):
        path = folder / f"{i:06d}.jpg"
        image.save(path, quality=92)
        paths.append(path)
    return paths


def run_blipserve(args: argparse.Namespace, folder: Path) -> dict:
    from blipserve.batch import runner
    from blipserve.batch.job import BatchSpec

    rates, texts = {}, {}
    for size in args.batch_sizes:
        with tempfile.TemporaryDirectory() as out:
            spec = BatchSpec(
                input=str(folder),
                output_dir=out,
                model=str(args.checkpoint),
                fmt="jsonl",
                device=args.device,
                dtype=args.dtype,
                exif_transpose=False,
                gen={"max_new_tokens": args.max_new_tokens},
                batch_size=size,
                threads=args.threads,
            )
            rates[size] = runner.run(spec, progress_bar=False).images_per_s
            lines = (Path(out) / "predictions.jsonl").read_text().splitlines()
            texts[size] = [json.loads(line)["text"] for line in lines]
    best = max(rates, key=rates.get)
    return {"images_per_s": rates[best], "batch_size": best, "by_batch_size": rates, "texts": texts}


@torch.inference_mode()
def run_transformers(args: argparse.Namespace, folder: Path) -> dict:
    from PIL import Image
    from transformers import AutoTokenizer, Blip2ForConditionalGeneration

    placement = {} if args.device == "cpu" else {"device_map": args.device}
    model = Blip2ForConditionalGeneration.from_pretrained(
        args.checkpoint, dtype=getattr(torch, args.dtype), **placement
    ).eval()
    processor = reference_image_processor(args.checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    config = model.config
    start_ids = [config.image_token_index] * config.num_query_tokens
    start_ids.append(config.text_config.bos_token_id)
    paths = sorted(folder.glob("*.jpg"))

    def caption(batch: list[Path]) -> list[str]:
        images = [Image.open(p).convert("RGB") for p in batch]
        pixels = processor(images, return_tensors="pt")["pixel_values"]
        pixels = pixels.to(args.device, model.dtype)
        input_ids = torch.tensor([start_ids] * len(batch), device=args.device)
        out = model.generate(
            pixel_values=pixels,
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
        )
        return tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)

    rates, texts = {}, {}
    for size in args.batch_sizes:
        caption(paths[:size])  # warm-up at this batch size
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        texts[size] = []
        for i in range(0, len(paths), size):
            texts[size] += caption(paths[i : i + size])
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        rates[size] = len(paths) / (time.perf_counter() - t0)
    best = max(rates, key=rates.get)
    return {"images_per_s": rates[best], "batch_size": best, "by_batch_size": rates, "texts": texts}


def main() -> None:
    parser = argparse.ArgumentParser(description="blipserve batch vs a transformers loop")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--threads", type=int, default=4, help="blipserve decoding threads")
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=["blipserve", "transformers"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        run = run_blipserve if args.child == "blipserve" else run_transformers
        print(json.dumps(run(args, args.folder)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        write_folder(folder, args.images)
        results = {}
        for impl in ("transformers", "blipserve"):
            argv = [sys.executable, __file__, *sys.argv[1:], "--child", impl, "--folder", folder]
            done = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{impl} failed:\n{done.stderr[-3000:]}")
            results[impl] = json.loads(done.stdout.strip().splitlines()[-1])
    ours, ref = results["blipserve"], results["transformers"]
    lines = [
        f"checkpoint {args.checkpoint}, device {args.device}, dtype {args.dtype}, greedy, "
        f"max_new_tokens {args.max_new_tokens}, {args.images} JPEG files\n",
        "| batch size | transformers loop, images/s | blipserve batch, images/s | ratio "
        "| same text |",
        "|---|---|---|---|---|",
    ]
    for size in map(str, args.batch_sizes):
        a, b = ref["by_batch_size"][size], ours["by_batch_size"][size]
        pairs = zip(ref["texts"][size], ours["texts"][size], strict=True)
        same = sum(x.strip() == y for x, y in pairs)
        lines.append(f"| {size} | {a:.1f} | {b:.1f} | {b / a:.2f}x | {same} of {args.images} |")
    lines.append(
        f"\nbest vs best: blipserve {ours['images_per_s']:.1f} (batch {ours['batch_size']}) / "
        f"transformers {ref['images_per_s']:.1f} (batch {ref['batch_size']}) = "
        f"{ours['images_per_s'] / ref['images_per_s']:.2f}x"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
