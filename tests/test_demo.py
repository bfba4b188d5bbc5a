"""The bundled demo model: it loads by name, and its captions and answers are right."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import blipserve
from blipserve.resolve import demo_checkpoint
from tests.examples import EXAMPLES, blue_square, example_captions, red_circle


@pytest.fixture(scope="module")
def demo():
    return blipserve.load("demo", device="cpu")


def test_demo_is_bundled_and_small():
    directory = demo_checkpoint()
    size = sum(p.stat().st_size for p in directory.iterdir())
    assert size <= 25 * 2**20, f"{size / 2**20:.1f} MiB"
    assert (directory / "build_record.json").is_file()


def test_demo_captions_the_examples(demo):
    expected = example_captions()
    names = sorted(expected)
    captions = demo.caption([str(EXAMPLES / name) for name in names])
    assert captions == [expected[name] for name in names]


def test_evaluate_command_meets_the_quality_bar():
    """The evaluation command on 60 held-out scenes (seed 1000, never trained on); the
    full 500-image figures are in MODEL_CARD.md."""
    done = subprocess.run(
        [sys.executable, "-m", "blipserve", "evaluate", "--count", "60", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["images"] == 60
    assert report["caption_accuracy"] >= 0.9, report
    assert report["vqa_accuracy"] >= 0.9, report


def test_demo_captions_scenes_drawn_independently(demo):
    circle, square = red_circle(), blue_square()
    assert demo.caption([circle, square]) == ["a big red circle", "a small blue square"]
    assert demo.ask(circle, "what color is the circle?") == "red"
    assert demo.ask(square, "where is the square?") == "top left"


def test_cli_uses_the_demo_by_default():
    names = ["scene-1.png", "scene-2.png"]
    done = subprocess.run(
        [sys.executable, "-m", "blipserve", "caption", *(str(EXAMPLES / n) for n in names)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    expected = example_captions()
    assert done.stdout.splitlines() == [expected[n] for n in names]


def test_batch_on_the_examples_writes_the_managed_endpoints_csv(tmp_path):
    """``blipserve batch examples/ OUT`` with no --model: predictions.csv, byte for byte."""
    done = subprocess.run(
        [sys.executable, "-m", "blipserve", "batch", str(EXAMPLES), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "predictions.csv").read_bytes() == (
        b'0,"a small green square, a big yellow triangle and a big blue star in a row",'
        b"scene-1.png\n"
        b"0,a small orange star above a big green triangle,scene-2.png\n"
        b"0,a small blue triangle to the left of a big orange square,scene-3.png\n"
        b"0,a big green circle above a big red triangle,scene-4.png\n"
        b'0,"a big blue square, a big green circle and a small purple star in a row",'
        b"scene-5.png\n"
        b"0,a small orange square to the left of a small red triangle,scene-6.png\n"
    )
