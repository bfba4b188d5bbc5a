"""A BLIP-2 Flan-T5 checkpoint (tiny, random) behind the server: jobs share the continuous
batch and each gets the Pipeline's tokens (through the scheduler, joining mid-way, beside
a cancelled job and one past its deadline, and over HTTP); streamed answers arrive token
by token while the decoder is still running, and join to the Pipeline's answer."""

from __future__ import annotations

import base64
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import OpenAI

import blipserve
from blipserve.engine.prefix_cache import pixels_key
from blipserve.engine.scheduler import Job, Scheduler, TokenOut
from blipserve.processing.prompts import chat_prompt
from blipserve.server.app import create_app
from blipserve.server.settings import ServerSettings
from tests.examples import png_bytes
from tests.live_server import live_server

QUESTION = "What is in the picture?"
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def t5_pipe(tiny_t5_checkpoint):
    return blipserve.load(str(tiny_t5_checkpoint), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def served(t5_pipe):
    app = create_app(ServerSettings(model="tiny-t5"), pipe=t5_pipe)
    with live_server(app) as base:
        yield base, app


@pytest.fixture(scope="module")
def url(served):
    return served[0]


def request(photo, question: str = QUESTION, max_tokens: int = MAX_TOKENS) -> dict:
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes(photo)).decode()
    content = [
        {"type": "text", "text": question},
        {"type": "image_url", "image_url": {"url": data_url}},
    ]
    messages = [{"role": "user", "content": content}]
    return {"model": "tiny-t5", "messages": messages, "max_tokens": max_tokens}


def pipeline_answer(
    pipe, photo, question: str = QUESTION, max_tokens: int = MAX_TOKENS
) -> blipserve.Generation:
    prompt = chat_prompt([{"role": "user", "content": question}])
    return pipe.generate([photo], [prompt], max_new_tokens=max_tokens)[0][0]


class Collected:
    """A scheduler job's tokens, gathered by its sink; ``then`` runs after each token."""

    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name
        self.tokens: list[int] = []
        self.done = threading.Event()
        self.then = lambda tokens: None

    def __call__(self, event) -> None:  # the engine thread
        assert isinstance(event, TokenOut), event
        self.tokens.append(event.token_id)
        self.log.append(self.name)
        self.then(self.tokens)
        if event.finish_reason is not None:
            self.done.set()


def test_scheduler_batches_t5_jobs_and_each_gets_its_tokens_alone(t5_pipe, photos):
    """Jobs with different prompts, lengths and options decode together; one joins while
    the others run, one is cancelled half-way and one passes its deadline: every other job
    gets the tokens it gets alone (greedy and sampled)."""
    scheduler = Scheduler(t5_pipe.model, **t5_pipe.defaults.engine_tokens())
    tokenizer, log = t5_pipe.tokenizer, []
    cases = {
        "greedy": ("chelsea", "a photo of", dict(max_new_tokens=14, min_new_tokens=14)),
        "sampled": ("coffee", "", dict(max_new_tokens=9, do_sample=True, seed=3, top_p=0.9)),
        "penalty": (
            "astronaut",
            "Question: what is it? Answer:",
            dict(max_new_tokens=6, repetition_penalty=1.5, min_new_tokens=6),
        ),
        "late": (
            "china",
            "Question: which city is this, and what is the weather like? Answer:",
            dict(max_new_tokens=8, min_new_tokens=8),
        ),
        "cancelled": ("coffee", "a", dict(max_new_tokens=12, min_new_tokens=12)),
        "expired": ("chelsea", "", dict(max_new_tokens=12, min_new_tokens=12)),
    }
    sinks, jobs = {}, {}
    for name, (photo, prompt, options) in cases.items():
        sinks[name] = Collected(log, name)
        pixels = t5_pipe.preprocess([photos[photo]])
        jobs[name] = Job(
            pixels_key(pixels[0]),
            pixels,
            tokenizer.encode(prompt),
            t5_pipe.params(**options),
            sinks[name],
        )
    # "late" is submitted from the engine thread after the greedy job's third token;
    # "cancelled" is cancelled after its second, "expired" passes its deadline after its third.
    sinks["greedy"].then = lambda ids: len(ids) == 3 and scheduler.submit([jobs["late"]])
    sinks["cancelled"].then = lambda ids: len(ids) == 2 and jobs["cancelled"].cancel()
    sinks["expired"].then = lambda ids: len(ids) == 3 and setattr(jobs["expired"], "deadline", 0)
    scheduler.start()
    try:
        scheduler.submit([jobs[n] for n in cases if n != "late"])
        for name in ["greedy", "sampled", "penalty", "late"]:
            assert sinks[name].done.wait(120), name
    finally:
        scheduler.close(timeout=30)
    assert len(sinks["cancelled"].tokens) == 2 and len(sinks["expired"].tokens) == 3
    assert scheduler.num_running == 0 and scheduler.stats.peak_running >= 5
    joined = log.index("late")
    assert log[joined:].count("greedy") > 1, "the late job joined while the greedy one ran"
    for name in ["greedy", "sampled", "penalty", "late"]:
        photo, prompt, options = cases[name]
        alone = t5_pipe.generate([photos[photo]], [prompt], **options)[0][0].token_ids
        assert sinks[name].tokens == alone, name


