"""The ``blipserve`` command end to end, in a child process, on a tiny random checkpoint."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import warnings
from dataclasses import fields
from pathlib import Path

import pytest

import blipserve
from blipserve.errors import HistoryTruncated


def run_cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blipserve", *args],
        input=stdin,
        capture_output=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory, photos):
    directory = tmp_path_factory.mktemp("photos")
    paths = []
    for name in ("chelsea", "coffee"):
        path = directory / f"{name}.jpg"
        photos[name].save(path, quality=95)
        paths.append(str(path))
    return paths


def model_flags(checkpoint) -> list[str]:
    return ["--model", str(checkpoint), "--device", "cpu", "--dtype", "float32"]


def test_caption_prints_one_line_per_image(tiny_checkpoint, photo_files, pipe):
    done = run_cli("caption", *photo_files, *model_flags(tiny_checkpoint), "--max-new-tokens", "6")
    assert done.returncode == 0, done.stderr
    expected = pipe.caption(photo_files, max_new_tokens=6)
    assert done.stdout.decode().splitlines() == expected


def test_caption_json_lines_with_prompt_and_beams(tiny_checkpoint, photo_files, pipe):
    done = run_cli(
        "caption",
        *photo_files,
        *model_flags(tiny_checkpoint),
        "--json",
        "--prompt",
        "a photo of",
        "--num-beams",
        "3",
        "--max-new-tokens",
        "5",
    )
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.decode().splitlines()]
    expected = pipe.generate(photo_files, "a photo of", num_beams=3, max_new_tokens=5)
    assert [r["image"] for r in records] == photo_files
    assert [r["text"] for r in records] == [row[0].text for row in expected]
    assert [r["finish_reason"] for r in records] == [row[0].finish_reason for row in expected]


def test_image_from_stdin(tiny_checkpoint, photo_files, pipe):
    with open(photo_files[0], "rb") as f:
        data = f.read()
    done = run_cli(
        "caption", "-", *model_flags(tiny_checkpoint), "--max-new-tokens", "6", stdin=data
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().splitlines() == pipe.caption([data], max_new_tokens=6)


def test_ask(tiny_checkpoint, photo_files, pipe):
    done = run_cli(
        "ask", photo_files[0], "what is it?", *model_flags(tiny_checkpoint), "--max-new-tokens", "4"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().strip() == pipe.ask(photo_files[0], "what is it?", max_new_tokens=4)


def test_chat_keeps_history(tiny_checkpoint, photo_files, pipe):
    done = run_cli(
        "chat",
        photo_files[0],
        *model_flags(tiny_checkpoint),
        "--max-new-tokens",
        "4",
        stdin=b"what is this?\nand the colour?\n",
    )
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.decode().splitlines()
    history = [{"role": "user", "content": "what is this?"}]
    assert first == pipe.chat(photo_files[0], history, max_new_tokens=4)
    history += [
        {"role": "assistant", "content": first},
        {"role": "user", "content": "and the colour?"},
    ]
    assert second == pipe.chat(photo_files[0], history, max_new_tokens=4)


def test_chat_leaves_out_the_oldest_turns_and_says_so_once(tiny_checkpoint, photo_files, pipe):
    """Once the history no longer fits the model's positions with room for the answer,
    the newest turns that fit are kept (as ``Pipeline.chat`` does): one note on stderr for
    the session, and every question answered."""
    questions = ["what is this?", "and the colour?", "where is it?"]
    room = pipe.room(f"Question: {questions[0]} Answer:")  # the first turn just fits
    flags = [*model_flags(tiny_checkpoint), "--max-new-tokens", str(room)]
    stdin = "".join(f"{q}\n" for q in questions).encode()
    done = run_cli("chat", photo_files[0], *flags, stdin=stdin)
    assert done.returncode == 0, done.stderr
    (note,) = done.stderr.decode().splitlines()
    assert note.startswith("blipserve: note: the chat history is longer than")
    assert note.endswith(
        f"positions allow with max_new_tokens={room}: the oldest turns are left out"
    )
    history: list[dict[str, str]] = []
    replies = done.stdout.decode().split("\n")[:-1]  # random text may hold other line breaks
    for question, reply in zip(questions, replies, strict=True):
        history.append({"role": "user", "content": question})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", HistoryTruncated)
            assert reply == pipe.chat(photo_files[0], history, max_new_tokens=room)
        history.append({"role": "assistant", "content": reply})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["caption", "NOTES"], "notes.txt: not an image (got 17 bytes of text"),
        (["caption", "/no/such/file.jpg"], "no such file"),
        (["caption", "IMAGE", "--num-beams", "0"], "num_beams must be an integer in [1,"),
        (["caption", "IMAGE", "--top-p", "1.5"], "top_p must be a number in [0.0, 1.0]"),
        (["ask", "IMAGE", "   "], "question"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(tiny_checkpoint, photo_files, tmp_path, args, message):
    notes = tmp_path / "notes.txt"
    notes.write_text("this is not a jpg")
    args = [str(notes) if a == "NOTES" else photo_files[0] if a == "IMAGE" else a for a in args]
    done = run_cli(*args, *model_flags(tiny_checkpoint))
    assert done.returncode == 1
    err = done.stderr.decode()
    assert err.startswith("blipserve: error: ") and err.count("\n") == 1, err
    assert message in err
    assert "Traceback" not in err


def test_chat_refuses_image_on_stdin(tiny_checkpoint):
    done = run_cli("chat", "-", *model_flags(tiny_checkpoint), stdin=b"what is it?\n")
    assert done.returncode == 1
    assert "chat reads questions from standard input" in done.stderr.decode()


def test_unknown_model_is_a_clear_error(photo_files):
    done = run_cli("caption", photo_files[0], "--model", "./nope", "--device", "cpu")
    assert done.returncode == 1
    assert "neither 'demo', an existing directory, nor a Hub id" in done.stderr.decode()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["caption", "x.jpg", "--num-beams", "abc"], "argument --num-beams: invalid int value"),
        (
            ["caption", "x.jpg", "--num-beam", "3"],  # no abbreviations
            "unrecognized arguments: --num-beam 3 (see blipserve caption --help)",
        ),
        (["ask", "x.jpg", "what?", "--bogus"], "unrecognized arguments: --bogus"),
        (["captoin", "x.jpg"], "invalid choice: 'captoin'"),
        (["caption"], "the following arguments are required: images"),
        (["train", "--synthetic", "2"], "the following arguments are required: --output"),
    ],
)
def test_usage_errors_are_one_line_and_exit_1(args, message):
    done = run_cli(*args)
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert err.startswith("blipserve: error: ") and err.count("\n") == 1, err
    assert message in err and "usage:" not in err


def test_temperature_alone_samples_and_zero_is_greedy(tiny_checkpoint, photo_files, pipe):
    common = [*photo_files, *model_flags(tiny_checkpoint), "--max-new-tokens", "6", "--seed", "3"]
    hot = run_cli("caption", *common, "--temperature", "5")
    cold = run_cli("caption", *common, "--temperature", "0")
    assert hot.returncode == 0 and cold.returncode == 0, (hot.stderr, cold.stderr)
    sampled = pipe.caption(photo_files, max_new_tokens=6, seed=3, do_sample=True, temperature=5.0)
    greedy = pipe.caption(photo_files, max_new_tokens=6)
    assert sampled != greedy  # so the two checks below can tell them apart
    assert hot.stdout.decode().splitlines() == sampled
    assert cold.stdout.decode().splitlines() == greedy


def test_ask_json(tiny_checkpoint, photo_files, pipe):
    done = run_cli(
        "ask", photo_files[0], "what is it?", *model_flags(tiny_checkpoint), "--json",
        "--max-new-tokens", "4",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (expected,) = pipe.generate(
        [photo_files[0]], ["Question: what is it? Answer:"], max_new_tokens=4
    )
    assert json.loads(done.stdout) == {
        "image": photo_files[0],
        "question": "what is it?",
        "text": expected[0].text,
        "finish_reason": expected[0].finish_reason,
    }


def test_caption_progress_bar_only_on_a_terminal(tiny_checkpoint, photo_files, pipe):
    """A bar on stderr when it is a terminal (here a pseudo-terminal); the captions on
    stdout are the same either way, and a pipe gets no bar."""
    args = ["caption", *photo_files, *model_flags(tiny_checkpoint), "--max-new-tokens", "4"]
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 cols
    try:
        done = subprocess.run(
            [sys.executable, "-m", "blipserve", *args, "--batch-size", "1"],
            stdout=subprocess.PIPE,
            stderr=follower,
            timeout=300,
        )
    finally:
        os.close(follower)
    bar = read_terminal(leader)
    expected = pipe.caption(photo_files, max_new_tokens=4)
    assert done.returncode == 0, bar
    assert done.stdout.decode().splitlines() == expected
    assert "caption" in bar and "2/2" in bar
    piped = run_cli(*args, "--batch-size", "1")
    assert piped.stdout.decode().splitlines() == expected
    assert "2/2" not in piped.stderr.decode()


def read_terminal(fd: int) -> str:
    """Everything written to a pseudo-terminal whose other end is closed."""
    chunks = []
    try:
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
    except OSError:  # EIO: the other end is closed and the buffer drained
        pass
    finally:
        os.close(fd)
    return b"".join(chunks).decode(errors="replace")


def test_version_comes_from_the_installed_package():
    done = run_cli("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode() == f"blipserve {blipserve.__version__}\n"
    assert not done.stderr


def test_help_states_the_max_new_tokens_the_demo_uses():
    """--help names the defaults that apply: the demo's generation_config.json value."""
    config = Path(blipserve.__file__).parent / "demo_model" / "generation_config.json"
    demo = json.loads(config.read_text())["max_new_tokens"]
    (field,) = [f for f in fields(blipserve.GenerationParams) if f.name == "max_new_tokens"]
    assert f"{demo} for demo, 20 for the Salesforce checkpoints" in field.metadata["help"]
