"""Stage-1 training (ITC + ITM + ITG) on the demo model's frozen image encoder: the masks
do what the paper says, the Q-Former learns to retrieve the right caption of unseen scenes,
and the saved model loads in blipserve and in transformers with the same scores."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tokenizers import Tokenizer as RustTokenizer

import blipserve
from blipserve.errors import UnsupportedModel
from blipserve.model.qformer import QFormerConfig
from blipserve.model.retrieval import similarity
from blipserve.processing.qformer_text import TextCodec
from blipserve.resolve import resolve_checkpoint
from blipserve.train import synthetic
from blipserve.train.checkpoint import assemble_retrieval
from blipserve.train.stage1 import (
    Stage1Config,
    itg_mask,
    save_stage1,
    stage1_start,
    train_stage1,
)
from tests.examples import blue_square, red_circle

STEPS = 600


def test_itg_mask_lets_text_see_the_queries_and_its_own_past():
    mask = itg_mask(torch.tensor([[1, 1, 0]]), num_queries=2)[0, 0]  # (5, 5), one pad
    assert mask.tolist() == [
        # q0     q1     t0     t1     t2(pad)
        [True, True, False, False, False],  # queries see queries only
        [True, True, False, False, False],
        [True, True, True, False, False],  # t0: queries and itself
        [True, True, True, True, False],  # t1: queries, t0, itself
        [True, True, True, True, False],  # the pad row: never a key
    ]


@pytest.fixture(scope="module")
def demo():
    return blipserve.load("demo", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def codec() -> TextCodec:
    tokenizer = RustTokenizer.from_file(str(resolve_checkpoint("demo") / "tokenizer.json"))
    size = tokenizer.get_vocab_size()
    return TextCodec(tokenizer, cls_id=size, dec_id=size + 1, pad_id=0, max_length=40)


def fresh_model(demo, codec: TextCodec):
    config = QFormerConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        cross_attention_frequency=1,
        vocab_size=codec.dec_id + 1,
        max_position_embeddings=48,
    )
    return assemble_retrieval(
        demo.model.vision_model, config, num_query_tokens=8, image_text_hidden_size=64
    )


def scene_data(demo, model, count: int, seed: int):
    scenes = synthetic.scenes(count, seed)
    images = [synthetic.render(s) for s in scenes]
    pixels = torch.stack([demo.image_processor.preprocess_one(i) for i in images])
    return images, model.vision_features(pixels), [synthetic.caption(s) for s in scenes]


def test_itg_text_does_not_see_later_tokens(demo, codec):
    torch.manual_seed(0)
    model = fresh_model(demo, codec)
    _, image, _ = scene_data(demo, model, 1, seed=5)
    ids, mask = codec(["a big red circle above a small blue star"])
    changed = ids.clone()
    changed[0, 5] = (changed[0, 5] + 7) % codec.cls_id
    q = model.config.num_query_tokens
    queries = model.query_tokens

    def text_states(token_ids):
        text = model.embeddings(token_ids)
        return model.qformer(queries, image, text, itg_mask(mask, q))[:, q:]

    with torch.no_grad():
        before, after = text_states(ids), text_states(changed)
    torch.testing.assert_close(before[:, :5], after[:, :5])  # earlier positions unchanged
    assert not torch.allclose(before[:, 5:], after[:, 5:])


@pytest.fixture(scope="module")
def trained(demo, codec, tmp_path_factory):
    torch.manual_seed(0)
    model = fresh_model(demo, codec)
    vision_before = {k: v.clone() for k, v in model.vision_model.state_dict().items()}
    _, images, texts = scene_data(demo, model, 2000, seed=0)
    config = Stage1Config(max_steps=STEPS, batch_size=32, lr=3e-4, warmup_steps=50)
    heads, result = train_stage1(model, images, texts, codec, config)
    directory = save_stage1(
        model, heads, codec, tmp_path_factory.mktemp("stage1"), demo.image_processor
    )
    return model, vision_before, result, directory


def test_stage1_learns_to_retrieve_captions_of_unseen_scenes(demo, trained):
    model, vision_before, result, _ = trained
    for name, value in model.vision_model.state_dict().items():
        assert torch.equal(value, vision_before[name]), f"frozen {name} changed"
    first, last = result.losses[:20], result.losses[-20:]
    for part in ("itc", "itg"):
        before = sum(getattr(r, part) for r in first) / len(first)
        after = sum(getattr(r, part) for r in last) / len(last)
        assert after < 0.5 * before, (part, before, after)
    _, images, texts = scene_data(demo, model, 100, seed=1000)  # held out
    ids, mask = model_codec_inputs(trained, texts)
    with torch.no_grad():
        scores = similarity(model.image_features(images), model.text_features(ids, mask))
    right = [texts[i] == texts[int(j)] for i, j in enumerate(scores.argmax(dim=1))]
    accuracy = sum(right) / len(right)
    print(f"stage 1, {STEPS} steps: image -> caption top-1 {accuracy:.2f} of 100 (chance 0.01)")
    assert accuracy >= 0.5, f"image -> caption top-1 {accuracy:.2f} (chance 0.01)"


def model_codec_inputs(trained, texts):
    return TextCodec.from_pretrained(trained[3])(texts)


def test_saved_model_loads_as_a_matcher_and_in_transformers(trained):
    from transformers import Blip2ForImageTextRetrieval

    directory = trained[3]
    assert json.loads((directory / "config.json").read_text())["architectures"] == [
        "Blip2ForImageTextRetrieval"
    ]
    matcher = blipserve.load_matcher(str(directory), device="cpu", dtype="float32")
    captions = ["a big red circle", "a small blue square", "a big green star"]
    drawings = [red_circle(), blue_square()]
    scores = matcher.similarity(drawings, captions)
    assert scores.argmax(dim=1).tolist() == [0, 1]  # PIL drawings, not the training renderer

    reference = Blip2ForImageTextRetrieval.from_pretrained(directory).eval()
    pixels = matcher.image_processor(drawings)
    ids, mask = matcher.codec(captions)
    with torch.no_grad():
        ref = reference(pixel_values=pixels, input_ids=ids, attention_mask=mask)
        itm = reference(
            pixel_values=pixels[:1].expand(3, -1, -1, -1),
            input_ids=ids,
            attention_mask=mask,
            use_image_text_matching_head=True,
        )
    torch.testing.assert_close(scores, ref.logits_per_image, rtol=1e-5, atol=1e-5)
    image = [red_circle()] * 3
    probabilities = torch.tensor(matcher.match(image, captions))
    torch.testing.assert_close(probabilities, itm.logits_per_image.softmax(-1)[:, 1])


def test_captioning_load_refuses_a_matching_checkpoint(trained):
    with pytest.raises(UnsupportedModel, match="load_matcher"):
        blipserve.load(str(trained[3]), device="cpu")
    with pytest.raises(UnsupportedModel, match="not an image-text matching"):
        blipserve.load_matcher(str(resolve_checkpoint("demo")), device="cpu")  # captioning


def test_match_command_prints_scores_per_image(trained, tmp_path, capsys):
    from blipserve.cli import main

    red, blue = tmp_path / "red.png", tmp_path / "blue.png"
    red_circle().save(red)
    blue_square().save(blue)
    texts = ["a big red circle", "a small blue square"]
    argv = ["match", str(red), str(blue), "--model", str(trained[3]), "--device", "cpu", "--itm"]
    assert main([*argv, "--text", texts[0], "--text", texts[1]]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["best"] for r in records] == texts
    assert set(records[0]["similarity"]) == set(records[0]["match"]) == set(texts)
    assert all(0 <= p <= 1 for r in records for p in r["match"].values())
    captioner = str(resolve_checkpoint("demo"))
    assert main(["match", str(red), "--model", captioner, "--text", "a cat"]) == 1
    assert "not an image-text matching checkpoint" in capsys.readouterr().err


def test_stage2_starts_from_the_stage1_qformer(demo, trained, tmp_path, capsys):
    """The paper's order: stage 2 begins with stage 1's query tokens and Q-Former."""
    from blipserve.cli import main
    from blipserve.train.checkpoint import adopt_stage1_qformer, assemble

    stage1 = trained[0]
    captioner = assemble(
        demo.model.vision_model,
        demo.model.language_model,
        stage1.config.qformer,
        num_query_tokens=stage1.config.num_query_tokens,
    )
    _, image, _ = scene_data(demo, stage1, 2, seed=7)
    queries = captioner.query_tokens.expand(2, -1, -1)
    with torch.no_grad():
        assert not torch.allclose(captioner.qformer(queries, image), stage1.query_image(image))
        adopt_stage1_qformer(captioner, stage1)
        queries = captioner.query_tokens.expand(2, -1, -1)
        torch.testing.assert_close(captioner.qformer(queries, image), stage1.query_image(image))
    # The demo's Q-Former has another shape: refused before any training, saying why.
    argv = ["train", "--model", "demo", "--synthetic", "4", "--steps", "1", "--device", "cpu"]
    out = ["--output", str(tmp_path / "run"), "--qformer-from", str(trained[3])]
    assert main([*argv, *out]) == 1
    assert "does not fit" in capsys.readouterr().err


def test_train_command_runs_stage1_then_stage2_from_it(tmp_path, capsys):
    """blipserve train --stage 1 on a captioning checkpoint (the demo) writes a matching
    checkpoint whose Q-Former fits that model, and stage 2 starts from it."""
    from blipserve.cli import main

    stage1_dir, stage2_dir = tmp_path / "stage1", tmp_path / "stage2"
    common = ["--model", "demo", "--device", "cpu", "--no-progress", "--batch-size", "8"]
    argv = ["train", "--stage", "1", *common, "--synthetic", "40", "--steps", "20"]
    assert main([*argv, "--output", str(stage1_dir)]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["steps"] == 20 and summary["output"] == str(stage1_dir)
    matcher = blipserve.load_matcher(str(stage1_dir), device="cpu")
    assert matcher.similarity([red_circle()], ["a big red circle", "a cat"]).shape == (1, 2)

    argv = ["train", *common, "--synthetic", "8", "--steps", "2", "--save-every", "2"]
    assert main([*argv, "--qformer-from", str(stage1_dir), "--output", str(stage2_dir)]) == 0
    captioner = blipserve.load(str(stage2_dir), device="cpu")
    assert isinstance(captioner.caption([red_circle()])[0], str)
    assert main(["train", "--stage", "1", *common, "--synthetic", "4", "--resume",
                 "--output", str(tmp_path / "x")]) == 1  # fmt: skip
    assert "not supported with --stage 1" in capsys.readouterr().err


def test_stage1_continues_a_matching_checkpoint_loaded_in_bfloat16(trained):
    """Frozen encoder in bf16, trained parts float32, and a step that runs."""
    model, codec, processor = stage1_start(str(trained[3]), device="cpu", dtype="bfloat16")
    assert model.vision_model.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    trainable = [p for n, p in model.named_parameters() if not n.startswith("vision_model.")]
    assert {p.dtype for p in trainable} == {torch.float32}
    pixels = torch.stack(
        [processor.preprocess_one(red_circle()), processor.preprocess_one(blue_square())]
    )
    images = model.vision_features(pixels)
    _, result = train_stage1(
        model,
        images,
        ["a big red circle", "a small blue square"],
        codec,
        Stage1Config(max_steps=2, batch_size=2),
    )
    assert len(result.losses) == 2 and all(math.isfinite(r.total) for r in result.losses)
