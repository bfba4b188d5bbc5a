"""Train a byte-level BPE tokenizer and write it in the BLIP-2 OPT checkpoint layout.

The layout mirrors ``Salesforce/blip2-opt-2.7b``'s tokenizer files, so both
:class:`blipserve.processing.tokenizer.Tokenizer` and transformers' ``AutoTokenizer`` /
``Blip2Processor`` load the result:

    vocab.json               <s>=0 <pad>=1 </s>=2 <unk>=3, then byte-level BPE tokens
    merges.txt               "#version: 0.2" header, one merge per line
    added_tokens.json        {"<image>": len(vocab)}, then any extra special tokens
    special_tokens_map.json  bos = eos = unk = "</s>", pad = "<pad>"
    tokenizer_config.json    GPT2Tokenizer, add_bos_token, added_tokens_decoder
    tokenizer.json           optional: the same tokenizer for the Rust library

As in OPT, ``<s>`` and ``<unk>`` are vocabulary entries but not special tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3, OPT/RoBERTa order
IMAGE_TOKEN = "<image>"


def write_bpe_tokenizer(
    texts: Iterable[str],
    directory: str | Path,
    *,
    vocab_size: int,
    with_tokenizer_json: bool = True,
    legacy_config: bool = False,
    extra_special_tokens: Sequence[str] = (),
) -> Path:
    """Train a byte-level BPE of ``vocab_size`` on ``texts`` and write it into ``directory``.

    ``legacy_config`` leaves ``added_tokens_decoder`` out of ``tokenizer_config.json``, as
    checkpoints saved before transformers 4.34 do. ``extra_special_tokens`` get the ids
    after ``<image>``, are matched whole in text and skipped when decoding.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    trained = _train(texts, vocab_size)
    vocab = trained.get_vocab(with_added_tokens=False)
    assert [vocab[t] for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    merges = json.loads(trained.to_str())["model"]["merges"]
    image_id = len(vocab)
    added = {IMAGE_TOKEN: image_id}
    added.update({token: image_id + 1 + i for i, token in enumerate(extra_special_tokens)})

    _write_json(directory / "vocab.json", dict(sorted(vocab.items(), key=lambda kv: kv[1])))
    merge_lines = (" ".join(m) if isinstance(m, list) else m for m in merges)
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merge_lines) + "\n", encoding="utf-8"
    )
    _write_json(directory / "added_tokens.json", added)
    _write_json(directory / "special_tokens_map.json", _special_tokens_map())
    _write_json(directory / "tokenizer_config.json", _tokenizer_config(added, legacy_config))
    if with_tokenizer_json:
        _fast_tokenizer(vocab, merges, added).save(str(directory / "tokenizer.json"))
    return directory


def _train(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
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


def _tokenizer_config(added: dict[str, int], legacy: bool) -> dict[str, object]:
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
            **{
                str(index): {**_token_entry(token, normalized=False), "special": True}
                for token, index in added.items()
            },
        }
    return dict(sorted(config.items()))


def _fast_tokenizer(vocab: dict[str, int], merges: list, added: dict[str, int]) -> Tokenizer:
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
            *(AddedToken(token, normalized=False, special=True) for token in added),
        ]
    )
    assert all(tokenizer.token_to_id(token) == index for token, index in added.items())
    return tokenizer


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
