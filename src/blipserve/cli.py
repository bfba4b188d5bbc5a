"""``blipserve`` command line: argument parsing only; the work is done by :class:`Pipeline`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from blipserve.batch.main import add_batch_parser, run_batch
from blipserve.errors import BlipserveError
from blipserve.server.main import add_serve_parser, run_serve

if TYPE_CHECKING:
    from blipserve.train.data import TrainExample

GENERATION_FLAGS: list[tuple[str, type, str]] = [
    ("max_new_tokens", int, "most tokens to generate (default: the checkpoint's, 20)"),
    ("min_new_tokens", int, "fewest tokens before the end-of-text token is allowed"),
    ("num_beams", int, "beam search width (1 = greedy or sampling)"),
    ("length_penalty", float, "beam search: exponent on length when ranking finished beams"),
    ("temperature", float, "sampling temperature (with --sample)"),
    ("top_k", int, "sampling: keep the k most likely tokens"),
    ("top_p", float, "sampling: keep the smallest set of tokens with this total probability"),
    ("repetition_penalty", float, "penalise tokens already in the context (>1 discourages)"),
    ("num_return_sequences", int, "continuations per image (needs --sample or enough beams)"),
    ("seed", int, "random seed for sampling"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blipserve", description="BLIP-2 image captioning, visual question answering and chat."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    caption = commands.add_parser("caption", help="caption images, one line per image")
    caption.add_argument("images", nargs="+", help="image paths, http(s) URLs, or - for stdin")
    caption.add_argument("--prompt", help='text the caption continues, e.g. "a photo of"')
    caption.add_argument("--json", action="store_true", help="print JSON lines")
    caption.add_argument("--batch-size", type=int, default=8, help="images per model call")

    ask = commands.add_parser("ask", help="answer a question about an image")
    ask.add_argument("image", help="image path, http(s) URL, or - for stdin")
    ask.add_argument("question")
    ask.add_argument("--template", default=None, help="VQA prompt with {question}")

    chat = commands.add_parser("chat", help="talk about an image; an empty line or EOF ends")
    chat.add_argument("image", help="image path, http(s) URL, or - for stdin")

    for sub in (caption, ask, chat):
        add_common_flags(sub)
    add_train_parser(commands)
    add_evaluate_parser(commands)
    add_match_parser(commands)
    add_serve_parser(commands)
    add_batch_parser(commands)
    return parser


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


def add_match_parser(commands: argparse._SubParsersAction) -> None:
    match = commands.add_parser(
        "match", help="score images against texts with an image-text matching checkpoint"
    )
    match.add_argument("images", nargs="+", help="image paths or http(s) URLs")
    match.add_argument(
        "--text", action="append", required=True, help="a candidate text (repeat the flag)"
    )
    match.add_argument(
        "--model", required=True, help="a matching checkpoint, e.g. Salesforce/blip2-itm-vit-g"
    )
    match.add_argument("--itm", action="store_true", help="also P(match) from the ITM head")
    match.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    match.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"]
    )


def run_match(args: argparse.Namespace) -> None:
    """One JSON line per image: cosine similarity to each text (ITC), the best text, and
    with ``--itm`` the matching head's probability for each text."""
    import blipserve

    matcher = blipserve.load_matcher(args.model, device=args.device, dtype=args.dtype)
    scores = matcher.similarity(args.images, args.text)  # (images, texts)
    for i, image in enumerate(args.images):
        row = scores[i].tolist()
        record: dict[str, Any] = {
            "image": image,
            "similarity": dict(zip(args.text, (round(v, 4) for v in row), strict=True)),
            "best": args.text[max(range(len(row)), key=row.__getitem__)],
        }
        if args.itm:
            probabilities = matcher.match([image] * len(args.text), args.text)
            record["match"] = dict(
                zip(args.text, (round(p, 4) for p in probabilities), strict=True)
            )
        print(json.dumps(record), flush=True)


def add_evaluate_parser(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser(
        "evaluate", help="exact-match caption and VQA accuracy on held-out synthetic scenes"
    )
    evaluate.add_argument("--model", default="demo", help="demo, a checkpoint directory or Hub id")
    evaluate.add_argument("--count", type=int, default=500, help="held-out images (default 500)")
    evaluate.add_argument("--seed", type=int, default=1000, help="scene seed (default: held out)")
    evaluate.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    evaluate.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"]
    )
    evaluate.add_argument("--json", action="store_true", help="print the report as JSON")


def run_evaluate(args: argparse.Namespace) -> None:
    import blipserve
    from blipserve.train.evaluate import evaluate_synthetic

    if args.count < 1:
        raise BlipserveError("--count must be at least 1")
    pipe = blipserve.load(args.model, device=args.device, dtype=args.dtype)
    report = evaluate_synthetic(pipe, args.count, args.seed)
    if args.json:
        fields = ("images", "caption_accuracy", "vqa_accuracy", "vqa_by_question")
        print(json.dumps({name: getattr(report, name) for name in fields}), flush=True)
    else:
        print(report.summary(), flush=True)


