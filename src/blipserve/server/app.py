"""``create_app(settings)``: the FastAPI app, its lifespan, middleware and health routes.

The model loads on a worker thread when the app starts; until it is ready the health
routes answer 503 and the model routes 503 too. Shutdown (SIGTERM/SIGINT through
uvicorn) stops accepting connections, lets in-flight requests finish, then stops the
engine thread.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Annotated

import anyio
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import blipserve
from blipserve.api import Pipeline
from blipserve.engine.scheduler import Scheduler
from blipserve.processing.fetch import UrlPolicy
from blipserve.server import errors
from blipserve.server.metrics import Metrics
from blipserve.server.service import ModelService
from blipserve.server.settings import ServerSettings

access_log = logging.getLogger("blipserve.access")
JSON_TYPES = ("application/json",)


class AppState:
    """What the routes reach through ``request.app.state.blipserve``."""

    def __init__(self, settings: ServerSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.service: ModelService | None = None
        self.load_error: str | None = None


def create_app(
    settings: ServerSettings,
    pipe: Pipeline | None = None,
    *,
    loader: Callable[[ServerSettings], Pipeline] | None = None,
) -> FastAPI:
    """The app for ``settings``. ``pipe`` serves an already loaded pipeline (tests,
    embedding); otherwise ``loader`` (``blipserve.load`` by default) runs on a worker
    thread after start-up, while the health routes answer 503 "loading"."""
    state = AppState(settings, Metrics())
    load = loader or _load

    async def bring_up() -> Scheduler:
        try:
            loaded = pipe or await anyio.to_thread.run_sync(load, settings)
        except Exception as error:  # kept for the health routes; the process stays up
            state.load_error = f"{type(error).__name__}: {error}"
            logging.getLogger("blipserve").error("loading %s failed: %s", settings.model, error)
            raise
        scheduler = _scheduler(loaded, settings, state.metrics)
        scheduler.start()
        state.service = ModelService(
            loaded,
            scheduler,
            url_policy=UrlPolicy(
                allow_private=settings.allow_private_urls,
                allowed_hosts=frozenset(settings.allowed_hosts),
            ),
            request_timeout=settings.request_timeout,
            max_rows=settings.max_rows,
        )
        return scheduler

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.blipserve = state
        async with anyio.create_task_group() as group:
            started: list[Scheduler] = []

            async def load_in_background() -> None:
                with contextlib.suppress(Exception):
                    started.append(await bring_up())

            if pipe is not None:  # nothing to wait for: ready before the first request
                started.append(await bring_up())
            else:
                group.start_soon(load_in_background)
            try:
                yield
            finally:
                group.cancel_scope.cancel()
                state.service = None
                for scheduler in started:
                    await anyio.to_thread.run_sync(scheduler.close)

    app = FastAPI(
        title="blipserve",
        version=blipserve.__version__,
        summary="BLIP-2 captioning and visual question answering: Azure ML, MLflow and "
        "OpenAI-compatible routes",
        lifespan=lifespan,
    )
    errors.install(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(AccessLog, metrics=state.metrics)
    _health_routes(app, state)

    from blipserve.server import azure, mlflow, openai  # routers, one per protocol

    for router in (azure.router, mlflow.router, openai.router):
        app.include_router(router)
    return app


def _load(settings: ServerSettings) -> Pipeline:
    return blipserve.load(settings.model, device=settings.device, dtype=settings.dtype)


def _scheduler(pipe: Pipeline, settings: ServerSettings, metrics: Metrics) -> Scheduler:
    d = pipe.defaults
    scheduler = Scheduler(
        pipe.model,
        eos_token_ids=list(d.eos_token_ids),
        pad_token_id=d.pad_token_id,
        image_token_id=d.image_token_id,
        max_batch_rows=settings.max_batch_rows,
        max_waiting=settings.max_waiting,
        prefix_cache_size=settings.prefix_cache_size,
        on_first_token=metrics.time_to_first_token.observe,
    )
    metrics.watch(scheduler)
    return scheduler


# -- dependencies the routers use ------------------------------------------------------------


def service(request: Request) -> ModelService:
    """The loaded model's service, or 503 while it loads."""
    state: AppState = request.app.state.blipserve
    if state.service is None:
        raise HTTPException(503, "the model is still loading; retry shortly", {"Retry-After": "5"})
    return state.service


def authorized(request: Request) -> None:
    """``Authorization: Bearer KEY`` when the server has a key (Azure ML's and OpenAI's way)."""
    key = request.app.state.blipserve.settings.api_key
    if not key:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise HTTPException(
            401,
            "missing or wrong API key: send 'Authorization: Bearer KEY'",
            {"WWW-Authenticate": "Bearer"},
        )


def json_content(request: Request) -> None:
    """415 unless the body is declared JSON (routes that take only JSON)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in JSON_TYPES and not kind.endswith("+json"):
        raise HTTPException(
            415, f"Content-Type must be application/json, got {kind or 'nothing'!r}"
        )


MODEL_ROUTE = [Depends(authorized)]
Service = Annotated[ModelService, Depends(service)]


# -- health, version, metrics ----------------------------------------------------------------


def _health_routes(app: FastAPI, state: AppState) -> None:
    def ready() -> Response:
        if state.load_error is not None:
            return PlainTextResponse(f"model failed to load: {state.load_error}", status_code=503)
        if state.service is None:
            return PlainTextResponse("loading", status_code=503, headers={"Retry-After": "5"})
        return PlainTextResponse("Healthy")

    app.get("/", response_class=PlainTextResponse, summary="Azure ML liveness: 'Healthy'")(ready)
    app.get("/ping", response_class=PlainTextResponse, summary="MLflow health")(ready)
    app.get("/health", response_class=PlainTextResponse, summary="200 once loaded")(ready)

    @app.get("/version", summary="Server and model version")
    def version() -> dict:
        return {"blipserve": blipserve.__version__, "model": state.settings.model}

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")


# -- middleware ------------------------------------------------------------------------------


class BodyLimit:
    """413 for bodies over ``max_bytes``: at once from Content-Length, else while reading."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        mb = self.max_bytes / 2**20
        response = errors.error_response(
            413, f"request body over the {mb:g} MB limit (--max-body-mb)", "too_large"
        )
        await response({"type": "http"}, _no_receive, send)


class _TooLarge(Exception):
    pass


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


class AccessLog:
    """One JSON line per request on the ``blipserve.access`` logger, and request metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500
        request_id = uuid.uuid4().hex[:12]

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            route = _route_label(scope)
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.e2e_latency.labels(route).observe(seconds)
            access_log.info(
                json.dumps(
                    {
                        "request_id": request_id,
                        "method": scope["method"],
                        "path": scope["path"],
                        "status": status,
                        "ms": round(seconds * 1000, 1),
                        "client": (scope.get("client") or ("", 0))[0],
                    }
                )
            )


def _route_label(scope: Scope) -> str:
    """The matched route's path template (bounded label values), or 'unmatched'."""
    route = scope.get("route")
    return getattr(route, "path", "unmatched")


def settings_summary(settings: ServerSettings) -> dict:
    """Settings for the startup log line, the key masked."""
    shown = asdict(settings)
    if shown["api_key"]:
        shown["api_key"] = "***"
    return shown
