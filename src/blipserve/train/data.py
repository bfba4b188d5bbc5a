"""Caption tables -> training examples -> padded model inputs for stage-2 training.

A table is a ``.csv`` (header row) or ``.jsonl`` (one object per line) with the columns
``image``, ``caption`` and, optionally, ``prompt``. ``image`` is read as the batch runner
reads it: a path relative to the table's folder, an absolute path, an http(s) URL, or a
base64 image (plain, MIME or ``data:`` URL). Other columns (a pandas index) are ignored.

**Targets.** The model must learn to continue exactly what it sees at inference, where
:meth:`Pipeline.generate` tokenizes the prompt alone (BOS first), the model continues,
and the new tokens are decoded and stripped. So the prompt is tokenized alone, as at
inference, and the target is tokenized separately and appended:

    prompt "a photo of", caption "a cat on a mat"
    text ids:  </s>  a  Ġphoto  Ġof | Ġa  Ġcat  Ġon  Ġa  Ġmat  Ċ
    labels:    -100 -100 -100  -100 | Ġa  Ġcat  Ġon  Ġa  Ġmat  Ċ     (Ċ = "\n", the eos)

The target text is the stripped caption, with one leading space when the prompt is
non-empty and does not already end in whitespace, and the eos id (``"\n"``) appended;
the decoded new tokens are then exactly the caption. With an empty prompt the target is
the bare caption (``a Ġcat ...``), as in the reference's stage 2 (LAVIS ``blip2_opt``:
text ``caption + "\n"``). The LAVIS COCO fine-tune tokenizes ``"a photo of " + caption +
"\n"`` in one piece and masks the ids of ``"a photo of"``: the same ids as here, since the
caption starts a new word after the space. Tokenizing apart also keeps a prompt that ends
in a space (``"Answer: "``) tokenized as generation sees it. BOS is never a target (LAVIS
without a prompt leaves it unmasked: the last query then learns to predict BOS, which
generation never asks for). The query positions in front of the text get ``-100`` in the
loss (:func:`blipserve.train.stage2.stage2_loss`).

**Encoder-decoder (Flan-T5) targets.** The prompt goes to the encoder and the decoder
writes the answer from its start token, so the two are tokenized apart and not aligned
(:func:`encode_encoder_decoder_example`), as LAVIS ``blip2_t5`` and transformers (given
``labels``) have them:

    prompt "a photo of", caption "a cat on a mat"
    input ids:  ▁a ▁photo ▁of </s>                    (the encoder's, after the queries)
    labels:     ▁a ▁cat ▁on ▁a ▁mat </s>              (the decoder's targets, eos last)

The target is the stripped caption alone: the decoder's output is not a continuation of
the prompt's text.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from blipserve.errors import InvalidImage, InvalidRequest
from blipserve.processing.image_processor import ImageProcessor
from blipserve.processing.images import load_image
from blipserve.processing.tokenizer import Tokenizer

IGNORE_INDEX = -100  # label of positions without a loss
REQUIRED_COLUMNS = ("image", "caption")
OPTIONAL_COLUMNS = ("prompt",)
TABLE_SUFFIXES = (".csv", ".jsonl")


@dataclass(frozen=True)
class TrainExample:
    """One image-caption pair; ``prompt`` is the text the caption continues (may be empty).

    ``image`` is anything :func:`blipserve.processing.images.load_image` accepts (a path,
    URL, base64 string, bytes, numpy array or PIL image). ``origin`` says where the example
    came from (``"train.csv line 4"``), for error messages.
    """

    image: Any
    caption: str
    prompt: str = ""
    origin: str = ""


# -- tables ----------------------------------------------------------------------------------


def read_caption_table(path: str | os.PathLike) -> list[TrainExample]:
    """Examples from a ``.csv`` or ``.jsonl`` caption table; errors name file, line and column."""
    path = Path(path)
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise InvalidRequest(f"{path}: a caption table must be a .csv or .jsonl file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheet exports start with a BOM
    except OSError as err:
        raise InvalidRequest(f"cannot read caption table {path}: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise InvalidRequest(f"{path}: not UTF-8 text ({err.reason})") from err
    rows = _csv_rows(path, text) if path.suffix.lower() == ".csv" else _jsonl_rows(path, text)
    examples = [_example(path, line, row) for line, row in rows]
    if not examples:
        raise InvalidRequest(f"{path}: no examples (expected a header and at least one row)")
    return examples


def _csv_rows(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) pairs; a row's line is where it starts (base64 may span lines)."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise InvalidRequest(
            f"{path} line 1: missing column {', '.join(map(repr, missing))} "
            f"(the header has {header}; expected image, caption and optionally prompt)"
        )
    rows, line = [], reader.line_num + 1
    for row in reader:
        rows.append((line, row))
        line = reader.line_num + 1
    return rows


def _jsonl_rows(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as err:
            raise InvalidRequest(f"{path} line {line}: not valid JSON ({err.msg})") from err
        if not isinstance(row, dict):
            raise InvalidRequest(f"{path} line {line}: expected a JSON object, got {raw[:40]!r}")
        for column in REQUIRED_COLUMNS:
            if column not in row:
                raise InvalidRequest(f"{path} line {line}: missing column {column!r}")
        rows.append((line, row))
    return rows


def _example(path: Path, line: int, row: dict[str, Any]) -> TrainExample:
    where = f"{path} line {line}"
    values = {}
    for column in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS):
        value = row.get(column)
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise InvalidRequest(
                f"{where}, column {column!r}: expected a string, got {type(value).__name__}"
            )
        values[column] = value
    for column in REQUIRED_COLUMNS:
        if not values[column].strip():
            raise InvalidRequest(f"{where}, column {column!r}: empty {column}")
    if "\n" in values["caption"].strip():
        raise InvalidRequest(
            f"{where}, column 'caption': the caption has a line break, but a line break is "
            "the model's end-of-text token; put the caption on one line"
        )
    image = resolve_image_reference(values["image"], path.parent)
    return TrainExample(image, values["caption"], values["prompt"], origin=where)


def resolve_image_reference(value: str, folder: Path) -> str:
    """A table's ``image`` value as :func:`load_image` should read it: relative paths are
    taken from the table's ``folder``; URLs, absolute paths and base64 pass unchanged."""
    stripped = value.strip()
    if "://" in stripped[:16] or stripped[:5].lower() == "data:" or len(stripped) > 4096:
        return value
    candidate = Path(stripped).expanduser()
    if candidate.is_absolute():
        return str(candidate)
    relative = folder / candidate
    looks_like_file = bool(candidate.suffix) or "/" in stripped or "\\" in stripped
    return str(relative) if relative.exists() or looks_like_file else value


