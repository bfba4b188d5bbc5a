"""HTTP status codes for blipserve's errors, chosen here and nowhere else.

Every error body is ``{"error": {"message": ..., "type": ..., "row": i | null}}``; no
traceback ever leaves the server (unexpected errors are logged and answered with a
generic 500).
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from blipserve.engine.scheduler import QueueFull, ShuttingDown
from blipserve.errors import BlipserveError, InvalidImage
from blipserve.server.service import RequestTimeout

log = logging.getLogger("blipserve.server")

RETRY_AFTER_SECONDS = 1
HTTP_ERROR_TYPES = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}
INTERNAL = "internal error; the server log has the details"


def error_response(
    status: int, message: str, kind: str, row: int | None = None, headers: dict | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "row": row}}
    return JSONResponse(body, status_code=status, headers=headers)


def describe(exc: Exception) -> tuple[int, dict]:
    """-> (HTTP status, error body) for one of our errors; anything else is a logged 500."""
    if isinstance(exc, InvalidImage):
        status, kind = 400, "invalid_image"
    elif isinstance(exc, RequestTimeout):
        status, kind = 408, "timeout"
    elif isinstance(exc, QueueFull):
        status, kind = 429, "overloaded"
    elif isinstance(exc, ShuttingDown):
        status, kind = 503, "unavailable"
    elif isinstance(exc, BlipserveError):
        status, kind = 400, "invalid_request"
    else:
        log.error("unexpected error", exc_info=exc)
        return 500, {"message": INTERNAL, "type": "internal", "row": None}
    return status, {"message": str(exc), "type": kind, "row": getattr(exc, "row", None)}


def install(app: FastAPI) -> None:
    @app.exception_handler(BlipserveError)
    async def ours(_: Request, exc: BlipserveError) -> JSONResponse:
        status, body = describe(exc)
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 429 else None
        return JSONResponse({"error": body}, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def malformed(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, validation_message(exc), "invalid_request")

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        kind = HTTP_ERROR_TYPES.get(exc.status_code, "error")
        return error_response(exc.status_code, str(exc.detail), kind, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, INTERNAL, "internal")


def invalid_json(error: json.JSONDecodeError) -> str:
    """``request body is not valid JSON: Expecting ',' delimiter at line 1, column 16``"""
    where = f"line {error.lineno}, column {error.colno}"
    return f"request body is not valid JSON: {error.msg} at {where}"


def validation_message(exc: RequestValidationError) -> str:
    """pydantic's first complaint, as one line: ``body.messages.0.role: Input should be ...``;
    a body that is not JSON says where it broke."""
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid" and isinstance(exc.body, str):
        _, pos = first["loc"]
        return invalid_json(json.JSONDecodeError(first["ctx"]["error"], exc.body, pos))
    parts = []
    for error in exc.errors()[:3]:
        where = ".".join(str(p) for p in error.get("loc", ()))
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "the request body is not valid"
