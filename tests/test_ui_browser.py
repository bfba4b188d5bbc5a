"""The web page in a real browser: headless Chromium (the system's, driven by Playwright)
against ``blipserve serve`` with the bundled demo model, on loopback.

The expected answers come from ``examples/`` at run time: the caption from
``examples/captions.tsv``, the question and its answer from that caption. Without a
Chromium these tests fail, saying how to install one; they are never skipped.
Screenshots go to pytest's temporary directory.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys

import httpx
import pytest

from blipserve.processing.limits import MAX_IMAGE_BYTES
from blipserve.testing.webpage import NoChromium, WebPage, chromium, chromium_executable
from blipserve.testing.webpage import color_question as question_for
from tests.examples import EXAMPLES, example_captions
from tests.live_server import live_server, serve_process
from tests.proxy import prefix_proxy

SCENE = "scene-1.png"
# Hands the page a file as a paste on the document or a drop on the picker: (data URL,
# file name, "paste" | "drop").
HAND_OVER = """async ([url, name, how]) => {
  const blob = await (await fetch(url)).blob();
  const data = new DataTransfer();
  data.items.add(new File([blob], name, { type: blob.type }));
  if (how === "paste") {
    document.dispatchEvent(new ClipboardEvent("paste", { clipboardData: data }));
  } else {
    const init = { dataTransfer: data, bubbles: true, cancelable: true };
    document.getElementById("drop").dispatchEvent(new DragEvent("drop", init));
  }
}"""
KEY = "page-secret"


@pytest.fixture(scope="module")
def browser():
    try:
        chromium_executable()
    except NoChromium as missing:
        pytest.fail(str(missing))
    with chromium() as launched:
        yield launched


@pytest.fixture(scope="module")
def server():
    with serve_process() as (url, _):
        yield url


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    return tmp_path_factory.mktemp("ui-screenshots")


@pytest.fixture
def page(browser, server):
    opened = WebPage(browser, server + "/")  # what a person types: the server's address
    yield opened
    assert opened.errors == []  # no uncaught script error
    opened.page.close()


def test_caption_then_a_question_stream_in(page, server, shots):
    assert page.page.url.endswith("/ui/")  # a browser at / is sent to the page
    caption = example_captions()[SCENE]
    page.choose_image(EXAMPLES / SCENE)

    answer = page.caption()
    assert answer.text == caption and not answer.error
    assert answer.finish_reason == "stop"
    assert "first token" in answer.stats and "tokens/s" in answer.stats
    assert "finish: stop" in answer.stats
    partial = [text for part, text in answer.updates if part == "answer"]
    assert len(partial) > 1, partial  # token by token, not at once
    assert all(caption.startswith(text) for text in partial) and partial[-1] == caption

    question, right = question_for(caption)
    hits = cache_hits(server)
    answer = page.ask(question)
    assert answer.text == right and answer.finish_reason == "stop"
    # the answer's text arrives first, its end (finish reason) in a later event
    assert answer.updates[0] == ("answer", right), answer.updates
    assert answer.updates[-1][0] == "stats" and "finish: stop" in answer.updates[-1][1]
    assert cache_hits(server) == hits + 1  # the follow-up reused the image's prefix
    log = page.page.get_by_role("log").inner_text()
    assert log.index(caption) < log.index(question) < log.rindex(right)
    page.screenshot(shots / "caption-and-question.png")


def cache_hits(server: str) -> float:
    metrics = httpx.get(server + "/metrics").text
    return float(re.search(r"^blipserve_image_cache_hits_total (\S+)$", metrics, re.M)[1])


def test_pasted_and_dropped_images(page):
    """An image pasted anywhere on the page, or dropped on the picker, is the new image."""
    captions = example_captions()
    for scene, event in (("scene-2.png", "paste"), ("scene-3.png", "drop")):
        data = base64.b64encode((EXAMPLES / scene).read_bytes()).decode()
        page.page.evaluate(HAND_OVER, [f"data:image/png;base64,{data}", scene, event])
        page.page.get_by_text(f"New image: {scene}").wait_for()
        assert page.page.get_by_alt_text(f"The image: {scene}").is_visible()
        assert page.caption().text == captions[scene]


def test_settings_are_sent_and_held_to_the_limits(page):
    caption = example_captions()[SCENE]
    page.choose_image(EXAMPLES / SCENE)
    page.page.get_by_text("Settings").click()
    page.page.get_by_label("Max new tokens").fill("3")
    answer = page.caption()
    assert caption.startswith(answer.text) and len(answer.text) < len(caption)
    assert answer.finish_reason == "length" and "3 tokens" in answer.stats

    alert = page.page.locator("#settings-error")
    page.page.get_by_label("Beams").fill("99")
    page.page.get_by_role("button", name="Caption").click()
    assert alert.inner_text() == "Beams must be between 1 and 16."
    page.page.get_by_label("Beams").fill("2")
    page.page.get_by_label("Sampling").check()
    page.page.get_by_role("button", name="Caption").click()
    assert alert.inner_text().startswith("Beam search does not sample")
    assert page.page.locator(".turn.assistant").count() == 1  # neither was sent


def test_show_as_code_runs_as_copied(page, tmp_path, shots):
    """The curl command and the openai code the page shows give the page's caption."""
    caption = example_captions()[SCENE]
    page.choose_image(EXAMPLES / SCENE)
    page.page.get_by_text("Show as code").click()
    curl = page.page.locator("#code-curl").inner_text()
    python = page.page.locator("#code-python").inner_text()
    page.screenshot(shots / "show-as-code.png")
    shutil.copy(EXAMPLES / SCENE, tmp_path / SCENE)

    done = subprocess.run(
        [sys.executable, "-c", python], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == caption
    assert shutil.which("curl"), "curl is needed to run the page's curl command"
    done = subprocess.run(
        ["bash", "-c", curl], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [{"text": caption}]


def test_what_is_not_an_image_is_an_inline_error(page, server, tmp_path, shots):
    notes = tmp_path / "notes.txt"
    notes.write_text("a shopping list, not a picture\n")
    page.choose_image(notes)
    assert page.image_error() == (
        "notes.txt is not an image (text/plain). Choose a PNG, JPEG, GIF, WebP or BMP file."
    )
    page.screenshot(shots / "not-an-image.png")

    too_big = {"name": "huge.png", "mimeType": "image/png", "buffer": b"\0" * (MAX_IMAGE_BYTES + 1)}
    page.page.get_by_label("Image", exact=True).set_input_files(too_big)
    assert page.image_error() == (
        "huge.png is larger than the 20 MB this server takes. Choose a smaller image."
    )

    # the server fetches image URLs from public addresses only
    page.page.get_by_label("Image URL").fill(server + "/ui/nothing.png")
    page.page.get_by_role("button", name="Use URL").click()
    answer = page.caption()
    assert answer.error and answer.text.startswith("The server could not read the image:")
    assert "private" in answer.text or "loopback" in answer.text, answer.text

    # named and typed as an image, but not one: the browser cannot tell, the server can
    fake = tmp_path / "fake.png"
    fake.write_text("still not a picture")
    page.choose_image(fake)
    answer = page.caption()
    assert answer.error
    assert answer.text.startswith("The server could not read the image: not an image"), answer.text


def test_a_busy_server_is_waited_for(page):
    """A 429 says the server is busy, waits its Retry-After and tries again."""
    refused = []

    def busy_once(route):
        if refused:
            return route.continue_()
        refused.append(route.request.url)
        body = {"error": {"message": "the queue is full", "type": "overloaded", "row": None}}
        route.fulfill(status=429, headers={"Retry-After": "1"}, json=body)

    page.page.route("**/v1/chat/completions", busy_once)
    page.choose_image(EXAMPLES / SCENE)
    answer = page.caption()
    assert refused and answer.text == example_captions()[SCENE]
    assert ("stats", "The server is busy; retrying in 1 s…") in answer.updates


def test_with_an_api_key_the_page_asks_for_it_and_keeps_it_for_the_tab(browser, shots):
    with serve_process({"BLIPSERVE_API_KEY": KEY}) as (url, _):
        page = WebPage(browser, url + "/ui/")
        key_box = page.page.get_by_label("API key")
        key_box.wait_for()  # asked for at once: the settings route says a key is needed
        page.choose_image(EXAMPLES / SCENE)
        page.caption(wait=False)  # sent without a key: 401, so it waits for one
        page.page.get_by_text("Waiting for the API key…").wait_for()
        page.give_key("wrong")
        page.page.get_by_text("The server refused that key").wait_for()
        page.screenshot(shots / "api-key.png")
        page.give_key(KEY)
        answer = page.wait_for_answer()
        assert answer.text == example_captions()[SCENE] and not answer.error
        assert page.page.evaluate("sessionStorage.getItem('blipserve-api-key')") == KEY
        assert page.page.evaluate("localStorage.length") == 0  # nothing outlives the tab
        assert page.errors == []


def test_behind_a_reverse_proxy_under_a_path_prefix(browser):
    """``--root-path /blip2`` behind a proxy that serves the server at ``/blip2/``: the
    redirect, the page's files, its settings, the streamed answer and the code it shows all
    go through the prefix."""
    with (
        serve_process({}, "--root-path", "/blip2") as (backend, _),
        live_server(prefix_proxy(backend, "/blip2")) as proxy,
    ):
        page = WebPage(browser, proxy + "/blip2/")
        assert page.page.url == proxy + "/blip2/ui/"
        page.choose_image(EXAMPLES / SCENE)
        answer = page.caption()
        assert answer.text == example_captions()[SCENE] and not answer.error
        assert f"curl -s {proxy}/blip2/score" in page.page.locator("#code-curl").text_content()
        assert page.errors == []
