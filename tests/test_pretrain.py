"""Pre-training of the demo recipe's frozen parts, on a few synthetic scenes."""

from __future__ import annotations

import pytest
import torch

from blipserve.model.qformer import QFormerConfig
from blipserve.model.vision import VisionConfig
from blipserve.processing.image_processor import BLIP2_PREPROCESSOR_CONFIG, ImageProcessor
from blipserve.processing.tokenizer import Tokenizer
from blipserve.testing.reference import tiny_opt_config
from blipserve.train.bpe import write_bpe_tokenizer
from blipserve.train.demo import _text_pairs
from blipserve.train.pretrain import (
    PretrainSettings,
    patch_labels,
    pretrain_language_model,
    pretrain_vision,
    scene_token_ids,
    sincos_positions,
)
from blipserve.train.synthetic import (
    OBJECT_LABELS,
    SCENE_TOKENS,
    corpus,
    render,
    scene_labels,
    scenes,
)


def scene_tokenizer(directory) -> Tokenizer:
    return Tokenizer.from_pretrained(
        write_bpe_tokenizer(
            corpus(300, 1), directory, vocab_size=400, extra_special_tokens=SCENE_TOKENS
        )
    )


def test_scene_tokens_name_layout_and_objects_in_order(tmp_path):
    tokenizer = scene_tokenizer(tmp_path)
    scene = next(s for s in scenes(20, seed=4) if len(s.objects) == 2)
    ids = scene_token_ids(tokenizer, scene)
    names = [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
    first, second = scene.objects
    assert names == [
        f"<layout:{scene.layout}>",
        f"<obj:{first.size}-{first.color}-{first.shape}>",
        f"<obj:{second.size}-{second.color}-{second.shape}>",
        "<obj:none>",
    ]
    # special: never part of decoded text, and matched whole when they appear in text
    assert tokenizer.decode(ids) == ""
    assert tokenizer.encode("<obj:none>") == [tokenizer.bos_token_id, ids[-1]]


def test_tokenizer_without_scene_tokens_is_refused(tmp_path):
    plain = Tokenizer.from_pretrained(write_bpe_tokenizer(corpus(50, 1), tmp_path, vocab_size=300))
    with pytest.raises(ValueError, match="scene tokens"):
        scene_token_ids(plain, scenes(1, seed=4)[0])


def test_patch_labels_follow_the_objects():
    """A big object covers several patches, each labelled with its slot and kind; patches
    far from every object are background."""
    scene = next(s for s in scenes(50, seed=6) if s.layout == "row" and len(s.objects) == 2)
    slots, labels = patch_labels(scene, 6)
    for slot in (1, 2):
        obj = scene.objects[slot - 1]
        mine = [i for i, s in enumerate(slots) if s == slot]
        assert mine, "every object labels at least one patch"
        assert {labels[i] for i in mine} == {OBJECT_LABELS.index(obj.label)}
        columns = [i % 6 for i in mine]
        assert abs(sum(columns) / len(columns) - obj.center[0] * 6 + 0.5) < 1.0
    assert slots.count(0) > 0 and all(labels[i] == 0 for i, s in enumerate(slots) if s == 0)


def test_language_model_pretraining_lowers_the_target_loss(tmp_path):
    torch.set_num_threads(1)
    tokenizer = scene_tokenizer(tmp_path)
    config = tiny_opt_config(
        vocab_size=tokenizer.vocab_size,
        eos_token_id=tokenizer.encode("\n")[1],
        max_position_embeddings=256,
    )  # the scene tokenizer's vocabulary, "\n" eos, room for conversations
    triples = _text_pairs(40, 1)
    _, early = pretrain_language_model(config, tokenizer, triples, PretrainSettings(3, 16, 3e-3))
    _, late = pretrain_language_model(config, tokenizer, triples, PretrainSettings(60, 16, 3e-3))
    assert late < early - 1.0, (early, late)


def test_vision_pretraining_learns_to_read_scenes():
    torch.set_num_threads(1)
    processor = ImageProcessor.from_dict(
        {**BLIP2_PREPROCESSOR_CONFIG, "size": {"height": 48, "width": 48}}
    )
    few = scenes(24, seed=2)
    pixels = torch.cat([processor([render(s, size=96)]) for s in few])
    labels = torch.tensor([scene_labels(s) for s in few])
    slots, objects = zip(*(patch_labels(s, 3) for s in few), strict=True)
    config = VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=48, patch_size=16,
    )  # fmt: skip
    qformer_config = QFormerConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
    )  # fmt: skip
    reader, _ = pretrain_vision(
        config,
        qformer_config,
        pixels,
        labels,
        torch.tensor(slots),
        torch.tensor(objects),
        PretrainSettings(300, 24, 3e-3, warmup_steps=5),
    )
    with torch.no_grad():
        out = reader(pixels)
    assert (out["layout"].argmax(-1) == labels[:, 0]).float().mean() > 0.9
    covered = torch.tensor(objects) > 0  # patches an object covers: what covers them?
    seen = out["patch_object"].argmax(-1)[covered]
    assert (seen == torch.tensor(objects)[covered]).float().mean() > 0.5  # of 48 kinds
    present = labels[:, 1:] > 0  # the objects in caption order: 5x chance after 300 steps
    read = out["objects"].argmax(-1)
    assert (read[present] == labels[:, 1:][present]).float().mean() > 5 / 48


def test_sincos_positions_tell_every_patch_apart():
    """The start the ViT's position embeddings get: nothing for the class token, and a
    different vector for every patch, nearer for neighbours than for far patches."""
    positions = sincos_positions(side=4, dim=32)
    assert positions.shape == (17, 32)
    assert positions[0].abs().sum() == 0
    patches = positions[1:]
    distances = torch.cdist(patches, patches)
    assert distances[~torch.eye(16, dtype=torch.bool)].min() > 0.1
    row_major = lambda r, c: 4 * r + c  # noqa: E731
    assert distances[row_major(0, 0), row_major(0, 1)] < distances[row_major(0, 0), row_major(0, 3)]
    assert distances[row_major(0, 0), row_major(1, 0)] < distances[row_major(0, 0), row_major(3, 0)]