def add_train_parser(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train", help="train the Q-Former on image-caption pairs (stage 2, or stage 1)"
    )
    train.add_argument("--model", required=True, help="starting checkpoint directory or Hub id")
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
    train.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    train.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="dtype of the frozen image encoder and language model",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")


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


def run_train(args: argparse.Namespace) -> None:
    if args.stage == 1:
        run_train_stage1(args)
        return
    import blipserve
    from blipserve.train.checkpoint import generation_config_of
    from blipserve.train.data import read_caption_table
    from blipserve.train.stage2 import TrainConfig, train_stage2

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
    pipe = blipserve.load(args.model, device=args.device, dtype=args.dtype)
    if args.qformer_from:
        from blipserve.train.checkpoint import adopt_stage1_qformer

        matcher = blipserve.load_matcher(args.qformer_from, device=args.device, dtype="float32")
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
        generation_config=generation_config_of(pipe),
    )
    summary = {"steps": result.step, "final_loss": result.final_loss, "output": str(args.output)}
    if result.eval is not None:
        summary |= {"eval_loss": result.eval.loss, "eval_accuracy": result.eval.accuracy}
    print(json.dumps(summary), flush=True)


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="demo", help="demo, a checkpoint directory or Hub id")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"]
    )
    parser.add_argument("--no-exif", action="store_true", help="ignore EXIF orientation")
    parser.add_argument(
        "--allow-private-urls",
        action="store_true",
        help="fetch image URLs on loopback, private and link-local addresses (refused by default)",
    )
    gen = parser.add_argument_group("generation")
    for name, kind, text in GENERATION_FLAGS:
        gen.add_argument("--" + name.replace("_", "-"), type=kind, help=text)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy/beam search")
    gen.add_argument(
        "--early-stopping", action="store_true", help="beam search: stop once enough beams end"
    )
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")


def generation_options(args: argparse.Namespace) -> dict[str, Any]:
    options = {name: getattr(args, name) for name, _, _ in GENERATION_FLAGS}
    options = {k: v for k, v in options.items() if v is not None}
    if args.sample:
        options["do_sample"] = True
    if args.early_stopping:
        options["early_stopping"] = True
    if args.stop:
        options["stop"] = tuple(args.stop)
    return options


def read_image_arg(source: str) -> Any:
    """``-`` means the image bytes arrive on standard input."""
    return sys.stdin.buffer.read() if source == "-" else source


def run_caption(pipe, args: argparse.Namespace, gen: dict[str, Any]) -> None:
    if args.batch_size < 1:
        raise BlipserveError("--batch-size must be at least 1")
    for start in range(0, len(args.images), args.batch_size):
        names = args.images[start : start + args.batch_size]
        try:
            rows = pipe.generate([read_image_arg(n) for n in names], args.prompt, **gen)
        except BlipserveError as exc:
            row = getattr(exc, "row", None)
            if row is not None:  # name the file, not its position in this chunk
                raise BlipserveError(f"{names[row]}: {exc.reason}") from exc
            raise
        for name, generations in zip(names, rows, strict=True):
            if args.json:
                record = {"image": name, "text": generations[0].text}
                record["finish_reason"] = generations[0].finish_reason
                if len(generations) > 1:
                    record["texts"] = [g.text for g in generations]
                print(json.dumps(record), flush=True)
            else:
                print(" | ".join(g.text for g in generations), flush=True)


def run_chat(pipe, args: argparse.Namespace, gen: dict[str, Any]) -> None:
    if args.image == "-":
        raise BlipserveError(
            "chat reads questions from standard input; give the image as a path or URL"
        )
    # Decode (or download) once, so each turn reuses the image and a bad one fails up front.
    (image,) = pipe.load_images([args.image])
    interactive = sys.stdin.isatty()
    messages: list[dict[str, str]] = []
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return
        messages.append({"role": "user", "content": line.strip()})
        reply = pipe.chat(image, messages, **gen)
        messages.append({"role": "assistant", "content": reply})
        print(f"blip> {reply}" if interactive else reply, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "batch":
            return run_batch(args)
        if args.command in ("train", "evaluate", "serve", "match"):
            commands = {
                "train": run_train,
                "evaluate": run_evaluate,
                "serve": run_serve,
                "match": run_match,
            }
            commands[args.command](args)
            return 0
        import blipserve
        from blipserve.processing.fetch import UrlPolicy

        pipe = blipserve.load(
            args.model,
            device=args.device,
            dtype=args.dtype,
            exif_transpose=not args.no_exif,
            url_policy=UrlPolicy(allow_private=args.allow_private_urls),
        )
        gen = generation_options(args)
        pipe.params(**gen)  # refuse bad options before any work
        if args.command == "caption":
            run_caption(pipe, args, gen)
        elif args.command == "ask":
            extra = {"template": args.template} if args.template else {}
            print(pipe.ask(read_image_arg(args.image), args.question, **extra, **gen), flush=True)
        else:
            run_chat(pipe, args, gen)
    except BlipserveError as exc:
        print(f"blipserve: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
