"""The bundled demo matcher: ``blipserve match`` runs out of the box on the example scenes
(held out from its training) and ranks each image's own caption first."""

from __future__ import annotations

import json

import blipserve
from blipserve.cli import main
from blipserve.model.retrieval import Blip2Retrieval
from blipserve.resolve import resolve_checkpoint, resolve_matcher_checkpoint
from tests.examples import EXAMPLES, example_captions


def test_match_on_the_examples_ranks_each_image_s_caption_first(capsys):
    captions = example_captions()  # file name -> its true caption
    images = [str(EXAMPLES / name) for name in captions]
    texts = [arg for caption in captions.values() for arg in ("--text", caption)]
    assert main(["match", *images, *texts, "--device", "cpu"]) == 0  # no --model: demo
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in records] == images
    assert [r["best"] for r in records] == list(captions.values())


def test_demo_names_the_bundled_matcher_for_matching_only():
    matcher = blipserve.load_matcher("demo", device="cpu", dtype="float32")
    assert isinstance(matcher.model, Blip2Retrieval)
    assert resolve_matcher_checkpoint("demo") != resolve_checkpoint("demo")  # captioning
    size = sum(p.stat().st_size for p in resolve_matcher_checkpoint("demo").iterdir())
    assert size < 16 * 2**20, f"the demo matcher is {size / 2**20:.1f} MB"
