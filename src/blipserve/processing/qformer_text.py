"""Texts -> the Q-Former's input ids, for image-text matching and stage-1 training.

The Q-Former reads text with its own (BERT-style) vocabulary, not the language model's:
:class:`TextCodec` turns texts into right-padded id rows that start with ``[CLS]``.
:func:`blipserve.load_matcher` and :mod:`blipserve.train.stage1` both use it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer as RustTokenizer

from blipserve.errors import CheckpointError

SETTINGS_FILE = "stage1_text.json"  # written by stage 1 beside tokenizer.json


class TextCodec:
    """Texts -> Q-Former input ids: ``[CLS] tokens...`` (``[DEC]`` replaces ``[CLS]`` for
    ITG), right-padded with ``pad_id``, at most ``max_length`` ids. With ``add_special``
    the tokenizer's own post-processor adds ``[CLS]`` (BERT's, for the Salesforce
    checkpoints); otherwise ``cls_id`` is put first (a new vocabulary, e.g. the demo's)."""

    def __init__(
        self,
        tokenizer: RustTokenizer,
        *,
        cls_id: int,
        dec_id: int,
        pad_id: int,
        max_length: int = 32,
        add_special: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.cls_id, self.dec_id, self.pad_id = cls_id, dec_id, pad_id
        self.max_length = max_length
        self.add_special = add_special

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> TextCodec:
        """The codec of a matching checkpoint: ``tokenizer.json``, and ``stage1_text.json``
        when stage 1 wrote one; else BERT's ids ([CLS] 101, [DEC] 30522, [PAD] 0, 35 ids)."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{directory} has no tokenizer.json for the Q-Former's text")
        settings = {
            "cls_id": 101,
            "dec_id": 30522,
            "pad_id": 0,
            "max_length": 35,
            "add_special": True,
        }
        if (directory / SETTINGS_FILE).is_file():
            settings.update(json.loads((directory / SETTINGS_FILE).read_text()))
        return cls(RustTokenizer.from_file(str(path)), **settings)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``tokenizer.json`` and the settings :meth:`from_pretrained` reads back."""
        directory = Path(directory)
        self.tokenizer.save(str(directory / "tokenizer.json"))
        (directory / SETTINGS_FILE).write_text(json.dumps(self.settings(), indent=1) + "\n")

    def settings(self) -> dict:
        return {
            "cls_id": self.cls_id,
            "dec_id": self.dec_id,
            "pad_id": self.pad_id,
            "max_length": self.max_length,
            "add_special": self.add_special,
        }

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids (B, T) and 0/1 mask (B, T), T the longest text's length."""
        encoded = self.tokenizer.encode_batch(list(texts), add_special_tokens=self.add_special)
        first = [] if self.add_special else [self.cls_id]
        rows = [[*first, *e.ids][: self.max_length] for e in encoded]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids, mask
