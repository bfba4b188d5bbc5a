"""The baseline for the load benchmark: the managed endpoint's behaviour, self-hosted.

A FastAPI ``POST /score`` (Azure ML's contract) that runs transformers'
``Blip2ForConditionalGeneration.generate`` on one request at a time, the way the managed
BLIP-2 endpoint's scoring script does (decode every row, generate, answer; requests wait
on a lock). Greedy, ``max_new_tokens`` from ``params``.

    python benchmarks/baseline_server.py --checkpoint DIR --port 8091
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
import threading
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from photos import reference_image_processor


def build_app(checkpoint: str) -> FastAPI:
    from transformers import AutoTokenizer, Blip2ForConditionalGeneration

    model = Blip2ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    processor = reference_image_processor(checkpoint)
    # Blip2Processor's layout: <image> x num_query_tokens, then BOS and the prompt
    image_ids = [model.config.image_token_index] * model.config.num_query_tokens
    lock = threading.Lock()
    app = FastAPI()

    @app.post("/score")
    def score(body: dict) -> list[dict]:  # a sync route: FastAPI runs it on a worker thread
        frame = body["input_data"]
        rows = [dict(zip(frame["columns"], row, strict=True)) for row in frame["data"]]
        params = body.get("params") or {}
        images = [Image.open(io.BytesIO(base64.b64decode(r["image"]))).convert("RGB") for r in rows]
        ids = [image_ids + tokenizer(r.get("text") or "").input_ids for r in rows]
        if len({len(i) for i in ids}) != 1:
            raise ValueError("the baseline takes rows with prompts of one length")
        with lock, torch.inference_mode():
            pixels = processor(images, return_tensors="pt")["pixel_values"]
            input_ids = torch.tensor(ids)
            out = model.generate(
                pixel_values=pixels,
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=int(params.get("max_new_tokens", 20)),
                do_sample=False,
            )
        if out.shape[1] > input_ids.shape[1] and torch.equal(
            out[:, : input_ids.shape[1]], input_ids
        ):
            out = out[:, input_ids.shape[1] :]  # versions that return the prompt too
        texts = tokenizer.batch_decode(out, skip_special_tokens=True)
        return [{"text": t.strip()} for t in texts]

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--port", type=int, default=8091)
    args = parser.parse_args()
    uvicorn.run(build_app(args.checkpoint), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
