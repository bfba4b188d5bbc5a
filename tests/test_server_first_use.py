"""What a new user of the server meets first, on a real server on loopback: the README's
curl request with an ordinary photo, malformed JSON, and ``/docs`` without internet."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import skimage.data
from PIL import Image

import blipserve
from blipserve.server.app import create_app
from blipserve.server.settings import ServerSettings
from tests.live_server import live_server

README = Path(__file__).parents[1] / "README.md"
MAX_ARG_STRLEN = 128 * 1024  # Linux's limit on one command-line argument


@pytest.fixture(scope="module")
def demo():
    return blipserve.load("demo", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def server(demo):
    settings = ServerSettings(model="demo", api_key="secret")  # the README's key
    with live_server(create_app(settings, pipe=demo)) as url:
        yield url


def readme_block(containing: str) -> str:
    """The README's one fenced bash block that contains ``containing``."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.DOTALL)
    found = [block for block in blocks if containing in block]
    assert len(found) == 1, f"expected one README bash block with {containing!r}"
    return found[0]


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_readme_curl_request_with_a_photo_too_big_for_an_argument(server, demo, tmp_path):
    photo = io.BytesIO()
    Image.fromarray(skimage.data.coffee()).save(photo, "JPEG", quality=95)
    (tmp_path / "photo.jpg").write_bytes(photo.getvalue())
    assert len(photo.getvalue()) * 4 / 3 > MAX_ARG_STRLEN  # the old $(base64 ...) form fails

    script = readme_block("curl").replace("localhost:8080", server.removeprefix("http://"))
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # `python`
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        env={**os.environ, "PATH": path},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    [want] = demo.generate([photo.getvalue()], "Question: what is it? Answer:", max_new_tokens=20)
    assert json.loads(done.stdout) == [{"text": want[0].text}]


def test_malformed_json_says_where_it_broke(server):
    body = b'{"input_data": {"columns": ["image"] "data": []}}'
    for route in ("/score", "/invocations", "/v1/chat/completions"):
        response = httpx.post(
            server + route,
            content=body,
            headers={"content-type": "application/json", "authorization": "Bearer secret"},
        )
        assert response.status_code == 400, (route, response.text)
        assert response.json()["error"]["message"] == (
            "request body is not valid JSON: Expecting ',' delimiter at line 1, column 38"
        ), route


def test_swagger_ui_loads_only_from_the_server(server):
    page = httpx.get(server + "/docs")
    assert page.status_code == 200 and "SwaggerUIBundle" in page.text
    assets = re.findall(r'(?:src|href)="([^"]*)"', page.text)
    assert len(assets) == 3, assets  # script, stylesheet, icon
    kinds = {".js": "javascript", ".css": "text/css", ".png": "image/png"}
    for url in assets:
        assert url.startswith("/") and not url.startswith("//"), url
        response = httpx.get(server + url)
        assert response.status_code == 200, url
        assert kinds[Path(url).suffix] in response.headers["content-type"], url
        assert len(response.content) > 500, url
    assert "url: '/openapi.json'" in page.text
    assert httpx.get(server + "/openapi.json").status_code == 200
    assert '"validatorUrl": null' in page.text  # no badge fetched from validator.swagger.io
    assert httpx.get(server + "/redoc").status_code == 404  # ReDoc exists only on a CDN


def readme_python_block(containing: str) -> str:
    """The README's one fenced python block that contains ``containing``."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    found = [block for block in blocks if containing in block]
    assert len(found) == 1, f"expected one README python block with {containing!r}"
    return found[0]


def test_readme_openai_client_example(server, demo, tmp_path):
    """The README's OpenAI-client snippet as written, with a real photo in the data URL
    and the test server's address: it prints the answer pipe.chat gives."""
    photo = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).save(photo, "JPEG", quality=90)
    data_url = "data:image/jpeg;base64," + base64.b64encode(photo.getvalue()).decode()
    code = readme_python_block("OpenAI(")
    assert "http://localhost:8080/v1" in code and "data:image/jpeg;base64,..." in code
    code = code.replace("http://localhost:8080/v1", server + "/v1")
    code = code.replace("data:image/jpeg;base64,...", data_url)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    messages = [{"role": "user", "content": "what is in the picture?"}]
    want = demo.chat(photo.getvalue(), messages, max_new_tokens=30)
    assert done.stdout.strip() == want.strip()
