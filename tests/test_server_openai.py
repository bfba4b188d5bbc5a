"""The OpenAI-compatible routes on a real server on loopback, driven by the official
``openai`` client (and raw httpx for the SSE framing), against a tiny random checkpoint."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import httpx
import openai
import pytest
from openai import OpenAI

from blipserve.errors import HistoryTruncated, InvalidRequest
from blipserve.processing.prompts import chat_prompt
from blipserve.server import openai as routes
from blipserve.server.app import create_app
from blipserve.server.settings import ServerSettings
from tests.examples import png_bytes
from tests.live_server import live_server

QUESTION = "What is in the picture?"


@pytest.fixture(scope="module")
def served(pipe):
    """(base URL, app) of a server without an API key."""
    app = create_app(ServerSettings(model="tiny"), pipe=pipe)
    with live_server(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(served) -> OpenAI:
    return OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def urls(photos) -> dict[str, str]:
    """The photos as data URLs (PNG: the server decodes the same pixels)."""
    return {
        name: "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()
        for name, image in photos.items()
    }


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def ask(url: str, text: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}, image_part(url)]}]


def test_greedy_completion_is_the_pipelines_chat_with_its_usage(client, pipe, photos, urls):
    messages = [{"role": "system", "content": "You are a helpful assistant."}, *ask(urls["coffee"])]
    reply = client.chat.completions.create(model="anything", messages=messages, max_tokens=8)

    history = [{"role": "user", "content": QUESTION}]
    (want,) = pipe.generate([photos["coffee"]], [chat_prompt(history)], max_new_tokens=8)[0]
    assert want.text == pipe.chat(photos["coffee"], history, max_new_tokens=8)
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"
    assert reply.model == "tiny" and len(reply.choices) == 1
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want.text
    assert choice.finish_reason == want.finish_reason and choice.logprobs is None
    queries = pipe.model.config.num_query_tokens
    prompt_tokens = queries + len(pipe.tokenizer.encode(chat_prompt(history)))
    assert reply.usage.prompt_tokens == prompt_tokens
    assert reply.usage.completion_tokens == len(want.token_ids)
    assert reply.usage.total_tokens == prompt_tokens + len(want.token_ids)

    newer = client.chat.completions.create(
        model="tiny", messages=messages, max_completion_tokens=3, max_tokens=8, temperature=0
    )
    assert newer.usage.completion_tokens <= 3  # max_completion_tokens wins
    assert newer.choices[0].message.content == pipe.chat(
        photos["coffee"], history, max_new_tokens=3
    )


def test_history_and_image_only_messages(client, pipe, photos, urls):
    history = [
        {"role": "user", "content": "what is it?"},
        {"role": "assistant", "content": "a cat"},
        {"role": "user", "content": "what colour is it?"},
    ]
    messages = [
        {
            "role": "user",
            "content": [image_part(urls["chelsea"]), {"type": "text", "text": "what"}],
        },
        {"role": "user", "content": "is it?"},  # merged with the turn before
        {"role": "assistant", "content": [{"type": "text", "text": "a cat"}]},
        {"role": "user", "content": "what colour is it?"},
    ]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6)
    assert reply.choices[0].message.content == pipe.chat(
        photos["chelsea"], history, max_new_tokens=6
    )

    only_image = [{"role": "user", "content": [image_part(urls["chelsea"])]}]
    caption = client.chat.completions.create(model="tiny", messages=only_image, max_tokens=6)
    assert (
        caption.choices[0].message.content == pipe.caption(photos["chelsea"], max_new_tokens=6)[0]
    )
    assert caption.usage.prompt_tokens == pipe.model.config.num_query_tokens + 1  # BOS only


def test_long_conversations_keep_their_newest_turns(client, pipe, photos, urls):
    """A history too long for the model's positions (with room for max_tokens) keeps its
    newest turns: the answer is the pipeline's chat, which leaves out the same turns."""
    long = "a" + " a" * (pipe.room("") - 20)  # fits alone, not with another question
    history = [
        {"role": "user", "content": long},
        {"role": "assistant", "content": "a cat"},
        {"role": "user", "content": "what colour is it?"},
    ]
    first = {
        "role": "user",
        "content": [image_part(urls["chelsea"]), {"type": "text", "text": long}],
    }
    reply = client.chat.completions.create(
        model="tiny", messages=[first, *history[1:]], max_tokens=6
    )
    with pytest.warns(HistoryTruncated, match="oldest turns are left out"):
        want = pipe.chat(photos["chelsea"], history, max_new_tokens=6)
    assert reply.choices[0].message.content == want
    kept = pipe.context_length - pipe.room(chat_prompt(history[2:]))
    assert reply.usage.prompt_tokens == kept


