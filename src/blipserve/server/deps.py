"""What the routers depend on: the app's state and the FastAPI dependencies over it.

:class:`AppState` is what ``request.app.state.blipserve`` holds (``create_app`` in
:mod:`blipserve.server.app` builds it); ``Service`` hands a route the loaded model (503
while it loads), ``MODEL_ROUTE`` checks the API key and ``json_content`` refuses bodies not
declared JSON. Routers import these from here, never from the app.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from blipserve.server.metrics import Metrics
from blipserve.server.service import ModelService
from blipserve.server.settings import ServerSettings

JSON_TYPES = ("application/json",)


class AppState:
    """What the routes reach through ``request.app.state.blipserve``."""

    def __init__(self, settings: ServerSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.service: ModelService | None = None
        self.load_error: str | None = None


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
