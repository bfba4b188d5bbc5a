"""The README's screenshot of the web page: ``blipserve serve`` with the demo model on
loopback, an example scene captioned and asked about in headless Chromium.

    .venv/bin/python scripts/ui_screenshot.py            # writes docs/images/ui.png

Needs the test extras and a Chromium (``bash scripts/setup.sh --test`` installs both).
The question and its right answer come from the scene's caption in examples/captions.tsv.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from blipserve.testing.webpage import WebPage, chromium, color_question

ROOT = Path(__file__).parents[1]
SCENE = "scene-1.png"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_ready(url: str, server: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"ui_screenshot: blipserve serve exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    sys.exit("ui_screenshot: the server did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "images" / "ui.png")
    args = parser.parse_args()

    captions = dict(
        line.split("\t") for line in (ROOT / "examples" / "captions.tsv").read_text().splitlines()
    )
    question, right = color_question(captions[SCENE])
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "blipserve", "serve", "--port", str(port), "--log-level", "warning"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, server)
        with chromium() as browser:
            page = WebPage(browser, url + "/")
            page.choose_image(ROOT / "examples" / SCENE)
            caption = page.caption()
            answer = page.ask(question)
            if (caption.text, answer.text) != (captions[SCENE], right):
                sys.exit(f"ui_screenshot: wrong answers {caption.text!r}, {answer.text!r}")
            page.page.set_viewport_size({"width": 1100, "height": 600})
            page.screenshot(args.output)  # the whole page, no empty space below it
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
