"""``/ui/``: a web page to try the model, served from files shipped in the package.

The page (``static/ui/``: HTML, CSS and JavaScript, no build step, no CDN) talks to the
server's own routes with relative URLs, so it works under a reverse proxy's path prefix
(``--root-path``) and with the same API key as every other client: answers stream from
``/v1/chat/completions``. ``/ui/config.json`` tells it the model, whether a key is needed
and the server's limits; like ``/version`` it is open, and holds nothing secret.

``GET /`` stays the liveness route: only a client that asks for HTML (a browser) is sent
to the page, and only when the page is on (``--no-ui`` turns it off).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from blipserve.engine.params import MAX_BEAMS, MAX_NEW_TOKENS
from blipserve.processing.limits import MAX_IMAGE_BYTES
from blipserve.server import openai
from blipserve.server.deps import AppState

UI_FILES = Path(__file__).parent / "static" / "ui"
UI_PATH = "/ui"
MAX_SEED = 2**53 - 1  # the largest integer a browser's JSON keeps exactly
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
BODY_ROOM = 64 * 1024  # bytes of a request body kept for the conversation around the image


def install(app: FastAPI) -> None:
    """Add ``/ui/config.json`` and the page's files under ``/ui/``."""
    # Registered before the mount, which would otherwise answer for every path under /ui.
    app.get(f"{UI_PATH}/config.json", include_in_schema=False)(config)
    app.mount(UI_PATH, StaticFiles(directory=UI_FILES, html=True), name="ui")


def config(request: Request) -> dict[str, Any]:
    """What the page needs to know before the first request: the model, whether it has
    loaded, whether a key is needed, and the limits of every setting it offers."""
    state: AppState = request.app.state.blipserve
    settings = state.settings
    answer: dict[str, Any] = {
        "model": settings.model,
        "ready": state.service is not None,
        "load_error": state.load_error,
        "api_key_required": bool(settings.api_key),
        "max_image_bytes": max_image_bytes(settings.max_body_bytes),
        "max_message_chars": openai.MAX_TEXT_CHARS,
        "limits": {
            "max_new_tokens": {"min": 1, "max": MAX_NEW_TOKENS},
            "num_beams": {"min": 1, "max": MAX_BEAMS},
            "temperature": {"min": 0.0, "max": openai.MAX_TEMPERATURE},
            "top_p": {"min": 0.01, "max": 1.0},
            "seed": {"min": 0, "max": MAX_SEED},
        },
    }
    if state.service is not None:
        answer["default_max_new_tokens"] = state.service.params(None).max_new_tokens
        answer["context_length"] = state.service.pipe.context_length
    return answer


def max_image_bytes(max_body_bytes: int) -> int:
    """The largest image file the page can send: the server's image limit, or what fits
    the body limit once base64 has grown it by a third (less room for the rest)."""
    return max(0, min(MAX_IMAGE_BYTES, (max_body_bytes - BODY_ROOM) * 3 // 4))


def wants_page(request: Request) -> bool:
    """A browser navigating here: a GET whose Accept header names HTML. Probes and API
    clients (no Accept, ``*/*``, JSON, plain text) are not."""
    accept = request.headers.get("accept", "").lower()
    return request.method == "GET" and "text/html" in accept


def to_page(request: Request) -> RedirectResponse:
    """A temporary redirect to the page, under the proxy's prefix when there is one."""
    root = request.scope.get("root_path", "").rstrip("/")
    return RedirectResponse(f"{root}{UI_PATH}/", status_code=307, headers={"Vary": "Accept"})


def page_address(host: str, port: int) -> str:
    """The page's URL on this machine, for the start-up log (a wildcard host shown as
    localhost). Behind a proxy with a path prefix, users reach it at ``PREFIX/ui/``."""
    shown = "localhost" if host in WILDCARD_HOSTS else host
    if ":" in shown:
        shown = f"[{shown}]"  # an IPv6 address
    return f"http://{shown}:{port}{UI_PATH}/"
