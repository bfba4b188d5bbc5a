"""The Python API: the public names, and Pipeline behaviour on a tiny random checkpoint."""

from __future__ import annotations

import pytest
import torch

import blipserve
from blipserve.errors import HistoryTruncated
from blipserve.outputs import IncrementalDecoder, truncate_at_stop
from blipserve.processing.prompts import chat_prompt


@pytest.fixture(scope="module")
def images(photos):
    return [photos["chelsea"], photos["coffee"], photos["astronaut"]]


def test_public_api_is_pinned():
    """A rename of a public name is a decision, made here."""
    assert blipserve.__all__ == [
        "BlipserveError",
        "CheckpointError",
        "Generation",
        "GenerationParams",
        "InvalidImage",
        "InvalidRequest",
        "Matcher",
        "ModelNotFound",
        "Pipeline",
        "UnsupportedModel",
        "__version__",
        "load",
        "load_matcher",
    ]
    for name in blipserve.__all__:
        assert getattr(blipserve, name) is not None
    with pytest.raises(AttributeError):
        blipserve.no_such_name  # noqa: B018


def test_preprocess_shape_and_dtype(pipe, images):
    pixels = pipe.preprocess(images)
    assert pixels.shape == (3, 3, 224, 224) and pixels.dtype == torch.float32


def test_generate_returns_n_generations_per_image(pipe, images):
    rows = pipe.generate(
        images,
        ["", "a photo of", "Question: what? Answer:"],
        do_sample=True,
        num_return_sequences=2,
        seed=3,
        max_new_tokens=6,
    )
    assert [len(row) for row in rows] == [2, 2, 2]
    for row in rows:
        for g in row:
            assert 1 <= len(g.token_ids) <= 6
            assert g.finish_reason in ("stop", "length")
            assert g.text == pipe.tokenizer.decode(g.token_ids)
            if g.finish_reason == "length":
                assert len(g.token_ids) == 6


def test_sampling_with_a_seed_is_repeatable(pipe, images):
    first = pipe.generate(images, do_sample=True, seed=7, max_new_tokens=8, temperature=1.5)
    again = pipe.generate(images, do_sample=True, seed=7, max_new_tokens=8, temperature=1.5)
    other = pipe.generate(images, do_sample=True, seed=8, max_new_tokens=8, temperature=1.5)
    ids = lambda rows: [g.token_ids for row in rows for g in row]  # noqa: E731
    assert ids(first) == ids(again)
    assert ids(first) != ids(other)


def test_one_sampling_rule_temperature_alone_samples_and_zero_is_greedy(pipe, images):
    """The rule the CLI, the Python API and the server share (README: Generation defaults)."""
    ids = lambda rows: [g.token_ids for row in rows for g in row]  # noqa: E731
    hot = pipe.generate(images, seed=7, max_new_tokens=8, temperature=5.0)
    assert ids(hot) == ids(
        pipe.generate(images, do_sample=True, seed=7, max_new_tokens=8, temperature=5.0)
    )
    greedy = pipe.generate(images, max_new_tokens=8)
    assert ids(hot) != ids(greedy)
    assert ids(pipe.generate(images, max_new_tokens=8, temperature=0)) == ids(greedy)
    assert pipe.params(top_p=0.9).do_sample and pipe.params(top_k=5).do_sample
    assert pipe.params(temperature=0) == pipe.params()
    with pytest.raises(
        blipserve.InvalidRequest, match="do_sample is false, so temperature, top_k would"
    ):
        pipe.params(do_sample=False, temperature=0.7, top_k=5)
    with pytest.raises(blipserve.InvalidRequest, match="num_beams > 1 is not supported"):
        pipe.params(num_beams=3, temperature=0.7)


def test_caption_prompt_applies_to_every_image(pipe, images):
    assert pipe.caption(images, "a photo of", max_new_tokens=5) == [
        pipe.caption([im], ["a photo of"], max_new_tokens=5)[0] for im in images
    ]


