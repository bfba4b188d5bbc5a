"""The README's examples run as written, on the bundled demo model.

Every command of every ``bash`` block and every ``python`` block is either run here or
skipped with its reason in :data:`SKIPS`; an example that is neither fails
:func:`test_every_example_is_run_or_skipped_with_a_reason`, so a new one is a decision.

Substitutions, and only these: the image names (``photo.jpg``, ``cat.jpg``, ``dog.jpg``,
``a.jpg``, ``b.jpg``) are files in the working directory holding scenes from ``examples/``;
``data.csv`` is a table of two of them; ``.venv/bin`` is first on ``PATH`` (instead of
``source .venv/bin/activate``); and the Python API block's ``blipserve.load(...)`` of a Hub
checkpoint on a GPU loads the demo model on the CPU instead.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
VENV_BIN = Path(sys.executable).parent
IMAGES = {
    "photo.jpg": "scene-1.png",
    "cat.jpg": "scene-2.png",
    "dog.jpg": "scene-3.png",
    "a.jpg": "scene-4.png",
    "b.jpg": "scene-5.png",
}
CHAT_INPUT = "what is in the picture?\nwhat colour is the star?\nhow many shapes are there?\n\n"

# (what the example contains, why it is not run here); the first match decides.
SKIPS = [
    ("Salesforce/", "needs a Hub checkpoint (no network here) and, with --device cuda, a GPU"),
    ("scripts/test.sh", "runs the whole test suite, this test included"),
    ("scripts/setup.sh", "creates .venv and installs from the package index"),
    ("source .venv/bin/activate", "the test puts .venv/bin first on PATH instead"),
    ("blipserve serve", "a server runs until stopped; tests/test_serve_command.py starts one"),
    ("curl ", "needs a server: tests/test_server_first_use.py runs this block against one"),
    ("OpenAI(", "needs a server: tests/test_server_first_use.py runs it against one"),
    ("ray start", "needs a Ray cluster"),
    ("--engine ray", "needs a Ray cluster"),
    ("runs/mine", "uses the output of the training example, which needs a Hub checkpoint"),
]


def examples(language: str) -> list[str]:
    """The README's ``language`` blocks; bash blocks split into commands (continued lines
    joined, heredocs kept whole, ``a && b`` as two commands, comment lines dropped)."""
    blocks = re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), re.M | re.S)
    if language != "bash":
        return blocks
    commands: list[str] = []
    for block in blocks:
        lines = iter(block.splitlines())
        for line in lines:
            while line.endswith("\\"):
                line = line[:-1] + next(lines)
            if heredoc := re.search(r"<<'?(\w+)'?", line):
                body = [line]
                while (more := next(lines)) != heredoc.group(1):
                    body.append(more)
                commands.append("\n".join([*body, heredoc.group(1)]))
            elif line.strip() and not line.lstrip().startswith("#"):
                commands += [part.strip() for part in line.split(" && ")]
    return commands


def on_demo(code: str) -> str:
    """A Python example with its ``blipserve.load(...)`` loading the demo on the CPU."""
    return re.sub(r"blipserve\.load\([^)]*\)", 'blipserve.load("demo", device="cpu")', code)


def skip_reason(example: str) -> str | None:
    return next((why for what, why in SKIPS if what in example), None)


def runnable(language: str) -> list[str]:
    found = examples(language)
    found = [on_demo(e) for e in found] if language == "python" else found
    return [e for e in found if skip_reason(e) is None]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A directory with the images the examples name, a table of two, and ``examples/``."""
    directory = tmp_path_factory.mktemp("readme")
    for name, scene in IMAGES.items():
        shutil.copy(ROOT / "examples" / scene, directory / name)
    (directory / "data.csv").write_text("image,text\nphoto.jpg,\ncat.jpg,a photo of\n")
    (directory / "examples").symlink_to(ROOT / "examples")
    (directory / ".venv").symlink_to(VENV_BIN.parent)
    return directory


def test_every_example_is_run_or_skipped_with_a_reason():
    found = examples("bash") + examples("python")
    assert len(runnable("bash")) >= 8 and len(runnable("python")) == 1, found
    known = ("blipserve", "python", "cat ", ".venv/bin/")
    for example in runnable("bash"):
        assert example.startswith(known), f"neither run nor skipped: {example!r}"


@pytest.mark.parametrize("command", runnable("bash"))
def test_shell_example(command, workdir):
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    stdin = CHAT_INPUT if command.startswith("blipserve chat") else ""
    done = subprocess.run(
        ["bash", "-c", command],
        cwd=workdir,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, (command, done.stderr)
    assert "Traceback" not in done.stderr and "error" not in done.stderr, done.stderr
    if stdin:  # one reply per question; a note, if any, once
        assert len(done.stdout.splitlines()) == 3, done.stdout
        assert len(done.stderr.splitlines()) <= 1, done.stderr


def test_python_api_example(workdir, capsys):
    (code,) = runnable("python")
    assert 'blipserve.load("demo", device="cpu")' in code
    with contextlib.chdir(workdir):
        exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()  # the streamed caption
