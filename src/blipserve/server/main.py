"""``blipserve serve``: settings from flags and the environment, then uvicorn."""

from __future__ import annotations

import argparse
import json
import logging
import socket

from blipserve.errors import BlipserveError, InvalidRequest
from blipserve.server.settings import add_arguments, settings_from

GRACEFUL_SHUTDOWN_SECONDS = 100  # in-flight requests get their full 90 s timeout


def add_serve_parser(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve",
        help="HTTP server: Azure ML /score, MLflow /invocations, OpenAI /v1/chat/completions",
        description="Every flag can also be set as BLIPSERVE_<FLAG> (e.g. BLIPSERVE_API_KEY).",
    )
    add_arguments(serve)
    serve.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    # Imported here, not at the top, so that `blipserve --help` (which builds this parser)
    # does not import uvicorn, FastAPI and torch; there is no import cycle to dodge.
    import uvicorn

    from blipserve.server.app import create_app, settings_summary
    from blipserve.server.ui import page_address

    try:
        settings = settings_from(args)
    except ValueError as err:
        raise InvalidRequest(str(err)) from None
    level = settings.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log = logging.getLogger("blipserve")
    log.info("settings %s", json.dumps(settings_summary(settings)))
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        log.warning(
            "serving on %s without an API key: anyone who can reach it can use it", settings.host
        )
    failure: list[str] = []

    def stop(reason: str) -> None:  # a model that cannot load: no point answering 503
        failure.append(reason)
        server.should_exit = True

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started and not settings.no_ui:  # the port is known now, even for --port 0
                port = self.servers[0].sockets[0].getsockname()[1]
                proxied = settings.root_path and f" (through the proxy: {settings.root_path}/ui/)"
                log.info("web page: %s%s", page_address(settings.host, port), proxied or "")

    config = uvicorn.Config(
        create_app(settings, on_load_error=stop),
        host=settings.host,
        port=settings.port,
        root_path=settings.root_path,
        log_level=settings.log_level,
        access_log=False,  # blipserve.access logs one JSON line per request instead
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )
    server = Server(config)
    server.run()
    if failure:
        raise BlipserveError(f"model {settings.model!r} did not load: {failure[0]}")
    if not server.started:  # e.g. the port is taken: uvicorn has logged why
        raise BlipserveError(f"the server did not start on {settings.host}:{settings.port}")
    return 0
