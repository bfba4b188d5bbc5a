"""Real servers on loopback for the server tests: an app on uvicorn in a background thread
(:func:`live_server`), or ``blipserve serve`` as users start it, in its own process
(:func:`serve_process`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn
from fastapi import FastAPI


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def live_server(app: FastAPI, timeout: float = 60.0, root_path: str = "") -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 (a free port); yield its base URL; shut down gracefully.
    ``root_path``: as ``--root-path`` sets it, for an app behind a proxy's path prefix."""
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        root_path=root_path,
        log_level="warning",
        access_log=False,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


def start_serve(env: dict[str, str], *flags: str) -> subprocess.Popen:
    """``python -m blipserve serve FLAGS`` with ``env`` added to this environment."""
    return subprocess.Popen(
        [sys.executable, "-m", "blipserve", "serve", *flags],
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
    """Until ``url``'s ``/health`` answers 200; fails if the process exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited: {process.stderr.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("the server did not become ready")


@contextmanager
def serve_process(
    env: dict[str, str] | None = None, *flags: str
) -> Iterator[tuple[str, subprocess.Popen]]:
    """``blipserve serve`` on a free loopback port, ready: yield (base URL, process); kill it
    at the end if it still runs."""
    port = free_port()
    process = start_serve({**(env or {}), "BLIPSERVE_PORT": str(port)}, *flags)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process)
        yield url, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
