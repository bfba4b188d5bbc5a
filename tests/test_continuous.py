"""Continuous batching gives each request exactly what it gets alone (Pipeline.generate),
whenever it joins and whatever runs beside it: OPT (learned positions, one prefill per
request) and Flan-T5 (the encoder once per request, relative positions in the decoder)."""

from __future__ import annotations

import pytest

import blipserve
from blipserve.engine.continuous import ContinuousBatch, DecodeRequest
from blipserve.testing import checkpoints

LONG_QUESTION = "Question: which city is this, and what is the weather like there? Answer:"


def prefixes_of(pipe, photos) -> dict:
    names = ["chelsea", "coffee", "astronaut", "china"]
    prefix = pipe.image_prefix(pipe.preprocess([photos[n] for n in names]))  # (4, Q, D)
    return dict(zip(names, prefix, strict=True))


@pytest.fixture(scope="module")
def prefixes(pipe, photos):
    return prefixes_of(pipe, photos)


@pytest.fixture(scope="module")
def t5_pipe(tmp_path_factory):
    """A tiny random BLIP-2 Flan-T5 (config variant 2) whose decoder reaches its log-spaced
    relative position buckets (max distance 20) within one answer."""
    root = tmp_path_factory.mktemp("t5-continuous")
    reference = checkpoints.build_t5_reference(root, variant=2, seed=0)
    directory = checkpoints.save_checkpoint(reference, root, "single")
    return blipserve.load(str(directory), device="cpu", dtype="float32")


@pytest.fixture(scope="module", params=["opt", "t5"])
def family(request, photos):
    """(pipe, prefixes) of each language model family."""
    pipe = request.getfixturevalue("pipe" if request.param == "opt" else "t5_pipe")
    return pipe, prefixes_of(pipe, photos)


def new_batch(pipe) -> ContinuousBatch:
    d = pipe.defaults
    return ContinuousBatch(
        pipe.model.language_model,
        eos_token_ids=list(d.eos_token_ids),
        pad_token_id=d.pad_token_id,
        image_token_id=d.image_token_id,
    )


def request(pipe, prefixes, image: str, prompt: str, **gen) -> DecodeRequest:
    return DecodeRequest(prefixes[image], pipe.tokenizer.encode(prompt), pipe.params(**gen))


def run(batch: ContinuousBatch, joining: dict[int, list[DecodeRequest]]) -> list[int]:
    """Step until every request is done, adding ``joining[k]`` before step k;
    -> the number of rows at each step."""
    rows, step = [], 0
    while joining or len(batch):
        batch.add(joining.pop(step, []))
        rows.append(batch.num_rows)
        events = batch.step()
        for event in events:  # events follow the tokens each sample keeps
            assert event.request.new_ids[event.sample][-1] == event.token_id or event.finish_reason
        step += 1
    return rows


def alone(pipe, photos, image: str, prompt: str, **gen) -> list[list[int]]:
    return [g.token_ids for g in pipe.generate([photos[image]], [prompt], **gen)[0]]


CASES = [
    ("chelsea", "", {"max_new_tokens": 9}),
    ("coffee", "Question: what is it? Answer:", {"max_new_tokens": 5}),
    ("astronaut", "a photo of", {"max_new_tokens": 12, "repetition_penalty": 1.5}),
    ("china", "", {"max_new_tokens": 7, "min_new_tokens": 7}),
    ("chelsea", "a", {"max_new_tokens": 6, "do_sample": True, "seed": 3, "top_p": 0.9}),
    ("coffee", "", {"max_new_tokens": 8, "do_sample": True, "seed": 5, "num_return_sequences": 3}),
    ("astronaut", LONG_QUESTION, {"max_new_tokens": 30, "min_new_tokens": 30}),
]


def test_staggered_requests_match_running_alone(family, photos):
    pipe, prefixes = family
    batch = new_batch(pipe)
    requests = [request(pipe, prefixes, image, prompt, **gen) for image, prompt, gen in CASES]
    joining = {0: requests[:2], 1: [requests[6]], 2: requests[2:4], 3: [requests[4]]}
    rows = run(batch, {**joining, 6: [requests[5]]})
    assert max(rows) > 2 and rows[-1] < max(rows)  # requests overlapped, and left early
    for req, (image, prompt, gen) in zip(requests, CASES, strict=True):
        assert req.done
        assert req.new_ids == alone(pipe, photos, image, prompt, **gen), (image, prompt, gen)


def test_requests_leave_when_done_and_the_cache_shrinks(family):
    pipe, prefixes = family
    batch = new_batch(pipe)
    long = request(
        pipe, prefixes, "chelsea", "a much longer prompt than the other one", max_new_tokens=14
    )
    short = request(pipe, prefixes, "coffee", "", max_new_tokens=2)
    batch.add([short])
    batch.step()
    batch.add([long])  # joins a running row; the short row is left-padded... or it is
    slots_joined = batch.length
    while short in batch.requests:
        batch.step()
    assert batch.requests == [long] and batch.num_rows == 1
    assert batch.length < slots_joined + 3  # the departed row's padding is forgotten
    assert batch.key_mask[:, : batch.length].all()  # a lone row carries no padding
    run(batch, {})
    assert len(batch) == 0 and batch.cache is None


