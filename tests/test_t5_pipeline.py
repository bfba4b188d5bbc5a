"""BLIP-2 Flan-T5 checkpoints through the public API and the command line, against the
reference run as users run it (``Blip2Processor`` with the checkpoint's T5 tokenizer,
``generate``), on tiny random checkpoints in every on-disk layout we load."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

import blipserve
from blipserve.errors import InvalidRequest
from blipserve.model.blip2 import Blip2Config
from blipserve.processing.tokenizer import Tokenizer
from blipserve.resolve import resolve_dtype
from blipserve.testing import checkpoints
from blipserve.testing.reference import PROMPTS, reference_generate
from blipserve.weights import SKIPPED

PHOTOS = ["chelsea", "coffee", "astronaut", "china"]
MAX_NEW = 10


@pytest.fixture(scope="module")
def t5_pipe(tiny_t5_checkpoint):
    return blipserve.load(
        str(tiny_t5_checkpoint), device="cpu", dtype="float32", exif_transpose=False
    )


@pytest.fixture(scope="module")
def images(photos):
    return [photos[name] for name in PHOTOS]


@pytest.fixture(scope="module")
def reference_greedy(t5_reference_model, tiny_t5_checkpoint, images):
    return reference_generate(
        t5_reference_model, tiny_t5_checkpoint, images, PROMPTS, max_new_tokens=MAX_NEW
    )


def tokens(pipe, images, prompts, **gen) -> list[list[list[int]]]:
    return [[g.token_ids for g in row] for row in pipe.generate(images, prompts, **gen)]


@pytest.mark.parametrize("layout", checkpoints.T5_LAYOUTS)
def test_greedy_matches_reference_for_every_layout(
    layout, t5_checkpoint_root, t5_reference_model, reference_greedy, images
):
    directory = checkpoints.save_checkpoint(t5_reference_model, t5_checkpoint_root, layout)
    pipe = blipserve.load(str(directory), device="cpu", dtype="float32", exif_transpose=False)
    assert tokens(pipe, images, PROMPTS, max_new_tokens=MAX_NEW) == reference_greedy


@pytest.mark.parametrize(
    "gen",
    [
        dict(num_beams=3, max_new_tokens=MAX_NEW, num_return_sequences=2),
        dict(max_new_tokens=MAX_NEW, repetition_penalty=1.5, min_new_tokens=4),
    ],
    ids=["beam3-n2", "greedy-penalty-min"],
)
def test_generation_options_match_reference(
    gen, t5_pipe, t5_reference_model, tiny_t5_checkpoint, images
):
    expected = reference_generate(t5_reference_model, tiny_t5_checkpoint, images, PROMPTS, **gen)
    assert tokens(t5_pipe, images, PROMPTS, **gen) == expected


def test_the_prompt_goes_to_the_encoder_with_eos_and_no_bos(t5_pipe, tiny_t5_checkpoint):
    """T5's tokenizer: no BOS, ``</s>`` (1) after every prompt; captioning is ``[</s>]``."""
    tokenizer = t5_pipe.tokenizer
    assert tokenizer.bos_token_id is None and tokenizer.eos_token_id == 1
    assert tokenizer.encode("") == [1]
    assert tokenizer.encode("a photo of")[-1] == 1
    theirs = AutoTokenizer.from_pretrained(tiny_t5_checkpoint)
    for text in [*PROMPTS, "Café, naïve 東京  two   spaces", "x <image> y"]:
        assert tokenizer.encode(text) == theirs(text).input_ids, text


def test_caption_ask_chat_and_stream(t5_pipe, images, t5_reference_model, tiny_t5_checkpoint):
    image = images[0]
    question = "what is in the picture?"
    expected = reference_generate(
        t5_reference_model,
        tiny_t5_checkpoint,
        [image],
        [f"Question: {question} Answer:"],
        max_new_tokens=MAX_NEW,
    )[0][0]
    answer = t5_pipe.ask(image, question, max_new_tokens=MAX_NEW)
    assert answer == t5_pipe.tokenizer.decode(expected)
    messages = [
        {"role": "user", "content": question},
        {"role": "assistant", "content": "a cat"},
        {"role": "user", "content": "which city is this?"},
    ]
    chat_prompt = (
        "Question: what is in the picture? Answer: a cat Question: which city is this? Answer:"
    )
    assert (
        t5_pipe.chat(image, messages, max_new_tokens=MAX_NEW)
        == t5_pipe.generate([image], [chat_prompt], max_new_tokens=MAX_NEW)[0][0].text
    )
    caption = t5_pipe.caption([image], max_new_tokens=MAX_NEW)[0]
    assert "".join(t5_pipe.stream(image, max_new_tokens=MAX_NEW)).strip() == caption
    assert t5_pipe.room("a very long prompt " * 100) == t5_pipe.context_length > 0


