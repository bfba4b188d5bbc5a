"""Build the bundled demo model from nothing, reproducibly, on a CPU.

    python -m blipserve.train.demo --output src/blipserve/demo_model

The recipe follows BLIP-2: parts trained on their own, then frozen, then only the
Q-Former (with its query tokens and projection) trained in stage 2 by
:func:`blipserve.train.stage2.train_stage2`, the same code users fine-tune with.

1. tokenizer: a byte-level BPE trained on the synthetic captions and questions (seed 1);
2. image encoder: a small ViT pre-trained to name the contents of each grid cell (seed 2);
3. language model: a small OPT decoder pre-trained on captions and answers, each after the
   scene written as 9 cell tokens (seed 1; see :mod:`blipserve.train.pretrain`), then
   checked alone: given the true cell tokens, how often are its captions and answers right;
4. stage 2: frozen 2 and 3, a new Q-Former trained on captioning and VQA samples (seed 3);
5. evaluation on held-out scenes (seed 1000, never used in training).

Every step is seeded and runs on the CPU in float32 with one thread (thread count changes
the order of floating-point sums), so the same command rebuilds the same weights on the
same software versions.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from blipserve.api import Pipeline, load
from blipserve.generation_config import CheckpointDefaults
from blipserve.model.opt import OPTConfig
from blipserve.model.qformer import QFormerConfig
from blipserve.model.vision import VisionConfig
from blipserve.processing.image_processor import BLIP2_PREPROCESSOR_CONFIG, ImageProcessor
from blipserve.processing.tokenizer import Tokenizer
from blipserve.train.bpe import write_bpe_tokenizer
from blipserve.train.checkpoint import assemble, save_checkpoint
from blipserve.train.evaluate import EvalReport, evaluate_language_model, evaluate_synthetic
from blipserve.train.pretrain import (
    PretrainSettings,
    pretrain_language_model,
    pretrain_vision,
)
from blipserve.train.stage2 import TrainConfig, train_stage2
from blipserve.train.synthetic import (
    CELL_TOKENS,
    caption,
    cell_labels,
    corpus,
    questions,
    render,
    scenes,
    synthetic_examples,
    vqa_prompt,
)


@dataclass(frozen=True)
class DemoRecipe:
    image_size: int = 96
    patch_size: int = 16
    hidden: int = 128
    vision_layers: int = 4
    qformer_layers: int = 4
    text_layers: int = 4
    heads: int = 4
    num_query_tokens: int = 9  # one per grid cell, as the language model's prefix
    vocab_size: int = 400
    tokenizer_scenes: int = 3000
    vision_scenes: int = 8000
    vision_steps: int = 2000
    text_scenes: int = 6000
    text_steps: int = 8000
    text_lr: float = 1e-3
    stage2_scenes: int = 4000
    stage2_steps: int = 6000
    stage2_batch: int = 48
    stage2_lr: float = 1e-3
    eval_scenes: int = 500
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

    def lap(name: str) -> None:
        timings[name] = round(time.perf_counter() - started - sum(timings.values()), 1)
        print(f"[demo] {name}: {timings[name]} s", file=sys.stderr, flush=True)

    reused = _load_earlier(language_model_from) if language_model_from else None
    if reused is None:
        tokenizer = Tokenizer.from_pretrained(
            write_bpe_tokenizer(
                corpus(recipe.tokenizer_scenes, 1),
                work / "tokenizer",
                vocab_size=recipe.vocab_size,
                extra_special_tokens=CELL_TOKENS,
            )
        )
    else:
        tokenizer = reused.tokenizer
    eos = tokenizer.encode("\n")[1]
    processor = ImageProcessor.from_dict(
        {
            **BLIP2_PREPROCESSOR_CONFIG,
            "size": {"height": recipe.image_size, "width": recipe.image_size},
        }
    )
    lap("tokenizer")

    vision_config = VisionConfig(
        hidden_size=recipe.hidden,
        intermediate_size=2 * recipe.hidden,
        num_hidden_layers=recipe.vision_layers,
        num_attention_heads=recipe.heads,
        image_size=recipe.image_size,
        patch_size=recipe.patch_size,
    )
    train_scenes = scenes(recipe.vision_scenes, 2)
    pixels = torch.cat([processor([render(s)]) for s in train_scenes])
    labels = torch.tensor([cell_labels(s) for s in train_scenes])
    classifier, cell_accuracy = pretrain_vision(
        vision_config, pixels, labels, PretrainSettings(recipe.vision_steps, 64, 1e-3, seed=2)
    )
    del pixels
    lap("image encoder")

    if reused is None:
        text_config = OPTConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=recipe.hidden,
            ffn_dim=4 * recipe.hidden,
            num_hidden_layers=recipe.text_layers,
            num_attention_heads=recipe.heads,
            max_position_embeddings=64,
            word_embed_proj_dim=recipe.hidden,
            eos_token_id=eos,
        )
        language_model, text_loss = pretrain_language_model(
            text_config,
            tokenizer,
            _text_pairs(recipe.text_scenes, 1),
            PretrainSettings(recipe.text_steps, 64, recipe.text_lr, warmup_steps=200, seed=1),
        )
    else:
        language_model, text_loss = reused.model.language_model, float("nan")
    oracle = evaluate_language_model(language_model, tokenizer, recipe.oracle_scenes)
    print(f"[demo] language model reading true cell tokens: {oracle.summary()}", file=sys.stderr)
    lap("language model")

    qformer_config = QFormerConfig(
        hidden_size=recipe.hidden,
        num_hidden_layers=recipe.qformer_layers,
        num_attention_heads=recipe.heads,
        intermediate_size=2 * recipe.hidden,
        cross_attention_frequency=1,
        encoder_hidden_size=recipe.hidden,
    )
    model = assemble(
        classifier.encoder,
        language_model,
        qformer_config,
        num_query_tokens=recipe.num_query_tokens,
        image_token_index=tokenizer.image_token_id,
        seed=3,
    )
    generation_config = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": tokenizer.pad_token_id,
        "max_new_tokens": 40,
    }
    examples = synthetic_examples(recipe.stage2_scenes, 3)
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
    lap("evaluation")
    record = {
        "recipe": asdict(recipe),
        "language_model_from": str(language_model_from) if language_model_from else None,
        "seconds": timings,
        "torch": torch.__version__,
        "vision_cell_accuracy": round(cell_accuracy, 4),
        "text_final_loss": round(text_loss, 4),
        "text_oracle": _scores(oracle),
        "stage2_final_loss": round(result.final_loss, 4),
        "eval": _scores(report),
    }
    (output / "build_record.json").write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(report.summary(), file=sys.stderr)
    return record


def _load_earlier(directory: Path) -> Pipeline:
    """An earlier demo build, on the CPU in float32, for its tokenizer and language model."""
    return load(str(directory), device="cpu", dtype="float32", for_training=True)


def _scores(report: EvalReport) -> dict:
    return {
        "images": report.images,
        "caption_exact_match": round(report.caption_accuracy, 4),
        "vqa_exact_match": round(report.vqa_accuracy, 4),
        "vqa_by_question": {k: round(v, 4) for k, v in report.vqa_by_question.items()},
    }


def _text_pairs(count: int, seed: int) -> list:
    """(scene, prompt, target) triples for the language model: each caption (empty
    prompt) and each question with its answer."""
    rng = random.Random(seed)
    triples = []
    for scene in scenes(count, seed):
        triples.append((scene, "", caption(scene)))
        triples += [(scene, vqa_prompt(q), a) for q, a in questions(scene, rng)]
    return triples


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
