"""A BLIP-2 Flan-T5 checkpoint (tiny, random) behind the server: streamed answers arrive
token by token while the decoder is still running, and join to the Pipeline's answer."""

from __future__ import annotations

import base64
import json
import threading

import httpx
import pytest
from openai import OpenAI

import blipserve
from blipserve.processing.prompts import chat_prompt
from blipserve.server.app import create_app
from blipserve.server.settings import ServerSettings
from blipserve.testing import checkpoints
from tests.examples import png_bytes
from tests.live_server import live_server

QUESTION = "What is in the picture?"
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def t5_pipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5-server")
    reference = checkpoints.build_t5_reference(root, variant=0, seed=0)
    directory = checkpoints.save_checkpoint(reference, root, "single")
    return blipserve.load(str(directory), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def url(t5_pipe):
    app = create_app(ServerSettings(model="tiny-t5"), pipe=t5_pipe)
    with live_server(app) as base:
        yield base


def request(photo) -> dict:
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes(photo)).decode()
    content = [
        {"type": "text", "text": QUESTION},
        {"type": "image_url", "image_url": {"url": data_url}},
    ]
    messages = [{"role": "user", "content": content}]
    return {"model": "tiny-t5", "messages": messages, "max_tokens": MAX_TOKENS}


def pipeline_answer(pipe, photo) -> blipserve.Generation:
    prompt = chat_prompt([{"role": "user", "content": QUESTION}])
    return pipe.generate([photo], [prompt], max_new_tokens=MAX_TOKENS)[0][0]


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
