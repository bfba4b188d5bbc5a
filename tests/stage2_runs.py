"""What the OPT and Flan-T5 stage-2 tests share: loading on the CPU, one batch of examples
as the trainer encodes them, its mean loss, and a run of ``train_stage2``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

import blipserve
from blipserve.train.data import Batch, CaptionDataset, Collate, TrainExample
from blipserve.train.stage2 import TrainConfig, TrainResult, stage2_loss, train_stage2


def load_cpu(directory) -> blipserve.Pipeline:
    return blipserve.load(str(directory), device="cpu", dtype="float32", exif_transpose=False)


def one_batch(pipe: blipserve.Pipeline, examples: list[TrainExample]) -> Batch:
    """All ``examples`` in one batch, encoded for the pipeline's kind of language model."""
    dataset = CaptionDataset(
        examples,
        pipe.tokenizer,
        pipe.image_processor,
        eos_token_id=pipe.defaults.eos_token_ids[0],
        encoder_decoder=pipe.model.config.is_encoder_decoder,
    )
    return Collate(pipe.defaults.pad_token_id)([dataset[i] for i in range(len(dataset))])


def mean_loss(pipe: blipserve.Pipeline, examples: list[TrainExample]) -> float:
    """Mean target-token loss over ``examples`` in one batch."""
    batch = one_batch(pipe, examples)
    with torch.no_grad():
        loss = stage2_loss(
            pipe.model, batch.pixel_values, batch.input_ids, batch.attention_mask, batch.labels
        )
    return loss.item()


def run_training(
    pipe: blipserve.Pipeline,
    examples: list[TrainExample],
    run: TrainConfig,
    output_dir: Path,
    **kwargs,
) -> TrainResult:
    return train_stage2(
        pipe.model,
        pipe.tokenizer,
        pipe.image_processor,
        examples,
        run,
        output_dir=output_dir,
        generation_config=pipe.generation_config(),
        **kwargs,
    )


def train_command(
    checkpoint: Path, directory: Path, *extra: str, eval_data: bool = True
) -> subprocess.CompletedProcess:
    """``blipserve train`` for 2 steps on ``directory``/data.csv (also its eval data unless
    ``eval_data`` is false), saving every step to ``directory``/out, on one CPU thread;
    ``extra`` arguments last."""
    data = str(directory / "data.csv")
    command = [
        sys.executable, "-m", "blipserve", "train", "--model", str(checkpoint), "--data", data,
        *(["--eval-data", data] if eval_data else []),
        "--output", str(directory / "out"), "--steps", "2", "--batch-size", "2",
        "--warmup-steps", "1", "--save-every", "1", "--device", "cpu", "--dtype", "float32",
        "--no-progress", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
