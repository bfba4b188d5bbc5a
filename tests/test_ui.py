"""The web page's server side, over HTTP on loopback: where it lives (``/ui/``, a browser
sent there from ``/``, probes answered as before), ``--no-ui``, ``--root-path``, its
settings route and its files. The page itself runs in a browser in test_ui_browser.py."""

from __future__ import annotations

import argparse
import re

import httpx
import pytest

import blipserve
from blipserve.engine.params import MAX_BEAMS, MAX_NEW_TOKENS
from blipserve.processing.limits import MAX_IMAGE_BYTES
from blipserve.server import ui
from blipserve.server.app import create_app
from blipserve.server.settings import ServerSettings, add_arguments, settings_from
from tests.live_server import live_server

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
PROBE_ACCEPTS = [None, "*/*", "application/json", "text/plain"]


@pytest.fixture(scope="module")
def demo():
    return blipserve.load("demo", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def server(demo):
    with live_server(create_app(ServerSettings(model="demo"), pipe=demo)) as url:
        yield url


def get(url: str, accept: str | None = None) -> httpx.Response:
    headers = {"Accept": accept} if accept else {}
    client = httpx.Client(headers=headers)
    if accept is None:
        client.headers.pop("Accept")  # a probe that sends no Accept at all
    with client:
        return client.get(url, follow_redirects=False)


@pytest.mark.parametrize("accept", PROBE_ACCEPTS)
def test_probes_and_api_clients_get_the_liveness_answer_as_before(server, accept):
    response = get(server + "/", accept)
    assert response.status_code == 200
    assert response.text == "Healthy"
    assert response.headers["content-type"].startswith("text/plain")


def test_a_browser_asking_for_the_root_is_sent_to_the_page(server):
    response = get(server + "/", BROWSER_ACCEPT)
    assert response.status_code == 307
    assert response.headers["location"] == "/ui/"
    assert response.headers["vary"] == "Accept"
    page = get(server + "/ui/", BROWSER_ACCEPT)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    # what the issue asks of the page's markup: the names a screen reader reads out
    assert 'role="log"' in page.text
    assert 'aria-label="Image"' in page.text and '<label for="message">Message</label>' in page.text
    assert ">Send</button>" in page.text and ">Caption</button>" in page.text


def test_every_file_the_page_loads_is_served_from_the_package(server):
    """No CDN: the HTML's and the modules' references are relative, and each is served."""
    html = get(server + "/ui/").text
    wanted = re.findall(r'(?:src|href)="([^"#]+)"', html)
    for module in ("app.js", "api.js", "images.js", "requests.js"):
        wanted += re.findall(r'from "\./([^"]+)"', get(f"{server}/ui/{module}").text)
    kinds = {".js": "text/javascript", ".css": "text/css"}
    checked = set()
    for ref in wanted:
        if ref.startswith("data:") or ref == "../docs":
            continue
        assert "//" not in ref and not ref.startswith("/"), ref  # relative: proxies keep working
        response = get(f"{server}/ui/{ref}")
        assert response.status_code == 200, ref
        assert response.headers["content-type"].startswith(kinds[ref[ref.rindex(".") :]]), ref
        checked.add(ref)
    assert checked == {"ui.css", "app.js", "api.js", "images.js", "requests.js"}
    for path in ui.UI_FILES.iterdir():
        assert not re.search(r"""(?:src|href|from|fetch\()\s*=?\s*["']https?:""", path.read_text())


def test_the_settings_route_gives_the_model_and_the_limits(server, demo):
    config = httpx.get(server + "/ui/config.json").json()
    assert config["model"] == "demo" and config["ready"] is True
    assert config["api_key_required"] is False and config["load_error"] is None
    assert config["default_max_new_tokens"] == demo.params().max_new_tokens == 40
    assert config["context_length"] == demo.context_length
    assert config["max_image_bytes"] == MAX_IMAGE_BYTES
    assert config["limits"]["max_new_tokens"] == {"min": 1, "max": MAX_NEW_TOKENS}
    assert config["limits"]["num_beams"] == {"min": 1, "max": MAX_BEAMS}
    assert config["limits"]["temperature"] == {"min": 0.0, "max": 2.0}
    assert config["limits"]["seed"]["max"] == 2**53 - 1


def test_the_settings_route_is_open_but_the_model_routes_keep_their_key(demo):
    settings = ServerSettings(model="demo", api_key="s3cret", max_body_mb=1)
    with live_server(create_app(settings, pipe=demo)) as url:
        config = httpx.get(url + "/ui/config.json").json()
        assert config["api_key_required"] is True and "s3cret" not in str(config)
        assert config["max_image_bytes"] == (2**20 - ui.BODY_ROOM) * 3 // 4  # base64 fits
        assert httpx.get(url + "/ui/").status_code == 200  # the page asks for the key itself
        body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(url + "/v1/chat/completions", json=body).status_code == 401


def test_no_ui_leaves_the_root_to_probes_and_serves_no_page(demo):
    with live_server(create_app(ServerSettings(model="demo", no_ui=True), pipe=demo)) as url:
        response = get(url + "/", BROWSER_ACCEPT)
        assert response.status_code == 200 and response.text == "Healthy"
        assert get(url + "/ui/").status_code == 404
        assert get(url + "/ui/config.json").status_code == 404


def test_behind_a_proxy_the_redirect_keeps_the_path_prefix(demo):
    """A proxy serving the app under /blip2 strips the prefix; --root-path tells the app."""
    app = create_app(ServerSettings(model="demo", root_path="/blip2"), pipe=demo)
    with live_server(app, root_path="/blip2") as url:
        response = get(url + "/", BROWSER_ACCEPT)
        assert response.status_code == 307 and response.headers["location"] == "/blip2/ui/"
        assert get(url + "/", "*/*").text == "Healthy"
        assert get(url + "/ui/").status_code == 200  # the proxy forwards /blip2/ui/ as /ui/


def parse(*argv: str, **environ: str) -> ServerSettings:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return settings_from(parser.parse_args(argv), environ)


def test_the_flags_and_their_environment_variables():
    assert parse().no_ui is False and parse().root_path == ""
    assert parse("--no-ui").no_ui is True
    assert parse(BLIPSERVE_NO_UI="true").no_ui is True
    assert parse("--root-path", "/blip2").root_path == "/blip2"
    assert parse(BLIPSERVE_ROOT_PATH="/a/b").root_path == "/a/b"
    for bad in ("blip2", "/blip2/"):
        with pytest.raises(ValueError, match="--root-path must start with '/' and not end"):
            parse("--root-path", bad)


@pytest.mark.parametrize(
    ("host", "port", "address"),
    [
        ("127.0.0.1", 8080, "http://127.0.0.1:8080/ui/"),
        ("0.0.0.0", 80, "http://localhost:80/ui/"),
        ("::1", 8080, "http://[::1]:8080/ui/"),
    ],
)
def test_the_page_address_in_the_start_up_log(host, port, address):
    assert ui.page_address(host, port) == address