def test_context_length_is_checked_as_vllm_does(client, pipe, urls):
    """An explicit max_tokens beyond the room left is a 400; without one the answer gets
    the room left ("length"); a message that alone fills the positions is a 400."""
    limit = pipe.context_length
    question = "a" + " a" * (pipe.room(chat_prompt([{"role": "user", "content": "a"}])) - 3)
    messages = ask(urls["coffee"], question)  # leaves 3 positions
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=4)
    assert caught.value.body["message"] == (
        f"This model's maximum context length is {limit} tokens. However, you requested "
        f"{limit + 1} tokens ({limit - 3} in the messages, 4 in the completion). Please "
        "reduce the length of the messages or completion."
    )
    reply = client.chat.completions.create(model="tiny", messages=messages)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3
    assert reply.usage.total_tokens == limit
    with pytest.raises(openai.BadRequestError, match="your messages resulted in") as caught:
        client.chat.completions.create(
            model="tiny", messages=ask(urls["coffee"], question + " a a a")
        )
    assert f"resulted in {limit} tokens" in caught.value.body["message"]


def test_n_samples_are_reproducible_with_a_seed(client, urls):
    def sample():
        return client.chat.completions.create(
            model="tiny",
            messages=ask(urls["astronaut"]),
            n=2,
            seed=3,
            temperature=1.5,
            max_tokens=6,
        )

    first, again = sample(), sample()
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1]
    assert texts == [c.message.content for c in again.choices]
    assert first.usage.completion_tokens == again.usage.completion_tokens <= 12


def test_stop_strings_cut_the_answer(client, urls):
    full = client.chat.completions.create(model="tiny", messages=ask(urls["china"]), max_tokens=12)
    text = full.choices[0].message.content
    assert len(text) > 4, "the tiny model should write something to cut"
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = client.chat.completions.create(
        model="tiny", messages=ask(urls["china"]), max_tokens=12, stop=[stop, "never said"]
    )
    assert cut.choices[0].message.content == text[: text.find(stop)].strip()
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens <= full.usage.completion_tokens


def test_streaming_gives_the_same_text_and_usage(client, urls):
    for name, max_tokens in (("coffee", 10), ("china", 12)):
        kwargs = {"model": "tiny", "messages": ask(urls[name]), "max_tokens": max_tokens}
        whole = client.chat.completions.create(**kwargs)
        chunks = list(
            client.chat.completions.create(
                **kwargs, stream=True, stream_options={"include_usage": True}
            )
        )
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[0].choices[0].delta.content == ""
        assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        *_, finish, usage = chunks
        assert finish.choices[0].finish_reason == whole.choices[0].finish_reason
        assert finish.choices[0].delta.content is None
        assert usage.choices == [] and usage.usage == whole.usage


def test_beam_search_is_an_extension_as_vllms_extra_parameters(client, pipe, photos, urls):
    """``num_beams`` (sent with ``extra_body``) gives the pipeline's beam-search answer,
    streamed or not; with sampling it is a 400."""
    history = [{"role": "user", "content": QUESTION}]
    want = pipe.chat(photos["coffee"], history, max_new_tokens=8, num_beams=3)
    assert want != pipe.chat(photos["coffee"], history, max_new_tokens=8), "pick another photo"
    kwargs = {"model": "tiny", "messages": ask(urls["coffee"]), "max_tokens": 8}
    reply = client.chat.completions.create(**kwargs, extra_body={"num_beams": 3})
    assert reply.choices[0].message.content == want
    chunks = client.chat.completions.create(**kwargs, stream=True, extra_body={"num_beams": 3})
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**kwargs, temperature=0.7, extra_body={"num_beams": 3})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**kwargs, extra_body={"num_beams": 17})


def test_sse_framing(served, urls):
    body = {"model": "tiny", "messages": ask(urls["coffee"]), "max_tokens": 5, "stream": True}
    with httpx.stream("POST", served[0] + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    assert raw.endswith("\n\ndata: [DONE]\n\n")
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"][0]["delta"] == {} and "usage" not in chunks[-1]


def test_models(client, served):
    (card,) = client.models.list().data
    assert (card.id, card.object, card.owned_by) == ("tiny", "model", "blipserve")
    assert isinstance(card.created, int)
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError, match="serves 'tiny'"):
        client.models.retrieve("gpt-4o")
    assert "/v1/chat/completions" in httpx.get(served[0] + "/openapi.json").json()["paths"]


