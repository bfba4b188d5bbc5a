"""Build the bundled demo model from nothing, reproducibly, on a CPU.

    python -m blipserve.train.demo --output src/blipserve/demo_model

The recipe follows BLIP-2: parts trained on their own, then frozen, then only the
Q-Former (with its query tokens and projection) trained in stage 2 by
:func:`blipserve.train.stage2.train_stage2`, the same code users fine-tune with.

1. tokenizer: a byte-level BPE trained on the synthetic captions and questions (seed 1);
2. image encoder and Q-Former: a small ViT pre-trained together with a Q-Former of 4
   queries to read each scene from pixels: its layout, its objects in caption order, and
   which object covers each patch (seed 2; BLIP-2's stage 1 in spirit, see
   :mod:`blipserve.train.pretrain`);
3. language model: a small OPT decoder pre-trained on captions, answers and conversations,
   each after the scene written as 4 scene tokens (seed 1; see
   :mod:`blipserve.train.pretrain`), then checked alone: given the true scene tokens, how
   often are its captions and answers right;
4. stage 2: frozen image encoder and language model, the Q-Former of step 2 with a new
   projection trained on captioning and VQA samples (seed 3);
5. evaluation on held-out scenes (seed 1000, never used in training) and on scenes drawn
   independently of the generator (:mod:`blipserve.train.drawn`).

Every step is seeded and runs on the CPU in float32 with a fixed thread count (one each
for steps 2 and 3, which run side by side; ``stage2_threads`` for stage 2; the count
changes the order of floating-point sums), so the same command rebuilds the same weights
on the same software versions.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from blipserve.api import Pipeline, load
from blipserve.generation_config import CheckpointDefaults
from blipserve.model.opt import OPTConfig, OPTForCausalLM
from blipserve.model.qformer import QFormerConfig
from blipserve.model.vision import VisionConfig, VisionTransformer
from blipserve.processing.image_processor import BLIP2_PREPROCESSOR_CONFIG, ImageProcessor
from blipserve.processing.tokenizer import Tokenizer
from blipserve.train.bpe import write_bpe_tokenizer
from blipserve.train.checkpoint import assemble, save_checkpoint
from blipserve.train.evaluate import (
    EvalReport,
    evaluate_drawn,
    evaluate_language_model,
    evaluate_synthetic,
)
from blipserve.train.pretrain import (
    PretrainSettings,
    patch_labels,
    pretrain_language_model,
    pretrain_vision,
)
from blipserve.train.stage2 import TrainConfig, train_stage2
from blipserve.train.synthetic import (
    SCENE_LENGTH,
    SCENE_TOKENS,
    corpus,
    render,
    scene_labels,
    scenes,
    synthetic_examples,
    texts,
)


@dataclass(frozen=True)
class DemoRecipe:
    image_size: int = 112
    patch_size: int = 16
    hidden: int = 128
    vision_layers: int = 4
    qformer_layers: int = 2  # the reader's reading head, then stage 2's start
    text_layers: int = 4
    heads: int = 4
    num_query_tokens: int = SCENE_LENGTH  # one per scene token, the language model's prefix
    max_positions: int = 256  # room for a conversation of several turns
    vocab_size: int = 512
    tokenizer_scenes: int = 3000
    vision_scenes: int = 50000  # 20,000 were learned by heart (100% seen, ~94% held out)
    vision_steps: int = 8000  # small shapes are the slowest thing it learns (docs/demo-model.md)
    text_scenes: int = 10000
    text_steps: int = 6000  # beside the encoder's 8,000, so it costs no wall time
    text_lr: float = 1e-3
    stage2_scenes: int = 8000
    stage2_steps: int = 2000  # from the reader's Q-Former: the loss is flat by then
    stage2_batch: int = 48
    stage2_lr: float = 1e-3
    stage2_threads: int = 2  # steps 2 and 3 use one core each; stage 2 has both
    stage2_follow_ups: float = 0.05  # conversations are the language model's to learn
    eval_scenes: int = 500
    drawn_scenes: int = 300
    oracle_scenes: int = 200


def build(
    output: Path, recipe: DemoRecipe = DemoRecipe(), language_model_from: Path | None = None
) -> dict:
    """Run the whole recipe; write the checkpoint to ``output``; return the build record.

    ``language_model_from`` (an earlier build's output) reuses its tokenizer and language
    model instead of making them again (steps 1 and 3 are the slow, deterministic part;
    use it only when those steps of the recipe have not changed)."""
    torch.manual_seed(0)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    work = Path(tempfile.mkdtemp(prefix="blipserve-demo-"))

    mark = started

    def lap(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        timings[name] = round(now - mark, 1)
        mark = now
        print(f"[demo] {name}: {timings[name]} s", file=sys.stderr, flush=True)

    reused = _load_earlier(language_model_from) if language_model_from else None
    if reused is None:
        tokenizer_dir = write_bpe_tokenizer(
            corpus(recipe.tokenizer_scenes, 1),
            work / "tokenizer",
            vocab_size=recipe.vocab_size,
            extra_special_tokens=SCENE_TOKENS,
        )
        tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    else:
        tokenizer = reused.tokenizer
    lap("tokenizer")

    qformer_config = _qformer_config(recipe)
    # Steps 2 and 3 need nothing of each other: each runs in its own single-threaded
    # process (so the weights stay the same as run one after the other).
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, spawn, initializer=_exit_with, initargs=(os.getpid(),)) as pool:
        vision_job = pool.submit(_pretrain_image_encoder, recipe, qformer_config)
        text_job = pool.submit(_pretrain_text, recipe, tokenizer_dir) if reused is None else None
        (vision_config, reader_state), scene_accuracy, timings["image encoder"] = (
            vision_job.result()
        )
        if text_job is not None:
            (text_config, text_state), text_loss, timings["language model"] = text_job.result()
    reader_encoder = VisionTransformer(vision_config)
    reader_encoder.load_state_dict(reader_state["encoder"])
    if reused is None:
        language_model = OPTForCausalLM(text_config)
        language_model.load_state_dict(text_state)
        language_model.lm_head.weight = language_model.model.decoder.embed_tokens.weight
    else:
        language_model, text_loss = reused.model.language_model, float("nan")
    processor = _processor(recipe)
    eos = tokenizer.encode("\n")[1]
    oracle = evaluate_language_model(language_model, tokenizer, recipe.oracle_scenes)
    print(f"[demo] language model reading true scene tokens: {oracle.summary()}", file=sys.stderr)
    lap("steps 2 and 3, in parallel")

    model = assemble(
        reader_encoder,
        language_model,
        qformer_config,
        num_query_tokens=recipe.num_query_tokens,
        image_token_index=tokenizer.image_token_id,
        seed=3,
    )
    model.qformer.load_state_dict(reader_state["qformer"])  # stage 2 starts from the reader's
    with torch.no_grad():
        model.query_tokens.copy_(reader_state["query_tokens"])
    generation_config = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": tokenizer.pad_token_id,
        "max_new_tokens": 40,
    }
    examples = synthetic_examples(recipe.stage2_scenes, 3, follow_ups=recipe.stage2_follow_ups)
    torch.set_num_threads(recipe.stage2_threads)
    result = train_stage2(
        model,
        tokenizer,
        processor,
        examples,
        TrainConfig(
            max_steps=recipe.stage2_steps,
            batch_size=recipe.stage2_batch,
            lr=recipe.stage2_lr,
            warmup_steps=100,
            seed=3,
            save_every=None,
        ),
        output_dir=work / "stage2",
        generation_config=generation_config,
    )
    lap("stage 2")

    output.mkdir(parents=True, exist_ok=True)
    for old in output.iterdir():
        if old.is_file():
            old.unlink()
    save_checkpoint(model, tokenizer, processor, output, generation_config=generation_config)
    defaults = CheckpointDefaults.read(output, model.config)
    pipe = Pipeline(model, tokenizer, processor, defaults, name="demo")
    report = evaluate_synthetic(pipe, recipe.eval_scenes)
    drawn = evaluate_drawn(pipe, recipe.drawn_scenes)
    lap("evaluation")
    record = {
        "recipe": asdict(recipe),
        "language_model_from": str(language_model_from) if language_model_from else None,
        "seconds": timings,
        "torch": torch.__version__,
        "vision_scene_accuracy": round(scene_accuracy, 4),
        "text_final_loss": round(text_loss, 4),
        "text_oracle": _scores(oracle),
        "stage2_final_loss": round(result.final_loss, 4),
        "eval": _scores(report),
        "drawn_eval": _scores(drawn),
    }
    (output / "build_record.json").write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(report.summary(), drawn.summary(), sep="\n", file=sys.stderr)
    return record


def _processor(recipe: DemoRecipe) -> ImageProcessor:
    size = {"height": recipe.image_size, "width": recipe.image_size}
    return ImageProcessor.from_dict({**BLIP2_PREPROCESSOR_CONFIG, "size": size})


def _exit_with(parent: int) -> None:
    """In a worker: end this process when ``parent`` is gone (a killed build must not leave
    its workers training for half an hour)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(2)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _qformer_config(recipe: DemoRecipe) -> QFormerConfig:
    return QFormerConfig(
        hidden_size=recipe.hidden,
        num_hidden_layers=recipe.qformer_layers,
        num_attention_heads=recipe.heads,
        intermediate_size=2 * recipe.hidden,
        cross_attention_frequency=1,
        encoder_hidden_size=recipe.hidden,
    )


def _pretrain_image_encoder(
    recipe: DemoRecipe, qformer_config: QFormerConfig
) -> tuple[tuple, float, float]:
    """Step 2 (in a worker process): -> (config, {"encoder", "qformer": state dicts,
    "query_tokens"}), scene accuracy, seconds."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    config = VisionConfig(
        hidden_size=recipe.hidden,
        intermediate_size=2 * recipe.hidden,
        num_hidden_layers=recipe.vision_layers,
        num_attention_heads=recipe.heads,
        image_size=recipe.image_size,
        patch_size=recipe.patch_size,
    )
    processor = _processor(recipe)
    train_scenes = scenes(recipe.vision_scenes, 2)
    side = recipe.image_size // recipe.patch_size
    pixels = torch.cat([processor([render(s)]).half() for s in train_scenes])  # (N, 3, H, W)
    labels = torch.tensor([scene_labels(s) for s in train_scenes])  # (N, 4)
    slots, objects = zip(*(patch_labels(s, side) for s in train_scenes), strict=True)
    reader, accuracy = pretrain_vision(
        config,
        qformer_config,
        pixels,
        labels,
        torch.tensor(slots),  # (N, P)
        torch.tensor(objects),  # (N, P)
        PretrainSettings(recipe.vision_steps, 64, 1e-3, seed=2),
    )
    print(f"[demo] image encoder: scene accuracy {accuracy:.3f}", file=sys.stderr, flush=True)
    state = {
        "encoder": reader.encoder.state_dict(),
        "qformer": reader.qformer.state_dict(),
        "query_tokens": reader.query_tokens.detach(),
    }
    return (config, state), accuracy, round(time.perf_counter() - started, 1)


def _pretrain_text(recipe: DemoRecipe, tokenizer_dir: Path) -> tuple[tuple, float, float]:
    """Step 3 (in a worker process): -> (config, state dict), final loss, seconds."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    config = OPTConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=recipe.hidden,
        ffn_dim=4 * recipe.hidden,
        num_hidden_layers=recipe.text_layers,
        num_attention_heads=recipe.heads,
        max_position_embeddings=recipe.max_positions,
        word_embed_proj_dim=recipe.hidden,
        eos_token_id=tokenizer.encode("\n")[1],
    )
    model, loss = pretrain_language_model(
        config,
        tokenizer,
        _text_pairs(recipe.text_scenes, 1),
        PretrainSettings(recipe.text_steps, 64, recipe.text_lr, warmup_steps=200, seed=1),
    )
    print(f"[demo] language model: final loss {loss:.4f}", file=sys.stderr, flush=True)
    return (config, model.state_dict()), loss, round(time.perf_counter() - started, 1)


