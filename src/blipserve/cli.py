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
import importlib.metadata
import json
import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from blipserve.batch.main import add_batch_parser
from blipserve.errors import BlipserveError, HistoryTruncated
from blipserve.flags import (
    CommandParser,
    add_inference_flags,
    add_model_flags,
    generation_options,
)
from blipserve.server.main import add_serve_parser
from blipserve.train.main import add_evaluate_parser, add_train_parser

if TYPE_CHECKING:
    from blipserve.api import Pipeline
    from blipserve.outputs import Generation


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="blipserve", description="BLIP-2 image captioning, visual question answering and chat."
    )
    version = importlib.metadata.version("blipserve")  # the installed package's metadata
    parser.add_argument("--version", action="version", version=f"blipserve {version}")
    commands = parser.add_subparsers(dest="command", required=True)

    caption = commands.add_parser("caption", help="caption images, one line per image")
    caption.add_argument("images", nargs="+", help="image paths, http(s) URLs, or - for stdin")
    caption.add_argument("--prompt", help='text the caption continues, e.g. "a photo of"')
    caption.add_argument("--json", action="store_true", help="print JSON lines")
    caption.add_argument("--batch-size", type=int, default=8, help="images per model call")
    caption.add_argument("--no-progress", action="store_true", help="no progress bar")
    caption.set_defaults(run=run_caption)

    ask = commands.add_parser("ask", help="answer a question about an image")
    ask.add_argument("image", help="image path, http(s) URL, or - for stdin")
    ask.add_argument("question")
    ask.add_argument("--template", default=None, help="VQA prompt with {question}")
    ask.add_argument("--json", action="store_true", help="print a JSON line")
    ask.set_defaults(run=run_ask)

    chat = commands.add_parser(
        "chat",
        help="talk about an image; an empty line or EOF ends (the oldest turns are left out "
        "once the conversation outgrows the model)",
    )
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


def output_line(generations: list[Generation], record: dict[str, Any] | None) -> str:
    """One image's output: its texts joined by `` | ``, or, given ``record`` (what was
    asked), a JSON object with the first text, its finish reason and, when there are
    several, every text."""
    if record is None:
        return " | ".join(g.text for g in generations)
    record = {**record, "text": generations[0].text}
    record["finish_reason"] = generations[0].finish_reason
    if len(generations) > 1:
        record["texts"] = [g.text for g in generations]
    return json.dumps(record)


def run_caption(args: argparse.Namespace) -> int:
    """A line per image, as each batch finishes; a progress bar on stderr over several
    images when stderr is a terminal."""
    from tqdm import tqdm

    pipe, gen = load_pipeline(args)
    if args.batch_size < 1:
        raise BlipserveError("--batch-size must be at least 1")
    show = len(args.images) > 1 and not args.no_progress and sys.stderr.isatty()
    with tqdm(total=len(args.images), desc="caption", unit="img", disable=not show) as bar:
        for start in range(0, len(args.images), args.batch_size):
            names = args.images[start : start + args.batch_size]
            try:
                rows = pipe.generate([read_image_arg(n) for n in names], args.prompt, **gen)
            except BlipserveError as exc:
                row = getattr(exc, "row", None)
                if row is not None:  # name the file, not its position in this chunk
                    raise BlipserveError(f"{names[row]}: {exc.reason}") from exc
                raise
            with tqdm.external_write_mode(file=sys.stdout):  # lines above the bar
                for name, generations in zip(names, rows, strict=True):
                    record = {"image": name} if args.json else None
                    print(output_line(generations, record), flush=True)
            bar.update(len(names))
    return 0


def run_ask(args: argparse.Namespace) -> int:
    from blipserve.processing.prompts import DEFAULT_VQA_TEMPLATE, vqa_prompt

    pipe, gen = load_pipeline(args)
    prompt = vqa_prompt(args.question, args.template or DEFAULT_VQA_TEMPLATE)
    (generations,) = pipe.generate([read_image_arg(args.image)], [prompt], **gen)
    record = {"image": args.image, "question": args.question} if args.json else None
    print(output_line(generations, record), flush=True)
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
    noted = False
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return 0
        messages.append({"role": "user", "content": line.strip()})
        reply, note = chat_reply(pipe, image, messages, gen)
        if note and not noted:  # once per session, as one line
            print(f"blipserve: note: {note}", file=sys.stderr, flush=True)
            noted = True
        messages.append({"role": "assistant", "content": reply})
        print(f"blip> {reply}" if interactive else reply, flush=True)


def chat_reply(
    pipe: Pipeline, image: Any, messages: list[dict[str, str]], gen: dict[str, Any]
) -> tuple[str, str | None]:
    """``pipe.chat``'s reply, and its :class:`HistoryTruncated` message when it left old
    turns out (other warnings are shown as Python shows them)."""
    note = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", HistoryTruncated)
        reply = pipe.chat(image, messages, **gen)
    for warning in caught:
        if issubclass(warning.category, HistoryTruncated):
            note = str(warning.message)
        else:
            warnings.showwarning(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    return reply, note


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
        model_help="a matching checkpoint: demo (the bundled demo matcher, the default), a "
        "directory or a Hub id such as Salesforce/blip2-itm-vit-g",
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
