"""HTTP status codes for blipserve's errors, chosen here and nowhere else.

Every error body is ``{"error": {"message": ..., "type": ..., "row": i | null}}``; no
traceback ever leaves the server (unexpected errors are logged and answered with a
generic 500).
"""

from __future__ import annotations

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


def error_response(
    status: int, message: str, kind: str, row: int | None = None, headers: dict | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "row": row}}
    return JSONResponse(body, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(InvalidImage)
    async def invalid_image(_: Request, exc: InvalidImage) -> JSONResponse:
        return error_response(400, str(exc), "invalid_image", exc.row)

    @app.exception_handler(RequestTimeout)
    async def timeout(_: Request, exc: RequestTimeout) -> JSONResponse:
        return error_response(408, str(exc), "timeout")

    @app.exception_handler(QueueFull)
    async def busy(_: Request, exc: QueueFull) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
        return error_response(429, str(exc), "overloaded", headers=headers)

    @app.exception_handler(ShuttingDown)
    async def shutting_down(_: Request, exc: ShuttingDown) -> JSONResponse:
        return error_response(503, str(exc), "unavailable")

    @app.exception_handler(BlipserveError)
    async def invalid_request(_: Request, exc: BlipserveError) -> JSONResponse:
        return error_response(400, str(exc), "invalid_request", getattr(exc, "row", None))

    @app.exception_handler(RequestValidationError)
    async def malformed(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, validation_message(exc), "invalid_request")

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        kind = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}
        return error_response(
            exc.status_code,
            str(exc.detail),
            kind.get(exc.status_code, "error"),
            headers=exc.headers,
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal error; the server log has the details", "internal")


def validation_message(exc: RequestValidationError) -> str:
    """pydantic's first complaint, as one line: ``body.messages.0.role: Input should be ...``"""
    parts = []
    for error in exc.errors()[:3]:
        where = ".".join(str(p) for p in error.get("loc", ()))
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "the request body is not valid"
