"""Run inside ``unshare -rn`` (only loopback exists): POST image URLs that must be refused
to a live server and print each answer as JSON. Used by tests/test_server_ssrf.py."""

from __future__ import annotations

import json
import sys

import httpx

import blipserve
from blipserve.server.app import create_app
from blipserve.server.settings import ServerSettings
from tests.live_server import live_server

URLS = [
    "http://127.0.0.1:{port}/image.png",
    "http://localhost:{port}/image.png",
    "http://10.0.0.1/image.png",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::1]:{port}/image.png",
    "http://[::ffff:127.0.0.1]:{port}/image.png",
    "file:///etc/passwd",
    "gopher://127.0.0.1:70/",
]


def main(checkpoint: str) -> None:
    pipe = blipserve.load(checkpoint, device="cpu", dtype="float32")
    with live_server(create_app(ServerSettings(model="tiny"), pipe=pipe)) as url:
        port = url.rsplit(":", 1)[1]
        answers = []
        for template in URLS:
            target = template.format(port=port)
            body = {"input_data": {"columns": ["image"], "data": [[target]]}}
            response = httpx.post(url + "/score", json=body, timeout=30)
            answers.append({"url": target, "status": response.status_code, "body": response.json()})
    json.dump(answers, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])
