"""The HTTP server on loopback: Azure ML and MLflow contracts, errors, auth, limits,
batching and overload, against a tiny random checkpoint and real photos."""

from __future__ import annotations

import base64
import threading
import time

import httpx
import pytest

import blipserve
from blipserve.server.app import create_app
from blipserve.server.settings import ServerSettings
from tests.examples import png_bytes
from tests.live_server import live_server


@pytest.fixture(scope="module")
def server(pipe):
    with live_server(create_app(ServerSettings(model="tiny"), pipe=pipe)) as url:
        yield url


@pytest.fixture(scope="module")
def pngs(photos) -> dict[str, bytes]:
    return {name: png_bytes(image) for name, image in photos.items()}


def mime(data: bytes) -> str:
    """Base64 as Azure's sample clients send it: a line break every 76 characters."""
    return base64.encodebytes(data).decode()


def split(rows: list[list], columns=("image",)) -> dict:
    return {"columns": list(columns), "index": list(range(len(rows))), "data": rows}


def expected(pipe, photos, names, prompts=None, **gen) -> list[str]:
    return [r[0].text for r in pipe.generate([photos[n] for n in names], prompts, **gen)]


def test_health_version_and_openapi(server):
    for path in ("/", "/ping", "/health"):
        response = httpx.get(server + path)
        assert response.status_code == 200
    assert httpx.get(server + "/").text == "Healthy"
    assert httpx.get(server + "/version").json()["model"] == "tiny"
    paths = httpx.get(server + "/openapi.json").json()["paths"]
    assert {"/score", "/invocations", "/metrics"} <= set(paths)


