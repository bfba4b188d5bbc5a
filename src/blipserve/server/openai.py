"""OpenAI-compatible routes: ``GET /v1/models`` and ``POST /v1/chat/completions``.

    {"model": "blip2", "max_tokens": 30,
     "messages": [{"role": "user", "content": [
         {"type": "text", "text": "What is in the picture?"},
         {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,..."}}]}]}
    -> {"object": "chat.completion", "choices": [{"message": {"role": "assistant",
        "content": "..."}, "finish_reason": "stop", ...}], "usage": {...}, ...}

How an OpenAI request maps onto BLIP-2:

- **One image.** BLIP-2 sees exactly one image, so the conversation must hold exactly one
  ``image_url`` part, in a user message; none or several is a 400. Its ``url`` is an
  http(s) URL (fetched under the server's URL policy) or a ``data:image/...;base64,`` URL;
  nothing else (a bare path or base64) is accepted. ``detail`` is ignored: the image is
  always resized to the model's input size.
- **The prompt** is :func:`~blipserve.processing.prompts.chat_prompt` of the text parts:
  ``"Question: {u1} Answer: {a1} Question: {u2} Answer:"``. System and developer messages
  are ignored (BLIP-2 follows no instructions). A user message holding only the image
  adds no turn; a conversation with no user text at all is plain captioning (prompt "").
- **model** may be any string: the loaded model answers, and responses name it.
- **Sampling.** Without ``temperature`` or ``top_p`` decoding is the checkpoint's default
  (greedy for BLIP-2), not OpenAI's temperature 1. ``temperature: 0`` is greedy; any
  other temperature or ``top_p`` samples. ``n > 1`` samples (at temperature 1 unless set),
  since greedy decoding has only one answer; ``n > 1`` with ``temperature: 0`` is a 400.
  ``seed`` makes sampling repeatable. ``max_completion_tokens`` wins over ``max_tokens``.
- **Beam search** is an extension, as vLLM's extra parameters are (the ``openai`` client
  sends it with ``extra_body={"num_beams": 3}``): ``num_beams > 1`` searches that many
  beams, without sampling. A streamed beam-search answer arrives in one burst at its end,
  since the best beam is known only then.
- **Context length** (vLLM's rules): the model has ``max_position_embeddings`` positions
  for the image queries, the prompt and the answer. A conversation too long for them (with
  room for the answer) keeps its newest turns, the last user message always; an explicit
  ``max_tokens`` that still does not fit is a 400 ("This model's maximum context length
  is ..."), as is a last message that alone leaves no room. Without ``max_tokens`` the
  answer gets the checkpoint's default or the room left, whichever is less, and ends with
  ``finish_reason: "length"`` when it runs out.
- **Usage.** ``prompt_tokens`` counts what the language model reads before the answer:
  the image's query tokens (32 for BLIP-2) plus the prompt's tokens, BOS included; it is
  counted once, whatever ``n``. ``completion_tokens`` counts the tokens generated over all
  choices, the end-of-text token (BLIP-2's newline) included when it was produced, and a
  stop string's tokens included though its text is cut from the answer.
- **Fields** not listed in :class:`ChatRequest` are refused (as OpenAI does). Tolerated and
  ignored: ``user``, ``store``, ``metadata``, ``service_tier``, ``parallel_tool_calls``,
  ``prompt_cache_key``, ``safety_identifier``, ``reasoning_effort``, ``verbosity``, a
  message's ``name``. Accepted only at the value that changes nothing (else a 400 says
  so): ``presence_penalty``/``frequency_penalty`` 0, ``logprobs`` false,
  ``top_logprobs`` 0, an empty ``logit_bias``, ``response_format`` ``{"type": "text"}``,
  no ``tools``, ``tool_choice`` "none", ``modalities`` ``["text"]``.
- **Streaming** (``stream: true``) needs ``n = 1``. The request is checked, its image
  decoded and its job queued before the first byte, so those errors are ordinary JSON
  error responses. Events: a chunk with ``delta {"role": "assistant", "content": ""}``,
  content chunks, a chunk with an empty delta and ``finish_reason``, with
  ``stream_options.include_usage`` a chunk with empty ``choices`` and ``usage``, then
  ``data: [DONE]``. An error after the first byte is sent as ``data: {"error": {...}}``
  and ends the stream (no ``[DONE]``). A client that disconnects cancels its job.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from blipserve.api import Pipeline
from blipserve.engine.generate import FinishReason
from blipserve.engine.params import (
    MAX_BEAMS,
    MAX_NEW_TOKENS,
    MAX_RETURN_SEQUENCES,
    MAX_STOP_STRINGS,
)
from blipserve.errors import InvalidImage, InvalidRequest
from blipserve.outputs import Generation
from blipserve.processing.prompts import IGNORED_ROLES
from blipserve.server import errors
from blipserve.server.deps import MODEL_ROUTE, Service, json_content
from blipserve.server.service import ModelService, Row, StreamDelta

log = logging.getLogger("blipserve.server")
router = APIRouter(tags=["OpenAI"], dependencies=MODEL_ROUTE)

MAX_MESSAGES = 64
MAX_PARTS = 16  # content parts in one message
MAX_TEXT_CHARS = 32_000  # one text part or string content; the model's context is far shorter
MAX_TEMPERATURE = 2.0  # OpenAI's range
IMAGE_SCHEMES = ("http://", "https://", "data:")
OWNER = "blipserve"


# -- request ---------------------------------------------------------------------------------


class ImageUrl(BaseModel):
    url: str = Field(
        description="an http(s) URL or a data:image/...;base64, URL",
        examples=["https://example.com/cat.jpg"],
    )
    detail: Literal["auto", "low", "high"] | None = Field(
        None, description="ignored: the image is always resized to the model's input size"
    )


class ContentPart(BaseModel):
    """``{"type": "text", "text": ...}`` or ``{"type": "image_url", "image_url": {"url": ...}}``."""

    type: str = Field(description="'text' or 'image_url'", examples=["text"])
    text: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    image_url: ImageUrl | None = None


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: (
        Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
        | Annotated[list[ContentPart], Field(max_length=MAX_PARTS)]
    )
    name: str | None = Field(None, description="ignored")


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        "", description="any name: the loaded model answers", examples=["Salesforce/blip2-opt-2.7b"]
    )
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS, description="deprecated alias")
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(None, ge=0.0, le=MAX_TEMPERATURE, description="0: greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_RETURN_SEQUENCES)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = Field(
        None, description=f"up to {MAX_STOP_STRINGS} strings; the answer ends before the first"
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    num_beams: int | None = Field(
        None, ge=1, le=MAX_BEAMS, description="blipserve's extension: beam search width"
    )
    # Accepted only at their neutral values (checked in _refuse_unsupported).
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    modalities: list[str] | None = None
    # Tolerated and ignored.
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None


# -- response --------------------------------------------------------------------------------


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = OWNER


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- routes ----------------------------------------------------------------------------------


@router.get("/v1/models", response_model=ModelList, summary="The model this server serves")
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": [_card(request)]}


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, summary="One model")
async def retrieve_model(model_id: str, request: Request) -> dict:
    card = _card(request)
    if model_id != card["id"]:
        raise HTTPException(
            404, f"model {model_id!r} is not served here; this server serves {card['id']!r}"
        )
    return card


@router.post(
    "/v1/chat/completions",
    dependencies=[Depends(json_content)],
    response_model=ChatCompletion,
    summary="Chat about one image (stream: true for server-sent events)",
    responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}},
)
async def chat_completions(body: ChatRequest, request: Request, model: Service) -> Any:
    _refuse_unsupported(body)
    if body.stream and body.n > 1:
        raise InvalidRequest("n > 1 cannot be streamed; set n to 1 or stream to false")
    params = model.params(_options(body))
    explicit = body.max_completion_tokens or body.max_tokens
    row, image_at = _row(body.messages, model.pipe, params.max_new_tokens)
    _check_context(model, row.prompt, explicit)
    reply = _Reply(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=request.app.state.blipserve.settings.model,
        prompt_tokens=_prompt_tokens(model, row.prompt),
    )
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return await _start_stream(model.stream(row, params), image_at, reply, include_usage)
    try:
        (generations,) = await model.generate([row], params)
    except InvalidImage as err:
        raise _image_error(err, image_at) from None
    return reply.completion(generations)


def _card(request: Request) -> dict:
    # vLLM's way: created is the time of asking (the model has no meaningful creation date)
    name = request.app.state.blipserve.settings.model
    return {"id": name, "object": "model", "created": int(time.time()), "owned_by": OWNER}


# -- request -> (row, options) ---------------------------------------------------------------


def _refuse_unsupported(body: ChatRequest) -> None:
    """400 for an option set to a value we would otherwise silently not honour."""
    neutral = {
        "presence_penalty": body.presence_penalty in (None, 0),
        "frequency_penalty": body.frequency_penalty in (None, 0),
        "logprobs": not body.logprobs,
        "top_logprobs": not body.top_logprobs,
        "logit_bias": not body.logit_bias,
        "response_format": body.response_format in (None, {"type": "text"}),
        "tools": not body.tools,
        "tool_choice": body.tool_choice in (None, "none"),
        "modalities": body.modalities in (None, ["text"]),
    }
    for name, ok in neutral.items():
        if not ok:
            raise InvalidRequest(
                f"{name} {getattr(body, name)!r} is not supported by this BLIP-2 server; "
                "leave it out"
            )


def _row(messages: list[Message], pipe: Pipeline, max_new_tokens: int) -> tuple[Row, str]:
    """The conversation's one image and its text turns -> a Row (image source, prompt of
    the newest turns that leave ``pipe`` room for ``max_new_tokens``), and where the image
    is in the request (for error messages)."""
    images: list[tuple[str, str]] = []  # (where, url)
    turns: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        if isinstance(message.content, str):
            texts, parts = [message.content], []
        else:
            texts, parts = [], message.content
        for j, part in enumerate(parts):
            where = f"messages[{i}].content[{j}]"
            if part.type == "text" and part.text is not None:
                texts.append(part.text)
            elif part.type == "image_url" and part.image_url is not None:
                if message.role != "user":
                    raise InvalidRequest(
                        f"{where}: images belong in user messages, not {message.role} messages"
                    )
                images.append((where, part.image_url.url))
            elif part.type in ("text", "image_url"):
                raise InvalidRequest(f"{where}: a {part.type!r} part needs a {part.type!r} field")
            else:
                raise InvalidRequest(
                    f"{where}: content parts of type {part.type!r} are not supported; "
                    "use 'text' and one 'image_url'"
                )
        text = " ".join(texts)
        if message.role == "user" and parts and not text.strip():
            # The image-only user message adds no turn; a system message is what chat_prompt
            # skips, and keeps the indices in its errors those of the request.
            turns.append({"role": "system", "content": ""})
        else:
            turns.append({"role": message.role, "content": text})
    if len(images) != 1:
        found = f"{len(images)} ({', '.join(w for w, _ in images)})" if images else "none"
        raise InvalidRequest(
            "BLIP-2 reads exactly one image per conversation: send one image_url part in a "
            f"user message; found {found}"
        )
    where, url = images[0]
    if not url.strip().lower().startswith(IMAGE_SCHEMES):
        raise InvalidRequest(
            f"{where}.image_url.url must be an http(s) URL or a data:image/...;base64, URL"
        )
    if all(t["role"] in IGNORED_ROLES for t in turns):
        return Row(url, ""), where  # captioning
    prompt, dropped = pipe.fit_chat(turns, max_new_tokens)
    if dropped:
        log.debug("chat: %d oldest turns left out to fit the model's positions", dropped)
    return Row(url, prompt), where


def _check_context(model: ModelService, prompt: str, max_tokens: int | None) -> None:
    """400 in OpenAI's and vLLM's words when the prompt, with an explicit ``max_tokens``,
    or alone, does not fit the model's positions."""
    limit, room = model.pipe.context_length, model.pipe.room(prompt)
    used = limit - room
    if max_tokens is not None and max_tokens > room:
        raise InvalidRequest(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{used + max_tokens} tokens ({used} in the messages, {max_tokens} in the "
            "completion). Please reduce the length of the messages or completion."
        )
    if room < 1:
        raise InvalidRequest(
            f"This model's maximum context length is {limit} tokens. However, your messages "
            f"resulted in {used} tokens. Please reduce the length of the messages."
        )


def _options(body: ChatRequest) -> dict[str, Any]:
    """The request's generation options, as ModelService.params takes them."""
    if body.n > 1 and body.temperature == 0:
        raise InvalidRequest(
            f"n = {body.n} needs sampling, but temperature 0 is greedy decoding (one answer); "
            "raise the temperature or set n to 1"
        )
    temperature = body.temperature
    if body.n > 1 and temperature is None and body.top_p is None:
        temperature = 1.0  # OpenAI's default: greedy decoding would give n equal answers
    max_tokens = body.max_completion_tokens
    return {
        "max_new_tokens": body.max_tokens if max_tokens is None else max_tokens,
        "temperature": temperature,
        "top_p": body.top_p,
        "num_return_sequences": body.n,
        "seed": body.seed,
        "stop": body.stop,
        "num_beams": body.num_beams,
    }


def _prompt_tokens(model: ModelService, prompt: str) -> int:
    """The image's query tokens + the prompt's tokens (BOS included)."""
    queries = model.pipe.model.config.num_query_tokens
    return queries + len(model.pipe.tokenizer.encode(prompt))


def _image_error(err: InvalidImage, where: str) -> InvalidImage:
    """The image's error naming its place in the messages, not the service's "row 0"."""
    return InvalidImage(f"{where}.image_url: {err.reason}")


# -- responses -------------------------------------------------------------------------------


class _Reply:
    """What every completion and chunk of one request shares."""

    def __init__(self, *, id: str, created: int, model: str, prompt_tokens: int) -> None:
        self.id = id
        self.created = created
        self.model = model
        self.prompt_tokens = prompt_tokens

    def completion(self, generations: list[Generation]) -> dict:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": g.text},
                "finish_reason": g.finish_reason,
                "logprobs": None,
            }
            for i, g in enumerate(generations)
        ]
        generated = sum(len(g.token_ids) for g in generations)
        return {**self._head("chat.completion"), "choices": choices, "usage": self.usage(generated)}

    def chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("chat.completion.chunk"), "choices": [choice]}

    def usage(self, completion_tokens: int) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


