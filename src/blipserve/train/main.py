"""``blipserve train`` and ``blipserve evaluate``: flags -> the trainers and the evaluation.

The training modules (and torch) are imported when a command runs, not when the parser is
built, so ``blipserve --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from blipserve.errors import BlipserveError
from blipserve.flags import add_model_flags

if TYPE_CHECKING:
    from blipserve.train.data import TrainExample


def add_train_parser(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train", help="train the Q-Former on image-caption pairs (stage 2, or stage 1)"
    )
    train.add_argument(
        "--stage",
        type=int,
        choices=[1, 2],
        default=2,
        help="2 (default): fit the Q-Former to a frozen language model; 1: image-text "
        "contrast, matching and generation without one (writes a matching checkpoint)",
    )
    train.add_argument("--output", required=True, help="directory for checkpoints and the result")
    data = train.add_argument_group("data")
    data.add_argument("--data", help="caption table (.csv or .jsonl: image, caption[, prompt])")
    data.add_argument("--eval-data", help="held-out caption table, evaluated at the end")
    data.add_argument(
        "--synthetic", type=int, metavar="N", help="train on N generated scenes (captions + VQA)"
    )
    data.add_argument("--synthetic-seed", type=int, default=3, help="seed of the scenes")
    opt = train.add_argument_group("optimisation")
    opt.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    opt.add_argument("--batch-size", type=int, default=16)
    opt.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    opt.add_argument("--warmup-steps", type=int, default=100)
    opt.add_argument("--save-every", type=int, default=500, help="steps between checkpoints")
    opt.add_argument("--eval-every", type=int, help="steps between evaluations")
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16", "fp16"])
    opt.add_argument("--num-workers", type=int, default=0, help="image decoding processes")
    opt.add_argument("--resume", action="store_true", help="continue the run in --output")
    train.add_argument(
        "--qformer-from",
        metavar="STAGE1_DIR",
        help="start from a stage-1 (image-text matching) checkpoint's query tokens and Q-Former",
    )
    add_model_flags(
        train,
        model_help="starting checkpoint: demo (default), a directory or Hub id",
        dtype_help="dtype of the frozen image encoder and language model",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(run=run_train)


def add_evaluate_parser(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser(
        "evaluate",
        help="exact-match caption and VQA accuracy on held-out generated scenes and on "
        "independently drawn ones",
    )
    add_model_flags(evaluate, quantize=True)
    evaluate.add_argument("--count", type=int, default=500, help="held-out images (default 500)")
    evaluate.add_argument(
        "--drawn", type=int, default=300, help="independently drawn images (default 300; 0: none)"
    )
    evaluate.add_argument("--seed", type=int, default=1000, help="scene seed (default: held out)")
    evaluate.add_argument("--json", action="store_true", help="print the report as JSON")
    evaluate.set_defaults(run=run_evaluate)


def run_train(args: argparse.Namespace) -> int:
    if args.stage == 1:
        run_train_stage1(args)
    else:
        run_train_stage2(args)
    return 0


def run_train_stage2(args: argparse.Namespace) -> None:
    from blipserve.api import load
    from blipserve.matching import load_matcher
    from blipserve.train.checkpoint import adopt_stage1_qformer
    from blipserve.train.data import read_caption_table
    from blipserve.train.stage2 import TrainConfig, latest_checkpoint, train_stage2

    latest = latest_checkpoint(args.output)
    if latest is not None and not args.resume:  # the library's message names resume=True
        raise BlipserveError(
            f"--output {args.output} already holds a training run ({latest}); add --resume "
            "to continue it, or choose another --output"
        )
    examples = training_examples(args)
    eval_examples = read_caption_table(args.eval_data) if args.eval_data else None
    config = TrainConfig(
        max_steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        save_every=args.save_every,
        eval_every=args.eval_every,
        seed=args.seed,
        mixed_precision=args.mixed_precision,
        num_workers=args.num_workers,
        progress=not args.no_progress,
    )
    config.validate()
    pipe = load(args.model, device=args.device, dtype=args.dtype, for_training=True)
    if args.qformer_from:
        matcher = load_matcher(args.qformer_from, device=args.device, dtype="float32")
        adopt_stage1_qformer(pipe.model, matcher.model)
    result = train_stage2(
        pipe.model,
        pipe.tokenizer,
        pipe.image_processor,
        examples,
        config,
        output_dir=args.output,
        eval_examples=eval_examples,
        resume=args.resume,
        generation_config=pipe.generation_config(),
    )
    summary = {"steps": result.step, "final_loss": result.final_loss, "output": str(args.output)}
    if result.eval is not None:
        summary |= {"eval_loss": result.eval.loss, "eval_accuracy": result.eval.accuracy}
    print(json.dumps(summary), flush=True)


def run_train_stage1(args: argparse.Namespace) -> None:
    """Stage 1 on the captions of the examples (prompted rows, e.g. VQA, are left out), from
    a matching checkpoint or from a captioning checkpoint's image encoder and Q-Former shape
    (a fresh Q-Former; its text vocabulary is the checkpoint's tokenizer plus [CLS], [DEC])."""
    from blipserve.train.stage1 import (
        EncodedImages,
        Stage1Config,
        save_stage1,
        stage1_start,
        train_stage1,
    )

    for flag, given in (("--resume", args.resume), ("--eval-data", args.eval_data)):
        if given:
            raise BlipserveError(f"{flag} is not supported with --stage 1 yet")
    examples = [e for e in training_examples(args) if not e.prompt]
    if len(examples) < 2:
        raise BlipserveError("stage 1 needs at least two captions without a prompt")
    model, codec, processor = stage1_start(
        args.model, device=args.device, dtype=args.dtype, seed=args.seed
    )
    settings = Stage1Config(
        max_steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        seed=args.seed,
    )
    images = EncodedImages(examples, model, processor)
    captions = [e.caption for e in examples]
    heads, result = train_stage1(model, images, captions, codec, settings)
    save_stage1(model, heads, codec, args.output, processor)
    last = result.losses[-1]
    summary = {"steps": len(result.losses), "itc": last.itc, "itm": last.itm, "itg": last.itg}
    print(json.dumps({**summary, "output": str(args.output)}), flush=True)


def training_examples(args: argparse.Namespace) -> list[TrainExample]:
    """The training examples the arguments name: a caption table, generated scenes, or both."""
    from blipserve.train.data import read_caption_table
    from blipserve.train.synthetic import synthetic_examples

    if not args.data and not args.synthetic:
        raise BlipserveError("train needs --data TABLE (.csv or .jsonl) or --synthetic N")
    examples = read_caption_table(args.data) if args.data else []
    if args.synthetic:
        examples += synthetic_examples(args.synthetic, args.synthetic_seed)
    return examples


def run_evaluate(args: argparse.Namespace) -> int:
    from blipserve.api import load
    from blipserve.train.evaluate import evaluate_drawn, evaluate_synthetic

    if args.count < 1:
        raise BlipserveError("--count must be at least 1")
    if args.drawn < 0:
        raise BlipserveError("--drawn must be 0 or more")
    pipe = load(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize)
    reports = {"generated": evaluate_synthetic(pipe, args.count, args.seed)}
    if args.drawn:
        reports["drawn"] = evaluate_drawn(pipe, args.drawn)
    if args.json:
        fields = (
            "images",
            "caption_accuracy",
            "caption_objects_accuracy",
            "vqa_accuracy",
            "vqa_by_question",
        )
        as_dicts = {
            set_name: {name: getattr(report, name) for name in fields}
            for set_name, report in reports.items()
        }
        print(json.dumps(as_dicts), flush=True)
    else:
        print("\n\n".join(report.summary() for report in reports.values()), flush=True)
    return 0
