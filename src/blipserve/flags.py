"""Command-line flags that more than one command takes, and what they turn into.

``cli.py`` (caption, ask, chat, match), ``server/main.py`` (serve), ``batch/main.py``
(batch) and ``train/main.py`` (train, evaluate) build their parsers from these. The
generation flags are made from :class:`GenerationParams`' fields, so a new option there is
a new flag here. Importing this module loads no torch: ``blipserve --help`` stays fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import fields
from typing import Any, NoReturn

from blipserve.engine.params import GenerationParams

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "int8")
DTYPE_HELP = (
    "auto (default): bfloat16 on a GPU and on a CPU with native bfloat16 (AVX512-BF16 or "
    "AMX), else float32 with oneDNN-packed weights; float32 by name gives exactly "
    "transformers' float32 outputs"
)


class CommandParser(argparse.ArgumentParser):
    """Every ``blipserve`` parser: a usage error is one line, ``blipserve: error: ...``,
    and exit code 1 (as for every other bad input), and flags are never abbreviated (a
    typo such as ``--num-beam`` is an error, not ``--num-beams``). Subparsers inherit it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.help_prog = self.prog  # whose --help the error line points to

    def parse_known_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        namespace, extras = super().parse_known_args(args, namespace)
        command = getattr(namespace, "command", None)
        if extras and command:  # reported by the top parser: point to the command's help
            self.help_prog = f"{self.prog} {command}"
        return namespace, extras

    def error(self, message: str) -> NoReturn:
        self.exit(1, f"blipserve: error: {message} (see {self.help_prog} --help)\n")


def add_model_flags(
    parser: argparse.ArgumentParser,
    *,
    default: str | None = "demo",
    required: bool = False,
    model_help: str = "demo, a checkpoint directory or Hub id",
    dtype_help: str = DTYPE_HELP,
    quantize: bool = False,
    with_defaults: bool = True,
) -> None:
    """``--model``, ``--device`` (default auto), ``--dtype`` (default auto) and, with
    ``quantize``, ``--quantize``.

    ``with_defaults=False`` leaves every default None: ``blipserve serve`` then takes the
    value from a ``BLIPSERVE_*`` variable, else from its settings' defaults.
    """
    model, auto = (default, "auto") if with_defaults else (None, None)
    parser.add_argument("--model", default=model, required=required, help=model_help)
    parser.add_argument("--device", default=auto, help="cpu, cuda, cuda:1 or auto")
    parser.add_argument("--dtype", default=auto, choices=DTYPES, help=dtype_help)
    if quantize:
        parser.add_argument(
            "--quantize",
            choices=QUANTIZATIONS,
            default=None,
            help="int8: int8 weights for the language model (half of bfloat16's memory, "
            "faster decoding on a CPU; outputs differ slightly). Default: none",
        )


def add_image_flags(parser: argparse.ArgumentParser) -> None:
    """``--no-exif`` and ``--allow-private-urls``: how image inputs are read."""
    parser.add_argument("--no-exif", action="store_true", help="ignore EXIF orientation")
    parser.add_argument(
        "--allow-private-urls",
        action="store_true",
        help="fetch image URLs on loopback, private and link-local addresses (refused by default)",
    )


def generation_flag(name: str) -> str:
    """The flag that sets :class:`GenerationParams` field ``name``: ``--max-new-tokens``,
    ``--sample`` (``do_sample``)."""
    field = {f.name: f for f in fields(GenerationParams)}[name]
    return "--" + field.metadata.get("flag", name).replace("_", "-")


def add_generation_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`GenerationParams` field: ``--max-new-tokens``, ``--sample``..."""
    group = parser.add_argument_group("generation")
    for f in fields(GenerationParams):
        flag = generation_flag(f.name)
        text = f.metadata["help"]
        if f.default is False:  # a switch: do_sample (--sample), early_stopping
            group.add_argument(flag, dest=f.name, action="store_true", default=None, help=text)
        elif isinstance(f.default, tuple):  # stop: repeat the flag
            group.add_argument(flag, dest=f.name, action="append", help=text)
        else:  # seed's default is None: an integer
            kind = float if isinstance(f.default, float) else int
            group.add_argument(flag, dest=f.name, type=kind, help=text)


def generation_options(args: argparse.Namespace) -> dict[str, Any]:
    """The generation flags given, as :class:`GenerationParams` keyword arguments (flags
    not given are left out, so the checkpoint's defaults apply)."""
    options = {f.name: getattr(args, f.name, None) for f in fields(GenerationParams)}
    options = {k: v for k, v in options.items() if v is not None}
    if "stop" in options:
        options["stop"] = tuple(options["stop"])
    return options


def add_inference_flags(parser: argparse.ArgumentParser) -> None:
    """What every command that writes text takes: model, image and generation flags."""
    add_model_flags(parser, quantize=True)
    add_image_flags(parser)
    add_generation_flags(parser)
