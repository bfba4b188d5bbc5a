"""Property-based requests generated from the OpenAPI document (schemathesis and
hypothesis): whatever a client sends, the server never answers 5xx and never shows a
traceback."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings

import blipserve
from blipserve.server.app import create_app
from blipserve.server.settings import ServerSettings
from tests.live_server import live_server

EXAMPLES_PER_OPERATION = 40


def test_no_request_makes_the_server_fail(tiny_checkpoint):
    pipe = blipserve.load(str(tiny_checkpoint), device="cpu", dtype="float32")
    with live_server(create_app(ServerSettings(model="tiny", max_rows=4), pipe=pipe)) as url:
        schema = schemathesis.openapi.from_url(url + "/openapi.json")
        checked = []
        for result in schema.get_all_operations():
            operation = result.ok()
            checked.append(f"{operation.method.upper()} {operation.path}")

            @given(case=operation.as_strategy())
            @settings(
                max_examples=EXAMPLES_PER_OPERATION,
                deadline=None,
                derandomize=True,  # the same cases every run
                suppress_health_check=list(HealthCheck),
            )
            def no_server_error(case) -> None:
                response = case.call(base_url=url, timeout=60)
                assert response.status_code < 500, (case.method, case.path, response.text[:300])
                assert "Traceback" not in response.text

            no_server_error()
    assert {"POST /score", "POST /invocations", "POST /v1/chat/completions"} <= set(checked)