# -- tokens ----------------------------------------------------------------------------------


def target_text(prompt: str, caption: str) -> str:
    """The text the model must produce after ``prompt`` (see the module docstring)."""
    caption = caption.strip()
    return " " + caption if prompt and not prompt[-1].isspace() else caption


def encode_example(
    tokenizer: Tokenizer, prompt: str, caption: str, eos_token_id: int
) -> tuple[list[int], list[int]]:
    """(input ids, labels), aligned: ``BOS + prompt`` ids labelled -100, then the target
    ids (caption, then eos) labelled with themselves."""
    prompt_ids = tokenizer.encode(prompt)  # BOS + prompt, exactly what generation feeds
    target_ids = _without_bos(tokenizer, tokenizer.encode(target_text(prompt, caption)))
    target_ids.append(eos_token_id)
    return prompt_ids + target_ids, [IGNORE_INDEX] * len(prompt_ids) + target_ids


def encode_encoder_decoder_example(
    tokenizer: Tokenizer, prompt: str, caption: str, eos_token_id: int
) -> tuple[list[int], list[int]]:
    """(encoder ids, decoder labels): ``prompt </s>`` as generation feeds the encoder, and
    the stripped caption's ids with ``eos_token_id`` last (see the module docstring)."""
    target_ids = tokenizer.encode(caption.strip())
    eos = tokenizer.eos_token_id
    assert eos is not None and target_ids[-1:] == [eos], "the T5 tokenizer ends texts with </s>"
    return tokenizer.encode(prompt), [*target_ids[:-1], eos_token_id]