def test_concurrent_chat_completions_get_the_pipelines_answers(
    served, t5_pipe, photos, monkeypatch
):
    """Requests sent together share the decode steps; each answer is the Pipeline's. The
    decoder's first call waits until every request is queued, so all of them meet in the
    batch whatever the threads' timing."""
    url, app = served
    scheduler = app.state.blipserve.service.scheduler
    asks = [
        ("chelsea", QUESTION, MAX_TOKENS),
        ("coffee", "what colour is the cup?", 4),
        ("astronaut", "who is this, and where is she standing?", 7),
        ("china", "which city?", MAX_TOKENS),
    ]
    wants = [pipeline_answer(t5_pipe, photos[p], q, n) for p, q, n in asks]
    assert all(len(want.token_ids) > 1 for want in wants), "the check needs longer answers"
    submit, submitted, all_queued = scheduler.submit, [], threading.Event()

    def counting_submit(jobs):
        submit(jobs)
        submitted.append(1)
        if len(submitted) == len(asks):
            all_queued.set()

    lm = t5_pipe.model.language_model
    decode = lm.decode

    def gated_decode(*args, **kwargs):
        all_queued.wait(timeout=20)
        return decode(*args, **kwargs)

    monkeypatch.setattr(scheduler, "submit", counting_submit)
    monkeypatch.setattr(lm, "decode", gated_decode)
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def ask(case):
        photo, question, max_tokens = case
        reply = client.chat.completions.create(**request(photos[photo], question, max_tokens))
        return reply.choices[0].message.content, reply.choices[0].finish_reason

    scheduler.stats.peak_running = 0  # this server's other tests ran one request at a time
    with ThreadPoolExecutor(len(asks)) as pool:
        answers = list(pool.map(ask, asks))
    for want, answer, (_, question, _) in zip(wants, answers, asks, strict=True):
        assert answer == (want.text, want.finish_reason), question
    assert scheduler.stats.peak_running == len(asks), "the requests did not share the batch"


def test_streamed_deltas_join_to_the_pipelines_answer(url, t5_pipe, photos):
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    want = pipeline_answer(t5_pipe, photos["chelsea"])
    chunks = list(client.chat.completions.create(**request(photos["chelsea"]), stream=True))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(deltas) > 1, deltas
    assert "".join(deltas) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason


def test_tokens_stream_while_the_decoder_runs(url, t5_pipe, photos, monkeypatch):
    """The decoder's fourth step waits until the client has read a delta: it can only
    continue if the first tokens left the server before the job ended."""
    want = pipeline_answer(t5_pipe, photos["coffee"])
    assert len(want.token_ids) >= 5, "the check needs an answer of five tokens or more"
    lm = t5_pipe.model.language_model
    decode, calls, client_read, released = lm.decode, [], threading.Event(), []

    def gated_decode(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            released.append(client_read.wait(timeout=20))
        return decode(*args, **kwargs)

    monkeypatch.setattr(lm, "decode", gated_decode)
    text = ""
    body = {**request(photos["coffee"]), "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as reply:
        for line in reply.iter_lines():
            if not line.startswith("data: {"):
                continue
            delta = json.loads(line[len("data: ") :])["choices"][0]["delta"].get("content")
            if delta:
                text += delta
                client_read.set()
    assert released == [True], "no delta reached the client before the decoder's fourth step"
    assert text == want.text