def test_azure_captioning_and_vqa_in_row_order(server, pipe, photos, pngs):
    names = ["chelsea", "coffee", "astronaut"]
    body = {"input_data": split([[mime(pngs[n])] for n in names])}
    response = httpx.post(server + "/score", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json() == [{"text": t} for t in expected(pipe, photos, names)]

    prompts = ["Question: what is it? Answer:", "a photo of"]
    rows = [
        [mime(pngs["china"]), prompts[0]],
        ["data:image/png;base64," + mime(pngs["coffee"]), prompts[1]],
    ]
    body = {"input_data": split(rows, ("image", "text")), "params": {"max_new_tokens": 4}}
    got = httpx.post(server + "/score", json=body, timeout=60).json()
    assert got == [
        {"text": t} for t in expected(pipe, photos, ["china", "coffee"], prompts, max_new_tokens=4)
    ]


def test_azure_params_are_honoured(server, pipe, photos, pngs):  # the managed one ignores them
    for gen in ({"max_new_tokens": 2}, {"max_new_tokens": 12, "min_new_tokens": 12}):
        body = {"input_data": split([[mime(pngs["chelsea"])]]), "params": gen}
        got = httpx.post(server + "/score", json=body, timeout=60).json()[0]["text"]
        assert got == expected(pipe, photos, ["chelsea"], **gen)[0]
    assert expected(pipe, photos, ["chelsea"], max_new_tokens=2) != got
    body["params"] = {"do_sample": True, "seed": 7, "num_return_sequences": 3, "max_new_tokens": 5}
    first = httpx.post(server + "/score", json=body, timeout=60).json()
    again = httpx.post(server + "/score", json=body, timeout=60).json()
    assert first == again and len(first[0]["texts"]) == 3  # seeded: reproducible


def test_mlflow_formats_agree(server, pipe, photos, pngs):
    names = ["coffee", "chelsea"]
    b64 = [base64.b64encode(pngs[n]).decode() for n in names]
    want = {"predictions": [{"text": t} for t in expected(pipe, photos, names)]}
    bodies = [
        {"dataframe_split": split([[b] for b in b64])},
        {"dataframe_records": [{"image": b} for b in b64]},
        {"instances": [{"image": b} for b in b64]},
        {"inputs": {"image": b64}},
        {"inputs": b64},
    ]
    for body in bodies:
        response = httpx.post(server + "/invocations", json=body, timeout=60)
        assert response.status_code == 200, (list(body), response.text)
        assert response.json() == want, list(body)
    csv_body = ",image\n" + "".join(f"{i},{b}\n" for i, b in enumerate(b64))
    response = httpx.post(
        server + "/invocations", content=csv_body, headers={"content-type": "text/csv"}, timeout=60
    )
    assert response.json() == want


BAD = [
    ({"input_data": split([["aGVsbG8="], ["!!notbase64!!"]])}, 400, 0, "not an image"),
    ({"input_data": split([["iVBORw0KGgo="], ["!!notbase64!!"]])}, 400, 0, "row 0"),
    (
        {"input_data": split([["x", "y"]], ("image", "caption"))},
        400,
        None,
        "unknown column 'caption'",
    ),
    ({"input_data": split([["x"]], ("text",))}, 400, None, "missing the 'image' column"),
    ({"input_data": {"columns": ["image"], "data": [["a", "b"]]}}, 400, None, "row 0"),
    ({"input_data": split([[None]])}, 400, 0, "base64 text or an http(s) URL"),
    ({"input_data": split([[1234]])}, 400, 0, "base64 text or an http(s) URL"),
    ({"input_data": {"columns": ["image"], "data": "oops"}}, 400, None, "input_data.data"),
    ({"input_data": split([["x"]]), "params": {"max_new_tokens": -1}}, 400, None, "max_new_tokens"),
    ({"input_data": split([["x"]]), "params": {"beams": 2}}, 400, None, "beams"),
    (
        {"input_data": split([["x"]]), "params": {"do_sample": False, "temperature": 0.7}},
        400,
        None,
        "do_sample is false, so temperature would be ignored",
    ),
    ({"input_data": split([])}, 400, None, "no rows"),
]


@pytest.mark.parametrize(("body", "status", "row", "words"), BAD)
def test_bad_input_gets_a_clear_400(server, body, status, row, words):
    response = httpx.post(server + "/score", json=body, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"] and "Traceback" not in response.text
    if row is not None:
        assert error["row"] == row


def test_a_bad_row_names_itself_and_spares_other_requests(server, pngs):
    good = mime(pngs["chelsea"])
    body = {"input_data": split([[good], [good], ["data:image/png;base64,AAAA"]])}
    response = httpx.post(server + "/score", json=body, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["row"] == 2
    ok = httpx.post(server + "/score", json={"input_data": split([[good]])}, timeout=60)
    assert ok.status_code == 200


def test_server_never_reads_files_named_by_clients(server, tmp_path, pngs):
    secret = tmp_path / "private.png"
    secret.write_bytes(pngs["coffee"])
    for path in (str(secret), "/etc/passwd", "file:///etc/passwd"):
        response = httpx.post(server + "/score", json={"input_data": split([[path]])})
        assert response.status_code == 400, (path, response.text)
        assert response.json()["error"]["row"] == 0
        assert "root:" not in response.text  # no file content echoed either


def test_protocol_errors(server, pngs):
    score = server + "/score"
    assert (
        httpx.post(score, content=b"{}", headers={"content-type": "text/plain"}).status_code == 415
    )
    malformed = httpx.post(
        score, content=b"{not json", headers={"content-type": "application/json"}
    )
    assert malformed.status_code == 400 and "error" in malformed.json()
    assert httpx.get(score).status_code == 405
    assert httpx.get(server + "/nope").status_code == 404
    mlflow = httpx.post(server + "/invocations", json={"instances": [], "inputs": []})
    assert mlflow.status_code == 400 and "exactly one of" in mlflow.json()["error"]["message"]
    xml = httpx.post(server + "/invocations", content=b"<a/>", headers={"content-type": "text/xml"})
    assert xml.status_code == 415


def test_body_limit_and_auth(pipe, pngs):
    settings = ServerSettings(model="tiny", api_key="s3cret", max_body_mb=0.05)
    with live_server(create_app(settings, pipe=pipe)) as url:
        small = {"input_data": split([[mime(png_bytes("red", (32, 32)))]])}
        assert httpx.post(url + "/score", json=small).status_code == 401
        wrong = httpx.post(url + "/score", json=small, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        auth = {"Authorization": "Bearer s3cret"}
        assert httpx.post(url + "/score", json=small, headers=auth).status_code == 200
        big = {"input_data": split([[mime(pngs["chelsea"])]])}  # > 50 kB: refused unread
        too_big = httpx.post(url + "/score", json=big, headers=auth)
        assert too_big.status_code == 413 and "limit" in too_big.json()["error"]["message"]
        assert httpx.get(url + "/health").status_code == 200  # probes need no key


def test_concurrent_requests_are_batched_and_match_sequential(server, pngs):
    names = ["chelsea", "coffee", "astronaut", "china"] * 2
    gen = {"max_new_tokens": 150, "min_new_tokens": 150}  # decoding dominates
    bodies = [
        {"input_data": split([[mime(pngs[n]), p]], ("image", "text")), "params": gen}
        for n, p in zip(names, ["", "a", "Question: what? Answer:", "b"] * 2, strict=True)
    ]
    with httpx.Client(timeout=120) as client:
        started = time.perf_counter()
        sequential = [client.post(server + "/score", json=b).json() for b in bodies]
        one_by_one = time.perf_counter() - started
        results: list = [None] * len(bodies)

        def call(i: int) -> None:
            results[i] = client.post(server + "/score", json=bodies[i]).json()

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(bodies))]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        together = time.perf_counter() - started
    assert results == sequential
    metrics = httpx.get(server + "/metrics").text
    assert together < 0.6 * one_by_one, (together, one_by_one)
    assert "blipserve_image_cache_hits_total" in metrics


def test_repeated_images_skip_the_encoder(server, pngs):
    def counter(name: str) -> float:
        for line in httpx.get(server + "/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(name)

    image = mime(pngs["astronaut"])
    body = {"input_data": split([[image, "Question: who? Answer:"]], ("image", "text"))}
    httpx.post(server + "/score", json=body, timeout=60)
    hits, misses = (
        counter("blipserve_image_cache_hits_total"),
        counter("blipserve_image_cache_misses_total"),
    )
    body["input_data"]["data"][0][1] = "Question: where? Answer:"  # a follow-up question
    httpx.post(server + "/score", json=body, timeout=60)
    assert counter("blipserve_image_cache_hits_total") == hits + 1
    assert counter("blipserve_image_cache_misses_total") == misses
    metrics = httpx.get(server + "/metrics").text
    for name in (
        "blipserve_num_requests_running",
        "blipserve_num_requests_waiting",
        "blipserve_time_to_first_token_seconds_bucket",
        "blipserve_e2e_request_latency_seconds_bucket",
        "blipserve_generation_tokens_total",
        'blipserve_requests_total{route="/score",status="200"}',
    ):
        assert name in metrics, name


def test_overload_answers_429_and_the_server_stays_healthy(pipe, pngs):
    settings = ServerSettings(model="tiny", max_waiting=2, max_batch_rows=1)
    with live_server(create_app(settings, pipe=pipe)) as url:
        body = {
            "input_data": split([[mime(pngs["coffee"])]]),
            "params": {"max_new_tokens": 40, "min_new_tokens": 40},
        }
        statuses: list[int] = []
        retry_after: list[str] = []

        def call() -> None:
            response = httpx.post(url + "/score", json=body, timeout=120)
            statuses.append(response.status_code)
            retry_after.append(response.headers.get("retry-after", ""))

        threads = [threading.Thread(target=call) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert 429 in statuses and 200 in statuses, statuses
        assert set(statuses) <= {200, 429}
        assert all(r == "1" for s, r in zip(statuses, retry_after, strict=True) if s == 429)
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.post(url + "/score", json=body, timeout=120).status_code == 200


def test_timeout_answers_408(pipe, pngs):
    settings = ServerSettings(model="tiny", request_timeout=0.001)
    with live_server(create_app(settings, pipe=pipe)) as url:
        body = {"input_data": split([[mime(pngs["coffee"])]])}
        response = httpx.post(url + "/score", json=body, timeout=60)
        assert response.status_code == 408 and "--request-timeout" in response.text
        assert httpx.get(url + "/health").status_code == 200


def test_shutdown_finishes_in_flight_requests(pipe, pngs):
    body = {
        "input_data": split([[mime(pngs["china"])]]),
        "params": {"max_new_tokens": 200, "min_new_tokens": 200},
    }
    answers: list[httpx.Response] = []
    with live_server(create_app(ServerSettings(model="tiny"), pipe=pipe)) as url:
        caller = threading.Thread(
            target=lambda: answers.append(httpx.post(url + "/score", json=body, timeout=120))
        )
        caller.start()
        deadline = time.monotonic() + 30
        while "blipserve_num_requests_running 1.0" not in httpx.get(url + "/metrics").text:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.005)
    # the server has shut down (the with block waits for it), after answering in full
    caller.join(10)
    assert answers and answers[0].status_code == 200
    assert answers[0].json()[0]["text"]


def test_ready_only_once_the_model_is_loaded(pipe, pngs):
    release = threading.Event()

    def slow_loader(settings: ServerSettings):
        assert release.wait(30)
        return pipe

    def failing_loader(settings: ServerSettings):
        raise blipserve.ModelNotFound("no model called 'missing'")

    body = {"input_data": split([[mime(pngs["coffee"])]]), "params": {"max_new_tokens": 2}}
    with live_server(create_app(ServerSettings(model="slow"), loader=slow_loader)) as url:
        for path in ("/", "/ping", "/health"):
            response = httpx.get(url + path)
            assert response.status_code == 503 and response.text == "loading"
        assert httpx.post(url + "/score", json=body).status_code == 503
        release.set()
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert httpx.post(url + "/score", json=body, timeout=60).status_code == 200
    with live_server(create_app(ServerSettings(model="missing"), loader=failing_loader)) as url:
        deadline = time.monotonic() + 30
        while "failed" not in (health := httpx.get(url + "/health")).text:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert health.status_code == 503 and "no model called 'missing'" in health.text
