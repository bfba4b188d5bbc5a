"""A reverse proxy for the tests: serves a backend under a path prefix, stripping it, as
nginx's ``location /blip2/ { proxy_pass http://backend/; }`` does. Responses stream
through (server-sent events arrive as the backend sends them)."""

from __future__ import annotations

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

HOP_BY_HOP = {"host", "connection", "content-length", "transfer-encoding", "keep-alive"}
METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"]


def prefix_proxy(backend: str, prefix: str) -> Starlette:
    """An app that forwards ``PREFIX/rest`` to ``BACKEND/rest``; anything else is a 404."""
    client = httpx.AsyncClient(timeout=120)

    async def forward(request: Request) -> Response:
        path = request.url.path
        if not path.startswith(prefix + "/"):
            return PlainTextResponse("not behind this proxy", status_code=404)
        url = backend + path.removeprefix(prefix)
        if request.url.query:
            url += "?" + request.url.query
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        upstream = client.build_request(
            request.method, url, headers=headers, content=await request.body()
        )
        answer = await client.send(upstream, stream=True)
        return StreamingResponse(
            answer.aiter_raw(),
            status_code=answer.status_code,
            headers={k: v for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP},
            background=BackgroundTask(answer.aclose),
        )

    return Starlette(routes=[Route("/{path:path}", forward, methods=METHODS)])
