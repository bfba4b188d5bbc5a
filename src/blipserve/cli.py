"""The ``blipserve`` command: its parser, and the inference commands over the Python API.

``caption``, ``ask``, ``chat`` and ``match`` are a few lines each over :func:`blipserve.load`
and :func:`blipserve.load_matcher`. The other commands live with what they run:
``serve`` in :mod:`blipserve.server.main`, ``batch`` in :mod:`blipserve.batch.main`,
``train`` and ``evaluate`` in :mod:`blipserve.train.main`. Every subcommand sets ``run``
(args -> exit code). The API (and torch) is imported when a command runs, so
``blipserve --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from blipserve.batch.main import add_batch_parser
from blipserve.errors import BlipserveError
from blipserve.flags import add_inference_flags, add_model_flags, generation_options
from blipserve.server.main import add_serve_parser
from blipserve.train.main import add_evaluate_parser, add_train_parser

if TYPE_CHECKING:
    from blipserve.api import Pipeline


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
    caption.set_defaults(run=run_caption)

    ask = commands.add_parser("ask", help="answer a question about an image")
    ask.add_argument("image", help="image path, http(s) URL, or - for stdin")
    ask.add_argument("question")
    ask.add_argument("--template", default=None, help="VQA prompt with {question}")
    ask.set_defaults(run=run_ask)

    chat = commands.add_parser("chat", help="talk about an image; an empty line or EOF ends")
    chat.add_argument("image", help="image path, http(s) URL, or - for stdin")
    chat.set_defaults(run=run_chat)

    for sub in (caption, ask, chat):
        add_inference_flags(sub)
    add_train_parser(commands)
    add_evaluate_parser(commands)
    add_match_parser(commands)
    add_serve_parser(commands)
    add_batch_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except BlipserveError as exc:
        print(f"blipserve: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


# -- caption, ask, chat --------------------------------------------------------------------


def load_pipeline(args: argparse.Namespace) -> tuple[Pipeline, dict[str, Any]]:
    """The pipeline the flags name, and their generation options (refused before any work
    when they are bad)."""
    from blipserve.api import load
    from blipserve.processing.fetch import UrlPolicy

    pipe = load(
        args.model,
        device=args.device,
        dtype=args.dtype,
        exif_transpose=not args.no_exif,
        url_policy=UrlPolicy(allow_private=args.allow_private_urls),
        quantize=args.quantize,
    )
    gen = generation_options(args)
    pipe.params(**gen)
    return pipe, gen


def read_image_arg(source: str) -> Any:
    """``-`` means the image bytes arrive on standard input."""
    return sys.stdin.buffer.read() if source == "-" else source


def run_caption(args: argparse.Namespace) -> int:
    pipe, gen = load_pipeline(args)
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
    return 0


def run_ask(args: argparse.Namespace) -> int:
    pipe, gen = load_pipeline(args)
    extra = {"template": args.template} if args.template else {}
    print(pipe.ask(read_image_arg(args.image), args.question, **extra, **gen), flush=True)
    return 0


def run_chat(args: argparse.Namespace) -> int:
    pipe, gen = load_pipeline(args)
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
            return 0
        messages.append({"role": "user", "content": line.strip()})
        reply = pipe.chat(image, messages, **gen)
        messages.append({"role": "assistant", "content": reply})
        print(f"blip> {reply}" if interactive else reply, flush=True)


# -- match ---------------------------------------------------------------------------------


def add_match_parser(commands: argparse._SubParsersAction) -> None:
    match = commands.add_parser(
        "match", help="score images against texts with an image-text matching checkpoint"
    )
    match.add_argument("images", nargs="+", help="image paths or http(s) URLs")
    match.add_argument(
        "--text", action="append", required=True, help="a candidate text (repeat the flag)"
    )
    add_model_flags(
        match,
        default=None,
        required=True,
        model_help="a matching checkpoint, e.g. Salesforce/blip2-itm-vit-g",
    )
    match.add_argument("--itm", action="store_true", help="also P(match) from the ITM head")
    match.set_defaults(run=run_match)


def run_match(args: argparse.Namespace) -> int:
    """One JSON line per image: cosine similarity to each text (ITC), the best text, and
    with ``--itm`` the matching head's probability for each text."""
    from blipserve.matching import load_matcher

    matcher = load_matcher(args.model, device=args.device, dtype=args.dtype)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
