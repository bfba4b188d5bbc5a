"""Small tokenizers laid out like the ``Salesforce/blip2-opt-2.7b`` (byte-level BPE) and
``Salesforce/blip2-flan-t5-xl`` (SentencePiece Unigram) ones.

The real vocabulary (50,265 GPT-2 byte-level BPE tokens in RoBERTa/OPT id order, plus
``<image>``) cannot be downloaded in tests, so :func:`build_test_tokenizer` trains a
tiny one on generated English and writes the files the Hub checkpoint carries (see
:mod:`blipserve.train.bpe` for the layout).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from blipserve.train.bpe import IMAGE_TOKEN, SPECIAL_TOKENS, write_bpe_tokenizer

__all__ = [
    "IMAGE_TOKEN",
    "SPECIAL_TOKENS",
    "build_test_t5_tokenizer",
    "build_test_tokenizer",
    "english_corpus",
]

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


# -- a tiny Flan-T5-style tokenizer ---------------------------------------------------------

T5_SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0..2, T5's order
T5_VOCAB_SIZE = 300


def build_test_t5_tokenizer(directory: str | Path) -> Path:
    """Write a tiny SentencePiece-Unigram tokenizer laid out like the Salesforce Flan-T5
    repos' (``tokenizer.json`` + ``tokenizer_config.json``): ``<pad>`` 0, ``</s>`` 1,
    ``<unk>`` 2, the pieces, then ``<image>``; ``</s>`` appended to every text. No sentinel
    (``<extra_id_*>``) tokens and no normalizer, so transformers' ``T5Tokenizer`` rebuilds
    it exactly from these two files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metaspace = dict(replacement="▁", prepend_scheme="always", split=True)
    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(**metaspace)]
    )
    backend.decoder = decoders.Metaspace(**metaspace)
    trainer = trainers.UnigramTrainer(
        vocab_size=T5_VOCAB_SIZE, special_tokens=T5_SPECIAL_TOKENS, unk_token="<unk>"
    )
    backend.train_from_iterator(english_corpus(), trainer)
    assert [backend.token_to_id(t) for t in T5_SPECIAL_TOKENS] == [0, 1, 2]
    backend.add_special_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)])
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    backend.save(str(directory / "tokenizer.json"))
    added = {
        str(backend.token_to_id(content)): AddedToken(content, normalized=False, special=True)
        for content in (*T5_SPECIAL_TOKENS, IMAGE_TOKEN)
    }
    config = {
        "added_tokens_decoder": {i: token.__getstate__() for i, token in added.items()},
        "eos_token": "</s>",
        "extra_ids": 0,
        "model_max_length": 512,
        "pad_token": "<pad>",
        "tokenizer_class": "T5Tokenizer",
        "unk_token": "<unk>",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory
