"""A small byte-level BPE tokenizer laid out like the ``Salesforce/blip2-opt-2.7b`` one.

The real vocabulary (50,265 GPT-2 byte-level BPE tokens in RoBERTa/OPT id order, plus
``<image>``) cannot be downloaded in tests, so :func:`build_test_tokenizer` trains a
tiny one on generated English and writes the files the Hub checkpoint carries (see
:mod:`blipserve.train.bpe` for the layout).
"""

from __future__ import annotations

import random
from pathlib import Path

from blipserve.train.bpe import IMAGE_TOKEN, SPECIAL_TOKENS, write_bpe_tokenizer

__all__ = ["IMAGE_TOKEN", "SPECIAL_TOKENS", "build_test_tokenizer", "english_corpus"]

VOCAB_SIZE = 1200

_SUBJECTS = [
    "a woman",
    "a man",
    "two dogs",
    "the cat",
    "a child",
    "an old car",
    "the red bus",
    "a group of people",
    "a small bird",
    "the chef",
    "a horse",
    "my friend",
    "the city",
]
_VERBS = [
    "is sitting on",
    "walks along",
    "stands next to",
    "looks at",
    "is parked near",
    "runs across",
    "is playing with",
    "flies over",
    "rests under",
    "is holding",
]
_OBJECTS = [
    "the beach",
    "a wooden bench",
    "the river",
    "a green field",
    "the kitchen table",
    "a snowy mountain",
    "the busy street",
    "an umbrella",
    "a plate of food",
    "the window",
]
_QUESTIONS = [
    "which city is this?",
    "what is in the picture?",
    "how many people are there?",
    "what color is the car?",
    "where is the dog?",
    "is it raining?",
    "what time is it?",
]
_EXTRAS = [
    "Hello, world! It's 3:45 p.m. -- isn't it?",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 2024.",
    "Tabs\tand\nnewlines\n\nand   spaces.",
    "Café, naïve, résumé, 東京, 😀 emoji.",
    "Question: what is this? Answer: a photo of a cat\n",
]


def english_corpus(n_sentences: int = 400, seed: int = 0) -> list[str]:
    """Deterministic captions, questions and answers to train the tiny BPE on."""
    rng = random.Random(seed)
    lines = list(_EXTRAS)
    for i in range(n_sentences):
        caption = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
        if i % 3 == 0:
            lines.append(f"Question: {rng.choice(_QUESTIONS)} Answer: {caption}")
        elif i % 3 == 1:
            lines.append(f"a photo of {caption}.")
        else:
            lines.append(caption.capitalize() + "\n")
    return lines


def build_test_tokenizer(
    directory: str | Path, *, with_tokenizer_json: bool, legacy_config: bool = False
) -> None:
    """Write a tiny BLIP-2 OPT-style tokenizer, trained on :func:`english_corpus`."""
    write_bpe_tokenizer(
        english_corpus(),
        directory,
        vocab_size=VOCAB_SIZE,
        with_tokenizer_json=with_tokenizer_json,
        legacy_config=legacy_config,
    )