def test_ask_and_chat_use_the_reference_prompts(pipe, images):
    image = images[0]
    assert (
        pipe.ask(image, "what is it?", max_new_tokens=5)
        == pipe.generate([image], ["Question: what is it? Answer:"], max_new_tokens=5)[0][0].text
    )
    messages = [
        {"role": "user", "content": "what is it?"},
        {"role": "assistant", "content": "a cat"},
        {"role": "user", "content": "where?"},
    ]
    assert (
        pipe.chat(image, messages, max_new_tokens=5)
        == pipe.generate(
            [image],
            ["Question: what is it? Answer: a cat Question: where? Answer:"],
            max_new_tokens=5,
        )[0][0].text
    )


def count_encoder_runs(pipe) -> list[int]:
    """A list whose length grows by one each time the vision encoder runs."""
    runs: list[int] = []
    pipe.model.vision_model.register_forward_hook(lambda *_: runs.append(1))
    return runs


def test_chat_keeps_the_newest_turns_that_fit(pipe, images):
    """A history too long to leave room for max_new_tokens: the newest turns that fit, a
    HistoryTruncated warning; a question that alone fills the positions: InvalidRequest."""
    long = "a" + " a" * (pipe.room("") - 20)  # fits alone, not with another question
    history = [
        {"role": "user", "content": long},
        {"role": "assistant", "content": "a cat"},
        {"role": "user", "content": "what colour is it?"},
    ]
    with pytest.warns(
        HistoryTruncated, match=f"{pipe.context_length} positions allow with max_new_tokens=6"
    ):
        reply = pipe.chat(images[0], history, max_new_tokens=6)
    assert (
        reply == pipe.generate([images[0]], [chat_prompt(history[2:])], max_new_tokens=6)[0][0].text
    )
    with pytest.raises(blipserve.InvalidRequest, match="no room is left to generate"):
        pipe.ask(images[0], long + " a a a a a a a a a a a a a a a a a a a a")


def test_an_answer_ends_where_the_positions_run_out(pipe, images):
    prompt = "a" + " a" * (pipe.room("") - 4)  # leaves 3 positions
    (row,) = pipe.generate([images[1]], [prompt], max_new_tokens=50, min_new_tokens=50)
    assert len(row[0].token_ids) == 3 and row[0].finish_reason == "length"
    assert (
        "".join(pipe.stream(images[1], prompt, max_new_tokens=50, min_new_tokens=50)).strip()
        == row[0].text
    )


def test_chat_follow_ups_and_repeated_images_encode_the_image_once(tiny_checkpoint, images):
    pipe = blipserve.load(str(tiny_checkpoint), device="cpu", dtype="float32")
    uncached = blipserve.load(str(tiny_checkpoint), device="cpu", dtype="float32")
    uncached.prefix_cache.size = 0
    runs = count_encoder_runs(pipe)
    image = images[0]
    messages = [{"role": "user", "content": "what is it?"}]
    first = pipe.chat(image, messages, max_new_tokens=5)
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "where?"}]
    second = pipe.chat(image, messages, max_new_tokens=5)
    assert len(runs) == 1  # the follow-up reused the first turn's prefix
    assert second == uncached.chat(image, messages, max_new_tokens=5)
    questions = ["Question: what is it? Answer:", "Question: what color? Answer:", ""]
    answers = pipe.generate([images[1]] * 3, questions, max_new_tokens=5)
    assert len(runs) == 2  # three questions about one new image: one encoder run
    assert answers == uncached.generate([images[1]] * 3, questions, max_new_tokens=5)
    assert (pipe.prefix_cache.hits, pipe.prefix_cache.misses) == (3, 2)


