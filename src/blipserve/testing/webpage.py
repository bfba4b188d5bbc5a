"""The web page (``/ui/``) in a real browser, for the browser tests and
``scripts/ui_screenshot.py``: the system's Chromium driven by Playwright, and what a person
does on the page (choose an image, press Caption, ask, give the API key).

Needs the test extras (``playwright``) and a Chromium: the Debian package ``chromium``,
which ``scripts/setup.sh --test`` installs. Playwright's own browser download is never
used; ``BLIPSERVE_CHROMIUM`` names another executable.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from playwright.sync_api import Browser, Page, sync_playwright

CHROMIUM_VARIABLE = "BLIPSERVE_CHROMIUM"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
VIEWPORT = {"width": 1100, "height": 760}
TIMEOUT_MS = 90_000  # a first answer includes loading the image encoder's weights into cache

# Records, in order, each change to the newest answer's text and statistics line.
RECORD_UPDATES = """() => {
  window.blipserveUpdates = [];
  const log = document.querySelector("[role=log]");
  new MutationObserver((records) => {
    for (const record of records) {
      const part = record.target.classList && record.target.classList[0];
      if (part !== "answer" && part !== "stats") continue;
      for (const node of record.addedNodes) window.blipserveUpdates.push([part, node.textContent]);
    }
  }).observe(log, { childList: true, subtree: true });
}"""


class NoChromium(RuntimeError):
    """No Chromium to run the browser tests with."""


def chromium_executable() -> str:
    """``$BLIPSERVE_CHROMIUM``, else the first Chromium on ``PATH``."""
    explicit = os.environ.get(CHROMIUM_VARIABLE)
    if explicit:
        return explicit
    for name in CHROMIUM_NAMES:
        if found := shutil.which(name):
            return found
    raise NoChromium(
        f"no Chromium to drive: none of {', '.join(CHROMIUM_NAMES)} is on PATH and "
        f"{CHROMIUM_VARIABLE} is not set. Install Debian's package (apt-get install chromium), "
        "or run 'bash scripts/setup.sh --test', which does."
    )


@contextmanager
def chromium() -> Iterator[Browser]:
    """Headless Chromium (the system's), closed at the end."""
    executable = chromium_executable()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@dataclass(frozen=True)
class Answer:
    text: str  # the answer as the page shows it (or the error message)
    stats: str  # "first token 120 ms · 35.2 tokens/s · 12 tokens · finish: stop"
    finish_reason: str  # "" when the answer failed
    error: bool
    updates: list[tuple[str, str]]  # ("answer" | "stats", text), each change as it came


class WebPage:
    """The page at ``url`` in a new tab of ``browser``, once the model is ready."""

    def __init__(self, browser: Browser, url: str) -> None:
        self.page: Page = browser.new_page(viewport=VIEWPORT)
        self.page.set_default_timeout(TIMEOUT_MS)
        self.errors: list[str] = []  # the page's uncaught script errors
        self._sent = 0  # answers asked for
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.goto(url)
        self.page.get_by_role("status").filter(has_text="Model:").wait_for()

    def choose_image(self, path: Path) -> None:
        self.page.get_by_label("Image", exact=True).set_input_files(path)

    def image_error(self) -> str:
        alert = self.page.locator("#image-error")
        alert.wait_for()
        return alert.inner_text()

    def caption(self, wait: bool = True) -> Answer | None:
        return self._send(lambda: self.page.get_by_role("button", name="Caption").click(), wait)

    def ask(self, question: str, wait: bool = True) -> Answer | None:
        box = self.page.get_by_label("Message")
        box.fill(question)
        return self._send(lambda: box.press("Enter"), wait)

    def give_key(self, key: str) -> None:
        self.page.get_by_label("API key").fill(key)
        self.page.get_by_role("button", name="Use key").click()

    def wait_for_answer(self) -> Answer:
        """The newest answer, once it has finished (or failed)."""
        bubble = self.page.locator(".turn.assistant").last
        self.page.locator(".turn.assistant:not(.pending)").nth(self._sent - 1).wait_for()
        stats = bubble.locator(".stats").inner_text()
        return Answer(
            text=bubble.locator(".answer").inner_text(),
            stats=stats,
            finish_reason=bubble.get_attribute("data-finish") or "",
            error="error" in (bubble.get_attribute("class") or ""),
            updates=[tuple(u) for u in self.page.evaluate("window.blipserveUpdates")],
        )

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=path, full_page=True)

    def _send(self, action, wait: bool) -> Answer | None:
        self._sent = self.page.locator(".turn.assistant").count() + 1
        self.page.evaluate(RECORD_UPDATES)
        action()
        return self.wait_for_answer() if wait else None


def color_question(caption: str) -> tuple[str, str]:
    """A question about a generated scene whose answer its caption gives: "what color is
    the star?" -> "blue" for "a small green square, ... and a big blue star in a row".
    Asks about a shape the caption names once, so "the <shape>" is unambiguous."""
    objects = re.findall(r"\b(?:small|big) (\w+) (\w+)", caption)
    shapes = [shape for _, shape in objects]
    for color, shape in objects:
        if shapes.count(shape) == 1:
            return f"what color is the {shape}?", color
    raise ValueError(f"no shape named once in the caption {caption!r}")