def _load_earlier(directory: Path) -> Pipeline:
    """An earlier demo build, on the CPU in float32, for its tokenizer and language model."""
    return load(str(directory), device="cpu", dtype="float32", for_training=True)


def _scores(report: EvalReport) -> dict:
    return {
        "images": report.images,
        "caption_exact_match": round(report.caption_accuracy, 4),
        "caption_objects_match": round(report.caption_objects_accuracy, 4),
        "vqa_exact_match": round(report.vqa_accuracy, 4),
        "vqa_by_question": {k: round(v, 4) for k, v in report.vqa_by_question.items()},
    }


def _text_pairs(count: int, seed: int) -> list:
    """(scene, prompt, target) triples for the language model: each caption (empty
    prompt), and each kind of question with its answer, some in a conversation."""
    rng = random.Random(seed)
    return [
        (scene, prompt, target)
        for scene in scenes(count, seed)
        for prompt, target in texts(scene, rng, questions_per_scene=8)
    ]


def _recipe(overrides: list[str]) -> DemoRecipe:
    recipe = DemoRecipe()
    for item in overrides:
        name, _, value = item.partition("=")
        if name not in DemoRecipe.__dataclass_fields__:
            raise SystemExit(f"--set: no recipe field {name!r}")
        kind = type(getattr(recipe, name))
        recipe = replace(recipe, **{name: kind(value)})
    return recipe


def main() -> None:
    parser = argparse.ArgumentParser(description="rebuild the bundled demo model")
    parser.add_argument("--output", type=Path, default=Path(__file__).parents[1] / "demo_model")
    parser.add_argument(
        "--language-model-from",
        type=Path,
        help="reuse the tokenizer and language model of an earlier build's output",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a recipe field, e.g. --set stage2_steps=4000",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # reproducible sums, and no thrashing beside other processes
    record = build(args.output, _recipe(args.set), args.language_model_from)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