def test_cancelled_requests_leave_and_others_are_unaffected(family, photos):
    pipe, prefixes = family
    batch = new_batch(pipe)
    keep = request(pipe, prefixes, "astronaut", "", max_new_tokens=10)
    drop = request(pipe, prefixes, "china", "", max_new_tokens=10)
    batch.add([keep, drop])
    batch.step()
    drop.cancelled = True
    events = batch.step()
    assert {e.request for e in events} == {keep}
    run(batch, {})
    assert len(drop.new_ids[0]) == 1 and not drop.done
    assert keep.new_ids == alone(pipe, photos, "astronaut", "", max_new_tokens=10)


def test_beam_search_and_prompts_without_room_are_refused(pipe, prefixes):
    batch = new_batch(pipe)
    with pytest.raises(blipserve.InvalidRequest, match="greedy and sampling"):
        batch.add([request(pipe, prefixes, "chelsea", "", num_beams=3)])
    room = pipe.room("")
    with pytest.raises(blipserve.InvalidRequest, match="no room is left"):
        batch.add([request(pipe, prefixes, "chelsea", "a" + " a" * room)])
    assert len(batch) == 0


def test_a_request_ends_where_the_positions_run_out(pipe, prefixes, photos):
    """``max_new_tokens`` beyond the room the prompt leaves: "length" at the model's last
    position, the tokens those it makes alone; the request beside it is untouched."""
    long_prompt = "a" + " a" * (pipe.room("") - 6)  # leaves 5 positions
    assert pipe.room(long_prompt) == 5
    gen = {"max_new_tokens": 50, "min_new_tokens": 50}  # no early eos
    batch = new_batch(pipe)
    cut = request(pipe, prefixes, "chelsea", long_prompt, **gen)
    other = request(pipe, prefixes, "coffee", "", max_new_tokens=9)
    run(batch, {0: [cut, other]})
    assert cut.finished == ["length"] and len(cut.new_ids[0]) == 5
    assert cut.new_ids == alone(pipe, photos, "chelsea", long_prompt, **gen)
    assert other.new_ids == alone(pipe, photos, "coffee", "", max_new_tokens=9)


def test_eos_ends_a_sample(family, photos):
    """A sample stops at its eos, as alone; the batch goes on without it."""
    pipe, prefixes = family
    (ends_alone,) = alone(pipe, photos, "china", "", max_new_tokens=10)
    (other_alone,) = alone(pipe, photos, "coffee", "", max_new_tokens=10)
    eos = next(t for t in ends_alone if t not in other_alone)  # a token only "china" makes
    batch = ContinuousBatch(
        pipe.model.language_model,
        eos_token_ids=[eos],
        pad_token_id=pipe.defaults.pad_token_id,
        image_token_id=pipe.defaults.image_token_id,
    )
    ends = request(pipe, prefixes, "china", "", max_new_tokens=10)
    other = request(pipe, prefixes, "coffee", "", max_new_tokens=10)
    run(batch, {0: [ends, other]})
    assert ends.new_ids == [ends_alone[: ends_alone.index(eos) + 1]]
    assert ends.finished == ["stop"] and other.finished == ["length"]
    assert other.new_ids == [other_alone]


def test_t5_rows_keep_their_encoder_outputs_and_forget_padding(t5_pipe, photos):
    """A T5 request's encoder runs once, as it joins; its cross-attention K/V are padded to
    the longest encoder row beside it, and the padding goes when that row leaves."""
    prefixes = prefixes_of(t5_pipe, photos)
    lm = t5_pipe.model.language_model
    encoded, encode = [], lm.encode
    lm.encode = lambda embeds, mask: encoded.append(mask.shape) or encode(embeds, mask)
    try:
        batch = new_batch(t5_pipe)
        short = request(t5_pipe, prefixes, "coffee", "", max_new_tokens=12, min_new_tokens=12)
        long = request(t5_pipe, prefixes, "china", LONG_QUESTION, max_new_tokens=3)
        batch.add([short])
        batch.step()
        batch.add([long])
        q = prefixes["coffee"].shape[0]
        short_width, long_width = q + len(short.prompt_ids), q + len(long.prompt_ids)
        assert encoded == [(1, short_width), (1, long_width)]  # one encoder run per request
        assert batch.rows.encoder_mask.sum(dim=1).tolist() == [short_width, long_width]
        assert batch.length == 2 and batch.key_mask[:, :2].tolist() == [[1, 1], [0, 1]]
        while long in batch.requests:
            batch.step()
        assert batch.rows.encoder_mask.shape == (1, short_width)  # the padding is gone
        assert batch.key_mask[:, : batch.length].all()
        run(batch, {})
    finally:
        del lm.encode
    assert short.new_ids == alone(
        t5_pipe, photos, "coffee", "", max_new_tokens=12, min_new_tokens=12
    )
    assert long.new_ids == alone(t5_pipe, photos, "china", LONG_QUESTION, max_new_tokens=3)