def _without_bos(tokenizer: Tokenizer, ids: list[int]) -> list[int]:
    bos = tokenizer.bos_token_id
    assert bos is not None and ids[:1] == [bos], "the BLIP-2 OPT tokenizer puts BOS first"
    return ids[1:]


# -- batches ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedExample:
    pixel_values: torch.Tensor  # (3, H, W) float32
    input_ids: list[int]  # BOS + prompt + caption + eos; encoder-decoder: prompt + </s>
    labels: list[int]  # -100 on BOS and prompt; encoder-decoder: caption + eos


@dataclass(frozen=True)
class Batch:
    """Right-padded model inputs. For a decoder-only model the labels align with
    ``input_ids`` (the text part only); for an encoder-decoder they are the decoder's targets,
    padded to their own length."""

    pixel_values: torch.Tensor  # (B, 3, H, W) float32
    input_ids: torch.Tensor  # (B, T) long, pad id after the end
    attention_mask: torch.Tensor  # (B, T) long, 1 on real tokens
    labels: torch.Tensor  # (B, T) long, -100 on BOS, prompt and padding; or (B, T_target)

    def to(self, device: torch.device) -> Batch:
        return Batch(
            pixel_values=self.pixel_values.to(device),
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            labels=self.labels.to(device),
        )

    @property
    def num_targets(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


class CaptionDataset(Dataset):
    """Examples tokenized up front (so a too-long one fails before training starts); images
    are decoded and preprocessed when an item is read, in the DataLoader's workers."""

    def __init__(
        self,
        examples: Sequence[TrainExample],
        tokenizer: Tokenizer,
        image_processor: ImageProcessor,
        *,
        eos_token_id: int,
        max_text_tokens: int | None = None,
        exif_transpose: bool = True,
        encoder_decoder: bool = False,
    ) -> None:
        if not examples:
            raise InvalidRequest("no training examples")
        self.examples = list(examples)
        self.image_processor = image_processor
        self.exif_transpose = exif_transpose
        encode = encode_encoder_decoder_example if encoder_decoder else encode_example
        self.encoded = [
            encode(tokenizer, ex.prompt, ex.caption, eos_token_id) for ex in self.examples
        ]
        for example, (ids, _) in zip(self.examples, self.encoded, strict=True):
            if max_text_tokens is not None and len(ids) > max_text_tokens:
                raise InvalidRequest(
                    f"{_name(example)}: prompt and caption are {len(ids)} tokens, over the "
                    f"model's {max_text_tokens} (its positions minus the query tokens)"
                )

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> EncodedExample:
        example = self.examples[index]
        image = load_example_image(example, index, exif_transpose=self.exif_transpose)
        pixels = self.image_processor([image])[0]  # (3, H, W)
        input_ids, labels = self.encoded[index]
        return EncodedExample(pixels, input_ids, labels)


class Collate:
    """EncodedExamples -> one right-padded :class:`Batch` (a picklable DataLoader collate);
    input ids and labels are each padded to their longest (the same length when aligned)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: Sequence[EncodedExample]) -> Batch:
        length = max(len(item.input_ids) for item in items)
        label_length = max(len(item.labels) for item in items)
        input_ids, attention_mask, labels = [], [], []
        for item in items:
            pad = length - len(item.input_ids)
            input_ids.append(item.input_ids + [self.pad_token_id] * pad)
            attention_mask.append([1] * len(item.input_ids) + [0] * pad)
            labels.append(item.labels + [IGNORE_INDEX] * (label_length - len(item.labels)))
        return Batch(
            pixel_values=torch.stack([item.pixel_values for item in items]),
            input_ids=torch.tensor(input_ids),
            attention_mask=torch.tensor(attention_mask),
            labels=torch.tensor(labels),
        )


def load_example_image(
    example: TrainExample, index: int, *, exif_transpose: bool = True
) -> Image.Image:
    """The example's decoded image; a failure names the example (file and line)."""
    try:
        return load_image(example.image, exif_transpose=exif_transpose)
    except InvalidImage as err:
        raise InvalidImage(f"{_name(example, index)}: {err.reason}") from err


def _name(example: TrainExample, index: int | None = None) -> str:
    if example.origin:
        return example.origin
    return "training example" if index is None else f"training example {index}"
