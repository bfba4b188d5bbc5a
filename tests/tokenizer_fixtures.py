"""A small byte-level BPE tokenizer laid out like the ``Salesforce/blip2-opt-2.7b`` one.

The real vocabulary (50,265 GPT-2 byte-level BPE tokens in RoBERTa/OPT id order, plus
``<image>``) cannot be downloaded in tests, so :func:`build_test_tokenizer` trains a
tiny one on generated English and writes the same files the Hub checkpoint carries:

    vocab.json               <s>=0 <pad>=1 </s>=2 <unk>=3, then byte-level BPE tokens
    merges.txt               "#version: 0.2" header, one merge per line
    added_tokens.json        {"<image>": len(vocab)}
    special_tokens_map.json  bos = eos = unk = "</s>", pad = "<pad>"
    tokenizer_config.json    GPT2Tokenizer, add_bos_token, added_tokens_decoder
    tokenizer.json           only with ``with_tokenizer_json=True``: what transformers 4.x
                             wrote for it (BOS template post-processor, same added tokens)

As in OPT, ``<s>`` and ``<unk>`` are vocabulary entries but not special tokens (the
unknown token is ``</s>``), so ``"<s>"`` in text is split by BPE like any other text.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3, OPT/RoBERTa order
IMAGE_TOKEN = "<image>"
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
    """Write a tiny BLIP-2 OPT-style tokenizer into ``directory`` (created if needed).

    ``with_tokenizer_json`` adds a ``tokenizer.json`` beside the slow files.
    ``legacy_config`` leaves ``added_tokens_decoder`` out of ``tokenizer_config.json``,
    as checkpoints saved before transformers 4.34 do, so special tokens come from
    ``special_tokens_map.json`` and ``<image>`` from ``added_tokens.json`` only.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    trained = _train()
    vocab = trained.get_vocab(with_added_tokens=False)
    assert [vocab[t] for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    merges = json.loads(trained.to_str())["model"]["merges"]
    image_id = len(vocab)

    _write_json(directory / "vocab.json", dict(sorted(vocab.items(), key=lambda kv: kv[1])))
    merge_lines = (" ".join(m) if isinstance(m, list) else m for m in merges)
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merge_lines) + "\n", encoding="utf-8"
    )
    _write_json(directory / "added_tokens.json", {IMAGE_TOKEN: image_id})
    _write_json(directory / "special_tokens_map.json", _special_tokens_map())
    _write_json(directory / "tokenizer_config.json", _tokenizer_config(image_id, legacy_config))
    if with_tokenizer_json:
        _fast_tokenizer(vocab, merges, image_id).save(str(directory / "tokenizer.json"))


def _train() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(english_corpus(), trainer=trainer)
    return tokenizer


def _token_entry(content: str, *, normalized: bool) -> dict[str, object]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": normalized,
        "rstrip": False,
        "single_word": False,
    }


def _special_tokens_map() -> dict[str, object]:
    eos = _token_entry("</s>", normalized=True)
    return {
        "bos_token": eos,
        "eos_token": eos,
        "unk_token": eos,
        "pad_token": _token_entry("<pad>", normalized=True),
    }


def _tokenizer_config(image_id: int, legacy: bool) -> dict[str, object]:
    config: dict[str, object] = {
        "add_bos_token": True,
        "add_prefix_space": False,
        "bos_token": "</s>",
        "clean_up_tokenization_spaces": True,
        "eos_token": "</s>",
        "errors": "replace",
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>",
        "processor_class": "Blip2Processor",
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": "</s>",
    }
    if not legacy:
        config["added_tokens_decoder"] = {
            "1": {**_token_entry("<pad>", normalized=True), "special": True},
            "2": {**_token_entry("</s>", normalized=True), "special": True},
            str(image_id): {**_token_entry(IMAGE_TOKEN, normalized=False), "special": True},
        }
    return dict(sorted(config.items()))


def _fast_tokenizer(vocab: dict[str, int], merges: list, image_id: int) -> Tokenizer:
    pairs = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="</s>:0 $A:0", pair="</s>:0 $A:0 $B:1", special_tokens=[("</s>", 2)]
    )
    tokenizer.add_special_tokens(
        [
            AddedToken("<pad>", normalized=True),
            AddedToken("</s>", normalized=True),
            AddedToken(IMAGE_TOKEN, normalized=False),
        ]
    )
    assert tokenizer.token_to_id(IMAGE_TOKEN) == image_id
    return tokenizer


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