async def _start_stream(
    deltas: AsyncGenerator[StreamDelta, None], image_at: str, reply: _Reply, include_usage: bool
) -> StreamingResponse:
    """Pull the first delta here, so that a bad image, a full queue or a timeout before the
    first token is a plain JSON error; the rest is sent as server-sent events."""
    try:
        first = await anext(deltas)
    except InvalidImage as err:
        raise _image_error(err, image_at) from None
    return StreamingResponse(
        _events(deltas, first, reply, include_usage),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _events(
    deltas: AsyncGenerator[StreamDelta, None],
    delta: StreamDelta,
    reply: _Reply,
    include_usage: bool,
) -> AsyncIterator[str]:
    """Server-sent events; closing this generator (a client gone) closes ``deltas``, whose
    ``finally`` cancels the job."""
    usage = {"usage": None} if include_usage else {}
    async with aclosing(deltas):
        yield _event({**reply.chunk({"role": "assistant", "content": ""}), **usage})
        try:
            while True:
                if delta.text:
                    yield _event({**reply.chunk({"content": delta.text}), **usage})
                if delta.finish_reason is not None:
                    break
                delta = await anext(deltas)
        except Exception as err:  # the status line is sent: the error goes in-band
            yield _event({"error": _error_body(err)})
            return
        yield _event({**reply.chunk({}, delta.finish_reason), **usage})
        if include_usage:
            yield _event({**reply.chunk({}), "choices": [], "usage": reply.usage(delta.tokens)})
        yield "data: [DONE]\n\n"


def _event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _error_body(err: Exception) -> dict:
    """The body server/errors.py would have sent, for an error after the stream began."""
    return errors.describe(err)[1]
