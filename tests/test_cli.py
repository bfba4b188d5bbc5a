"""The ``blipserve`` command end to end, in a child process, on a tiny random checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


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