def test_cli_caption_on_a_flan_t5_checkpoint(tiny_t5_checkpoint, t5_pipe, photos, tmp_path):
    path = tmp_path / "cat.jpg"
    photos["chelsea"].save(path, quality=95)
    flags = ["--model", str(tiny_t5_checkpoint), "--device", "cpu", "--dtype", "float32"]
    done = subprocess.run(
        [sys.executable, "-m", "blipserve", "caption", str(path), *flags, "--max-new-tokens", "6"],
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().splitlines() == t5_pipe.caption([str(path)], max_new_tokens=6)


def test_float16_is_refused_and_auto_never_picks_it(tiny_t5_checkpoint):
    with pytest.raises(InvalidRequest, match="float16"):
        blipserve.load(str(tiny_t5_checkpoint), device="cpu", dtype="float16")
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu, float16_ok=False) in (torch.float32, torch.bfloat16)
    assert resolve_dtype("float16", cpu) == torch.float16  # OPT keeps float16


def test_bfloat16_loads_and_generates(tiny_t5_checkpoint, images):
    pipe = blipserve.load(
        str(tiny_t5_checkpoint), device="cpu", dtype="bfloat16", for_training=True
    )
    assert pipe.model.language_model.shared.weight.dtype == torch.bfloat16
    assert pipe.model.qformer.layernorm.weight.dtype == torch.float32
    out = pipe.generate(images[:2], ["", "a photo of"], max_new_tokens=4)
    assert all(1 <= len(row[0].token_ids) <= 4 for row in out)


def test_flan_t5_xl_config_reads_with_reference_defaults():
    """The published blip2-flan-t5-xl text_config (a diff over the reference defaults)."""
    published = {
        "model_type": "blip-2",
        "num_query_tokens": 32,
        "text_config": {
            "model_type": "t5",
            "d_ff": 5120,
            "d_kv": 64,
            "d_model": 2048,
            "dense_act_fn": "gelu",
            "feed_forward_proj": "gated-gelu",
            "num_decoder_layers": 24,
            "num_heads": 32,
            "num_layers": 24,
            "tie_word_embeddings": False,
            "decoder_start_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 1,
            "pad_token_id": 0,
            "vocab_size": 32128,
        },
        "use_decoder_only_language_model": False,
    }
    config = Blip2Config.from_hf(published)
    text = config.text
    assert config.is_encoder_decoder and not config.tie_word_embeddings
    assert (text.hidden_size, text.act_name, text.scale_decoder_outputs) == (
        2048,
        "gelu_new",
        False,
    )
    assert (text.relative_attention_num_buckets, text.relative_attention_max_distance) == (32, 128)
    round_trip = Blip2Config.from_hf(config.to_hf())
    assert round_trip == config and config.to_hf()["use_decoder_only_language_model"] is False


def test_embedding_copies_are_skipped_with_a_reason(t5_checkpoint_root, t5_reference_model):
    directory = checkpoints.save_checkpoint(
        t5_reference_model, t5_checkpoint_root, "with-embedding-copies"
    )
    index = json.loads((directory / "config.json").read_text())
    assert index["text_config"]["tie_word_embeddings"] is False
    reasons = [reason for pattern, reason in SKIPPED.items() if "embed_tokens" in pattern]
    assert reasons and "shared.weight" in reasons[0]
    assert isinstance(Tokenizer.from_pretrained(directory), Tokenizer)


def test_batch_command_on_a_flan_t5_checkpoint(tiny_t5_checkpoint, t5_pipe, photos, tmp_path):
    """``blipserve batch`` on a folder: the managed endpoint's predictions.csv, each row the
    Pipeline's caption of its image."""
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("chelsea", "coffee"):
        photos[name].save(folder / f"{name}.jpg", quality=95)
    flags = ["--model", str(tiny_t5_checkpoint), "--device", "cpu", "--dtype", "float32"]
    done = subprocess.run(
        [sys.executable, "-m", "blipserve", "batch", str(folder), str(tmp_path / "out"),
         *flags, "--max-new-tokens", "6", "--no-progress"],
        capture_output=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = list(csv.reader(io.StringIO((tmp_path / "out" / "predictions.csv").read_text())))
    names = ["chelsea.jpg", "coffee.jpg"]
    expected = t5_pipe.caption([str(folder / n) for n in names], max_new_tokens=6)
    assert rows == [["0", text, name] for text, name in zip(expected, names, strict=True)]
