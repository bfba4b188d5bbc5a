"""The server never fetches from loopback, private, link-local or metadata addresses.

The requests run in a network namespace with only loopback (``unshare -rn``): even a
broken guard could not send a packet off this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_image_urls_to_internal_addresses_are_refused(tiny_checkpoint):
    run = f"{sys.executable} -m tests.ssrf_in_namespace {tiny_checkpoint}"
    script = f"ip link set lo up 2>/dev/null; exec {run}"
    done = subprocess.run(
        ["unshare", "-rn", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answers = json.loads(done.stdout)
    assert len(answers) == 8
    for answer in answers:
        error = answer["body"]["error"]
        assert answer["status"] == 400 and error["row"] == 0, answer
        if answer["url"].startswith("http"):
            assert "refused" in error["message"], answer
    by_url = {a["url"].split("/")[2]: a["body"]["error"]["message"] for a in answers}
    assert "metadata" in by_url["169.254.169.254"]
    assert "private" in by_url["10.0.0.1"]
