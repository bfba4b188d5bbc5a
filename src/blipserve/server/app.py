"""``create_app(settings)``: the FastAPI app, its lifespan and health routes.

The app owns start-up and shutdown, ``/``, ``/ping``, ``/health``, ``/version`` and
``/metrics``, and :func:`settings_summary`; it wires in the middleware
(:mod:`~blipserve.server.middleware`) and one router per protocol
(:mod:`~blipserve.server.azure`, :mod:`~blipserve.server.mlflow`,
:mod:`~blipserve.server.openai`), which take what they share from
:mod:`~blipserve.server.deps` and :mod:`~blipserve.server.schemas`; ``/docs`` (Swagger UI
from the package, no CDN) comes from :mod:`~blipserve.server.docs`, and the web page
``/ui/`` (a browser asking ``/`` for HTML is sent there) from :mod:`~blipserve.server.ui`.

The model loads on a worker thread when the app starts; until it is ready the health
routes answer 503 and the model routes 503 too. Shutdown (SIGTERM/SIGINT through
uvicorn) stops accepting connections, lets in-flight requests finish, then stops the
engine thread.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response

from blipserve import __version__
from blipserve.api import Pipeline, load
from blipserve.engine.scheduler import Scheduler
from blipserve.processing.fetch import UrlPolicy
from blipserve.server import azure, docs, errors, mlflow, openai, ui
from blipserve.server.deps import AppState
from blipserve.server.metrics import Metrics
from blipserve.server.middleware import AccessLog, BodyLimit
from blipserve.server.service import ModelService
from blipserve.server.settings import ServerSettings


def create_app(
    settings: ServerSettings,
    pipe: Pipeline | None = None,
    *,
    loader: Callable[[ServerSettings], Pipeline] | None = None,
    on_load_error: Callable[[str], None] | None = None,
) -> FastAPI:
    """The app for ``settings``. ``pipe`` serves an already loaded pipeline (tests,
    embedding); otherwise ``loader`` (``blipserve.load`` by default) runs on a worker
    thread after start-up, while the health routes answer 503 "loading". When loading
    fails, the health routes say why, and ``on_load_error(reason)`` is called (``blipserve
    serve`` stops the server with it)."""
    state = AppState(settings, Metrics())
    load = loader or _load
    log = logging.getLogger("blipserve")

    async def bring_up() -> Scheduler:
        started = time.perf_counter()
        try:
            loaded = pipe or await anyio.to_thread.run_sync(load, settings)
        except Exception as error:
            state.load_error = f"{type(error).__name__}: {error}"
            log.error("loading %s failed: %s", settings.model, state.load_error)
            if on_load_error is not None:
                on_load_error(state.load_error)
            raise
        if pipe is None:
            log.info(
                "loaded model %s (%s, %s) in %.1f s",
                settings.model,
                str(loaded.model.dtype).removeprefix("torch."),
                loaded.device,
                time.perf_counter() - started,
            )
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
        version=__version__,
        summary="BLIP-2 captioning and visual question answering: Azure ML, MLflow and "
        "OpenAI-compatible routes",
        lifespan=lifespan,
        docs_url=None,  # docs.install serves /docs from the package, not a CDN
        redoc_url=None,
    )
    errors.install(app)
    docs.install(app)
    if not settings.no_ui:
        ui.install(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(AccessLog, metrics=state.metrics)
    _health_routes(app, state)
    for router in (azure.router, mlflow.router, openai.router):  # one per protocol
        app.include_router(router)
    return app


def _load(settings: ServerSettings) -> Pipeline:
    return load(
        settings.model, device=settings.device, dtype=settings.dtype, quantize=settings.quantize
    )


def _scheduler(pipe: Pipeline, settings: ServerSettings, metrics: Metrics) -> Scheduler:
    scheduler = Scheduler(
        pipe.model,
        **pipe.defaults.engine_tokens(),
        max_batch_rows=settings.max_batch_rows,
        max_waiting=settings.max_waiting,
        prefix_cache_size=settings.prefix_cache_size,
        on_first_token=metrics.time_to_first_token.observe,
    )
    metrics.watch(scheduler)
    return scheduler


# -- health, version, metrics ----------------------------------------------------------------


def _health_routes(app: FastAPI, state: AppState) -> None:
    def ready() -> Response:
        if state.load_error is not None:
            return PlainTextResponse(f"model failed to load: {state.load_error}", status_code=503)
        if state.service is None:
            return PlainTextResponse("loading", status_code=503, headers={"Retry-After": "5"})
        return PlainTextResponse("Healthy")

    @app.get("/", response_class=PlainTextResponse, summary="Azure ML liveness: 'Healthy'")
    def root(request: Request) -> Response:
        if not state.settings.no_ui and ui.wants_page(request):
            return ui.to_page(request)  # a browser: the web page; probes get the answer below
        return ready()

    app.get("/ping", response_class=PlainTextResponse, summary="MLflow health")(ready)
    app.get("/health", response_class=PlainTextResponse, summary="200 once loaded")(ready)

    @app.get("/version", summary="Server and model version")
    def version() -> dict:
        return {"blipserve": __version__, "model": state.settings.model}

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")


def settings_summary(settings: ServerSettings) -> dict:
    """Settings for the startup log line, the key masked."""
    shown = asdict(settings)
    if shown["api_key"]:
        shown["api_key"] = "***"
    return shown
