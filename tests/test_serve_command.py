"""``blipserve serve`` as users start it: a real process, settings from the environment,
the bundled demo model by default, a JSON access log, and a clean exit on SIGTERM."""

from __future__ import annotations

import base64
import json
import re
import signal

import httpx
import pytest

from tests.examples import EXAMPLES, example_captions
from tests.live_server import free_port, serve_process, start_serve


@pytest.fixture(scope="module")
def served():
    with serve_process({"BLIPSERVE_API_KEY": "secret"}) as (url, process):
        yield url, process


def test_demo_model_served_with_key_from_the_environment(served):
    url, _ = served
    expected = example_captions()
    image = base64.b64encode((EXAMPLES / "scene-2.png").read_bytes()).decode()
    body = {"input_data": {"columns": ["image"], "index": [0], "data": [[image]]}}
    assert httpx.post(f"{url}/score", json=body).status_code == 401
    answer = httpx.post(
        f"{url}/score", json=body, headers={"Authorization": "Bearer secret"}, timeout=60
    )
    assert answer.status_code == 200, answer.text
    assert answer.json() == [{"text": expected["scene-2.png"]}]
    assert httpx.get(f"{url}/version").json()["model"] == "demo"


def test_sigterm_exits_cleanly_with_a_json_access_log(served):
    url, process = served
    httpx.get(f"{url}/health")
    process.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal it caught (exit -SIGTERM)
    assert process.wait(timeout=60) in (0, -signal.SIGTERM)
    log = process.stderr.read()
    assert "Application shutdown complete" in log and "Traceback" not in log
    assert re.search(r"loaded model demo \((float32|bfloat16), cpu\) in \d+\.\d s", log), log
    assert f"web page: {url}/ui/" in log  # where to point a browser
    records = [
        json.loads(line[line.index("{") :])
        for line in log.splitlines()
        if "blipserve.access" in line
    ]
    statuses = {(r["method"], r["path"], r["status"]) for r in records}
    assert {("POST", "/score", 401), ("POST", "/score", 200), ("GET", "/health", 200)} <= statuses
    assert all(r["request_id"] and r["ms"] >= 0 for r in records)


@pytest.mark.parametrize(
    ("env", "flags", "message"),
    [
        ({"BLIPSERVE_PORT": "eighty"}, (), "--port / BLIPSERVE_PORT: 'eighty' is not a valid int"),
        (
            {},
            ("--allow-private-urls", "--max-waiting", "0"),
            "--max-waiting must be at least 1, got 0",
        ),
    ],
)
def test_bad_settings_end_with_one_clear_line(env, flags, message):
    process = start_serve(env, *flags)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1
    assert message in stderr and "Traceback" not in stderr


def test_a_model_that_does_not_load_ends_the_process_with_the_reason():
    process = start_serve({}, "--model", "no-such-model", "--port", str(free_port()))
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("blipserve: error: model 'no-such-model' did not load: ModelNotFound")
    assert "loading no-such-model failed" in stderr and "Traceback" not in stderr