def bad_requests(urls: dict[str, str]) -> list[tuple[dict, str]]:
    one = ask(urls["coffee"])
    only = [{"role": "user", "content": [image_part(urls["coffee"])]}]
    two = [{"role": "user", "content": [image_part(urls["coffee"]), image_part(urls["china"])]}]
    audio = [{"role": "user", "content": [{"type": "input_audio"}, image_part(urls["coffee"])]}]
    return [
        ({"messages": [{"role": "user", "content": "hi"}]}, "exactly one image"),
        ({"messages": two}, "found 2 (messages[0].content[0], messages[0].content[1])"),
        ({"messages": ask("data:image/png;base64,!!!!")}, "messages[0].content[1].image_url:"),
        ({"messages": ask("/etc/hosts")}, "must be an http(s) URL or a data:image"),
        ({"messages": audio}, "type 'input_audio' are not supported"),
        ({"messages": one, "n": 2, "stream": True}, "n > 1 cannot be streamed"),
        ({"messages": one, "n": 2, "temperature": 0, "stream": False}, "needs sampling"),
        ({"messages": one, "temperature": -1}, "temperature"),
        ({"messages": one, "max_tokens": 0}, "max_tokens"),
        ({"messages": one, "presence_penalty": 0.5}, "presence_penalty 0.5 is not supported"),
        ({"messages": one, "extra_body": {"top_k": 3}}, "top_k: Extra inputs"),
        ({"messages": [*one, {"role": "assistant", "content": "x"}]}, "last message"),
        ({"messages": [*only, {"role": "assistant", "content": "x"}]}, "start with a user"),
    ]


def test_errors_are_clear_400s(client, urls):
    for request, words in bad_requests(urls):
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as caught:
                client.chat.completions.create(
                    **{"model": "tiny", "max_tokens": 4, "stream": stream, **request}
                )
            assert caught.value.status_code == 400
            assert words in caught.value.body["message"], (request, caught.value.body)


def test_tolerated_fields_are_ignored(client, pipe, photos, urls):
    reply = client.chat.completions.create(
        model="tiny",
        messages=ask(urls["coffee"]),
        max_tokens=4,
        user="u1",
        presence_penalty=0,
        frequency_penalty=0,
        logprobs=False,
        store=False,
        response_format={"type": "text"},
        metadata={"k": "v"},
        parallel_tool_calls=True,
    )
    history = [{"role": "user", "content": QUESTION}]
    assert reply.choices[0].message.content == pipe.chat(
        photos["coffee"], history, max_new_tokens=4
    )


def test_api_key(pipe, urls):
    with live_server(create_app(ServerSettings(model="tiny", api_key="s3cret"), pipe=pipe)) as url:
        wrong = OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model="tiny", messages=ask(urls["coffee"]), max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        right = OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert right.models.list().data[0].id == "tiny"


def test_a_client_that_disconnects_cancels_its_job(served, urls):
    url, app = served
    scheduler = app.state.blipserve.service.scheduler
    long = {"model": "tiny", "messages": ask(urls["astronaut"]), "max_tokens": 150}
    before = scheduler.stats.generated_tokens
    whole = httpx.post(url + "/v1/chat/completions", json=long, timeout=60).json()
    assert whole["usage"]["completion_tokens"] == 150, "needs an answer without an early eos"
    assert scheduler.stats.generated_tokens - before == 150

    before = scheduler.stats.generated_tokens
    with httpx.stream("POST", url + "/v1/chat/completions", json={**long, "stream": True}) as r:
        next(r.iter_lines())  # the role chunk: the job is running
    deadline = time.monotonic() + 30
    while scheduler.num_running or scheduler.num_waiting:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert scheduler.stats.generated_tokens - before < 150


def test_an_error_after_the_first_byte_is_sent_in_band():
    from blipserve.server.service import StreamDelta  # comes with the service change

    async def deltas():
        yield StreamDelta("two", 2)
        raise InvalidRequest("the engine gave up")

    async def collect():
        first = StreamDelta("one", 1)
        reply = routes._Reply(id="chatcmpl-x", created=0, model="tiny", prompt_tokens=3)
        return [e async for e in routes._events(deltas(), first, reply, include_usage=False)]

    events = asyncio.run(collect())
    contents = [json.loads(e[6:])["choices"][0]["delta"].get("content") for e in events[:-1]]
    assert contents == ["", "one", "two"]
    error = json.loads(events[-1].removeprefix("data: "))["error"]
    assert error == {"message": "the engine gave up", "type": "invalid_request", "row": None}
