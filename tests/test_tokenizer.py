"""Tokenizer parity with transformers 5.x on tiny BLIP-2 OPT-style tokenizer directories.

The reference is the tokenizer BLIP-2 actually decodes with: ``AutoTokenizer`` wrapped by
``Blip2Processor`` (which makes ``<image>`` special). Encodings are also checked against
the bare ``AutoTokenizer``.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer, Blip2Processor, BlipImageProcessorPil

from blipserve.errors import CheckpointError, InvalidRequest
from blipserve.processing.tokenizer import Tokenizer
from blipserve.testing.tokenizers import build_test_tokenizer, english_corpus

# name -> (with_tokenizer_json, legacy_config)
LAYOUTS = {
    "vocab-merges": (False, False),
    "tokenizer-json": (True, False),
    "legacy-vocab-merges": (False, True),
    "legacy-tokenizer-json": (True, True),
}

TEXTS = [
    "",
    " ",
    "Question: which city is this? Answer:",
    "a photo of",
    "  leading and trailing spaces  ",
    "\n",
    "a\nb",
    "line one\n\nline two\n",
    "\t tabs \t and\r\nCRLF",
    "Café, naïve, résumé",
    "東京タワー and 北京",
    "😀👍🏽 emoji 🐕‍🦺",
    "x <image> y",
    "<image><image><image>",
    "foo<image>bar",
    "</s>",
    "a</s>b <pad> c</s>",
    "<s> and <unk> are plain text here",
    "<IMAGE> <image <image>>",
    "Hello, world! It's 3:45 p.m. -- isn't it?",
    "xylophone quizzically unseen words",
    " ".join(english_corpus(200)),
    *english_corpus(40, seed=1),
]


def reference(directory: Path):
    """The tokenizer BLIP-2 uses: AutoTokenizer as adjusted by Blip2Processor."""
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return Blip2Processor(BlipImageProcessorPil(), tokenizer, num_query_tokens=4).tokenizer


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout_dir(request, tmp_path_factory) -> Path:
    with_json, legacy = LAYOUTS[request.param]
    directory = tmp_path_factory.mktemp(request.param)
    build_test_tokenizer(directory, with_tokenizer_json=with_json, legacy_config=legacy)
    return directory


@pytest.fixture(scope="module")
def pair(layout_dir):
    return Tokenizer.from_pretrained(layout_dir), reference(layout_dir)


def random_ids(vocab_size: int, seed: int, count: int = 30) -> list[list[int]]:
    """Id sequences with specials, <image>, ids past the vocabulary and broken UTF-8."""
    rng = random.Random(seed)
    lengths = [rng.randrange(0, 25) for _ in range(count)]
    return [[rng.randrange(vocab_size + 8) for _ in range(n)] for n in lengths]


def test_encode_matches_transformers(pair, layout_dir):
    ours, ref = pair
    bare = AutoTokenizer.from_pretrained(layout_dir)
    for text in TEXTS:
        expected = ref(text)["input_ids"]
        assert ours.encode(text) == expected, text
        assert bare(text)["input_ids"] == expected, text


def test_every_encoding_starts_with_bos_and_has_no_eos(pair):
    ours, _ = pair
    assert ours.encode("") == [2]
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids[0] == ours.bos_token_id == 2
        assert text.endswith("</s>") or len(ids) == 1 or ids[-1] != 2


def test_newline_is_one_byte_level_token(pair, layout_dir):
    ours, ref = pair
    vocab = json.loads((layout_dir / "vocab.json").read_text(encoding="utf-8"))
    assert ours.encode("\n") == ref("\n")["input_ids"] == [2, vocab["Ċ"]]


def test_added_tokens_are_cut_out_of_text_but_s_and_unk_are_not(pair):
    ours, _ = pair
    image = ours.image_token_id
    assert ours.encode("foo<image>bar") == [*ours.encode("foo"), image, *ours.encode("bar")[1:]]
    assert ours.encode("<image><image>") == [2, image, image]
    assert ours.encode("</s><pad>") == [2, 2, 1]
    assert 0 not in ours.encode("<s>") and 3 not in ours.encode("<unk>")


def test_encode_batch_matches_single_and_reference(pair):
    ours, ref = pair
    assert ours.encode_batch(TEXTS) == [ours.encode(t) for t in TEXTS] == ref(TEXTS)["input_ids"]
    assert ours.encode_batch([]) == []


def test_decode_matches_transformers(pair):
    ours, ref = pair
    for text in TEXTS:
        ids = ref(text)["input_ids"]
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True).strip(), text
    for ids in random_ids(ours.vocab_size, seed=0):
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True).strip(), ids
        kept = ref.decode(ids, skip_special_tokens=False).strip()
        assert ours.decode(ids, skip_special_tokens=False) == kept, ids


def test_decode_batch_matches_batch_decode(pair):
    ours, ref = pair
    batch = random_ids(ours.vocab_size, seed=1) + [ref(t)["input_ids"] for t in TEXTS[:10]]
    expected = [text.strip() for text in ref.batch_decode(batch, skip_special_tokens=True)]
    assert ours.decode_batch(batch) == expected
    assert ours.decode_batch(batch) == [ours.decode(ids) for ids in batch]


def test_decode_accepts_tensors_and_arrays(pair):
    import torch

    ours, _ = pair
    ids = ours.encode("a photo of a dog")
    assert ours.decode(torch.tensor(ids)) == ours.decode(ids) == "a photo of a dog"
    assert ours.decode(torch.tensor(ids).numpy()) == "a photo of a dog"


def test_special_ids_match_transformers(pair, layout_dir):
    ours, ref = pair
    assert ours.bos_token_id == ref.bos_token_id == 2
    assert ours.eos_token_id == ref.eos_token_id == 2
    assert ours.pad_token_id == ref.pad_token_id == 1
    added = json.loads((layout_dir / "added_tokens.json").read_text(encoding="utf-8"))
    assert ours.image_token_id == ref.convert_tokens_to_ids("<image>") == added["<image>"]
    assert ours.vocab_size == len(ref) == added["<image>"] + 1
    assert ours.all_special_ids == ref.all_special_ids


def test_save_pretrained_round_trip(pair, tmp_path):
    ours, ref = pair
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    again, theirs = Tokenizer.from_pretrained(tmp_path), reference(tmp_path)
    bare = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        expected = ref(text)["input_ids"]
        assert again.encode(text) == theirs(text)["input_ids"] == expected
        assert bare(text)["input_ids"] == expected
    for ids in random_ids(ours.vocab_size, seed=2):
        assert again.decode(ids) == theirs.decode(ids, skip_special_tokens=True).strip()
        assert again.decode(ids) == ours.decode(ids)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "all_special_ids"):
        assert getattr(again, name) == getattr(ours, name) == getattr(theirs, name)
    assert (again.image_token_id, again.vocab_size) == (ours.image_token_id, ours.vocab_size)


# -- quirks of the reference, pinned ---------------------------------------------------------


def test_tokenizer_json_post_processor_wins_over_add_bos_token(tmp_path):
    """With a tokenizer.json, transformers drops add_bos_token and keeps the file's
    post-processor; a file without one therefore encodes without BOS."""
    build_test_tokenizer(tmp_path, with_tokenizer_json=True)
    path = tmp_path / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps({**data, "post_processor": None}), encoding="utf-8")
    ours, ref = Tokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert ours.encode("a photo of") == ref("a photo of")["input_ids"]
    assert ours.encode("") == ref("")["input_ids"] == []


def test_legacy_image_token_is_special_as_blip2_processor_makes_it(tmp_path):
    """added_tokens.json alone makes <image> an ordinary token; Blip2Processor re-adds it as
    special, so decoding drops it. We decode as the processor does."""
    build_test_tokenizer(tmp_path, with_tokenizer_json=False, legacy_config=True)
    ours, bare = Tokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    ids = ours.encode("x <image> y")
    assert bare.decode(ids, skip_special_tokens=True) == "x <image> y"
    assert ours.decode(ids) == reference(tmp_path).decode(ids, skip_special_tokens=True) == "x  y"


def test_no_image_token_gives_none(tmp_path):
    build_test_tokenizer(tmp_path, with_tokenizer_json=False, legacy_config=True)
    (tmp_path / "added_tokens.json").unlink()
    ours = Tokenizer.from_pretrained(tmp_path)
    assert ours.image_token_id is None
    assert ours.vocab_size == len(AutoTokenizer.from_pretrained(tmp_path))


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keep", [[], ["vocab.json", "tokenizer_config.json"], ["vocab.json", "merges.txt"]]
)
def test_missing_files_name_directory_and_expected_files(tmp_path, keep):
    source, target = tmp_path / "full", tmp_path / "partial"
    build_test_tokenizer(source, with_tokenizer_json=False)
    target.mkdir()
    for name in keep:
        shutil.copy(source / name, target / name)
    with pytest.raises(CheckpointError) as info:
        Tokenizer.from_pretrained(target)
    expected = ["tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"]
    for part in [str(target), *expected]:
        assert part in str(info.value)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer in"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["vocab.json", "tokenizer_config.json", "tokenizer.json"])
def test_broken_json_file(tmp_path, name):
    build_test_tokenizer(tmp_path, with_tokenizer_json=True)
    (tmp_path / name).write_text("{not json", encoding="utf-8")
    if name == "vocab.json":
        (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        Tokenizer.from_pretrained(tmp_path)


def test_merges_that_do_not_fit_the_vocabulary(tmp_path):
    build_test_tokenizer(tmp_path, with_tokenizer_json=False)
    with (tmp_path / "merges.txt").open("a", encoding="utf-8") as merges:
        merges.write("zzq qqz\n")
    with pytest.raises(CheckpointError):
        Tokenizer.from_pretrained(tmp_path)


def test_added_token_id_must_match_declaration(tmp_path):
    build_test_tokenizer(tmp_path, with_tokenizer_json=False, legacy_config=True)
    path = tmp_path / "added_tokens.json"
    index = json.loads(path.read_text(encoding="utf-8"))["<image>"]
    path.write_text(json.dumps({"<image>": index + 7}), encoding="utf-8")
    with pytest.raises(CheckpointError, match="<image>"):
        Tokenizer.from_pretrained(tmp_path)


def test_encode_rejects_non_strings(pair):
    ours, _ = pair
    with pytest.raises(InvalidRequest, match="prompt 1"):
        ours.encode_batch(["fine", None])