def test_a_chat_follow_up_prefills_only_its_new_tokens(tiny_checkpoint, images):
    """The second turn's prompt extends the first turn's prompt and reply: those positions
    come from the first turn's cache, and the answer is the one a fresh run gives."""
    pipe = blipserve.load(str(tiny_checkpoint), device="cpu", dtype="float32")
    fresh = blipserve.load(str(tiny_checkpoint), device="cpu", dtype="float32")
    fresh.conversation = None
    fed: list[int] = []  # positions each language-model call runs
    pipe.model.language_model.register_forward_hook(
        lambda _m, args, _o: fed.append(args[0].shape[1])
    )
    image = images[0]
    messages = [{"role": "user", "content": "what is it?"}]
    first = pipe.chat(image, messages, max_new_tokens=6, min_new_tokens=6)
    first_prefill = fed[0]
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "and where?"}]
    fed.clear()
    second = pipe.chat(image, messages, max_new_tokens=6, min_new_tokens=6)
    assert pipe.conversation.reused == 1
    # At least the image queries and turn one's prompt came from the cache (its reply too,
    # where the reply's text encodes back to the same ids).
    second_prompt = len(pipe.tokenizer.encode(chat_prompt(messages)))
    first_prompt = len(pipe.tokenizer.encode(chat_prompt(messages[:1])))
    assert fed[0] <= second_prompt - first_prompt < first_prefill
    assert second == fresh.chat(image, messages, max_new_tokens=6, min_new_tokens=6)
    # Another image, or several sequences, start afresh.
    pipe.chat(images[1], messages, max_new_tokens=3)
    pipe.generate([image], [""], num_beams=2, max_new_tokens=3)
    assert pipe.conversation.reused == 1


def test_stream_yields_the_same_text_as_generate(pipe, images):
    for prompt in ("", "a photo of"):
        deltas = list(pipe.stream(images[1], prompt, max_new_tokens=10))
        assert len(deltas) >= 2
        assert "".join(deltas).strip() == pipe.caption([images[1]], prompt, max_new_tokens=10)[0]


def test_stop_string_ends_generation_before_it(pipe, images):
    full = pipe.generate([images[0]], max_new_tokens=12)[0][0]
    # A stop string first seen in the middle of the output: the text of one early token.
    pieces = [pipe.tokenizer.decode([i]) for i in full.token_ids]
    stop = next(
        p
        for i, p in enumerate(pieces[2:8], start=2)
        if p.isascii() and p.isalpha() and p not in pipe.tokenizer.decode(full.token_ids[:i])
    )
    cut = pipe.generate([images[0]], max_new_tokens=12, stop=[stop])[0][0]
    assert cut.finish_reason == "stop"
    assert stop not in cut.text and full.text.startswith(cut.text)
    assert len(cut.token_ids) < len(full.token_ids)
    streamed = "".join(pipe.stream(images[0], max_new_tokens=12, stop=[stop]))
    assert streamed.strip() == cut.text


def test_bad_requests_are_clear_errors(pipe, images):
    with pytest.raises(blipserve.InvalidRequest, match=r"unknown generation parameter.*max_tokens"):
        pipe.caption(images, max_tokens=5)
    with pytest.raises(blipserve.InvalidRequest, match="got 3 images but 2 prompts"):
        pipe.generate(images, ["a", "b"])
    with pytest.raises(blipserve.InvalidRequest, match="num_return_sequences"):
        pipe.generate(images, num_return_sequences=2)
    with pytest.raises(blipserve.InvalidImage, match="row 1: not an image"):
        pipe.caption([images[0], b"hello there, not an image"])


def test_truncate_at_stop():
    assert truncate_at_stop("a cat. a dog", [". "]) == "a cat"
    assert truncate_at_stop("a cat", ["zzz"]) == "a cat"
    assert truncate_at_stop("a cat and dog", ["dog", "and"]) == "a cat"


def test_incremental_decoder_holds_back_partial_stop(pipe):
    tok = pipe.tokenizer
    ids = tok.encode(" a cat sitting on a bench")[1:]
    decoder = IncrementalDecoder(tok, stops=["on a"])
    text = "".join(decoder.push(i) for i in ids) + decoder.flush()
    assert text == "a cat sitting"
