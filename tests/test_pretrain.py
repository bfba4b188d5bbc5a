"""Pre-training of the demo recipe's frozen parts, on a few synthetic scenes."""

from __future__ import annotations

import pytest
import torch

from blipserve.model.vision import VisionConfig
from blipserve.processing.image_processor import BLIP2_PREPROCESSOR_CONFIG, ImageProcessor
from blipserve.processing.tokenizer import Tokenizer
from blipserve.testing.reference import tiny_opt_config
from blipserve.train.bpe import write_bpe_tokenizer
from blipserve.train.demo import _text_pairs
from blipserve.train.pretrain import (
    PretrainSettings,
    cell_token_ids,
    pretrain_language_model,
    pretrain_vision,
)
from blipserve.train.synthetic import (
    CELL_TOKENS,
    NUM_CELL_CLASSES,
    cell_labels,
    corpus,
    render,
    scenes,
)


def scene_tokenizer(directory) -> Tokenizer:
    return Tokenizer.from_pretrained(
        write_bpe_tokenizer(
            corpus(300, 1), directory, vocab_size=400, extra_special_tokens=CELL_TOKENS
        )
    )


def test_cell_tokens_name_each_cell(tmp_path):
    tokenizer = scene_tokenizer(tmp_path)
    scene = scenes(1, seed=4)[0]
    ids = cell_token_ids(tokenizer, scene)
    assert len(ids) == 9 and len(set(CELL_TOKENS)) == NUM_CELL_CLASSES
    names = [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
    for obj in scene.objects:
        assert names[obj.row * 3 + obj.col] == f"<cell:{obj.size}-{obj.color}-{obj.shape}>"
    occupied = {o.row * 3 + o.col for o in scene.objects}
    assert all(names[i] == "<cell:empty>" for i in range(9) if i not in occupied)
    # special: never part of decoded text, and matched whole when they appear in text
    assert tokenizer.decode(ids) == ""
    assert tokenizer.encode("<cell:empty>") == [
        tokenizer.bos_token_id,
        ids[names.index("<cell:empty>")],
    ]


def test_tokenizer_without_cell_tokens_is_refused(tmp_path):
    plain = Tokenizer.from_pretrained(write_bpe_tokenizer(corpus(50, 1), tmp_path, vocab_size=300))
    with pytest.raises(ValueError, match="cell tokens"):
        cell_token_ids(plain, scenes(1, seed=4)[0])


def test_language_model_pretraining_lowers_the_target_loss(tmp_path):
    torch.set_num_threads(1)
    tokenizer = scene_tokenizer(tmp_path)
    config = tiny_opt_config(
        vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.encode("\n")[1]
    )  # the scene tokenizer's vocabulary and "\n" eos
    triples = _text_pairs(40, 1)
    _, early = pretrain_language_model(config, tokenizer, triples, PretrainSettings(3, 16, 3e-3))
    _, late = pretrain_language_model(config, tokenizer, triples, PretrainSettings(60, 16, 3e-3))
    assert late < early - 1.0, (early, late)


def test_vision_pretraining_learns_cell_contents():
    torch.set_num_threads(1)
    processor = ImageProcessor.from_dict(
        {**BLIP2_PREPROCESSOR_CONFIG, "size": {"height": 48, "width": 48}}
    )
    few = scenes(24, seed=2)
    pixels = torch.cat([processor([render(s, size=96)]) for s in few])
    labels = torch.tensor([cell_labels(s) for s in few])
    config = VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=48, patch_size=16,
    )  # fmt: skip
    classifier, _ = pretrain_vision(
        config, pixels, labels, PretrainSettings(300, 24, 3e-3, warmup_steps=5)
    )
    with torch.no_grad():
        cell_logits, where_logits = classifier(pixels)
    predicted = cell_logits.argmax(-1)
    occupied = labels > 0
    assert (predicted[occupied] == labels[occupied]).float().mean() > 0.5  # of 48 object kinds
    where = where_logits.argmax(-1)  # (N, 9 patches): which cell each patch lies in
    assert (where == classifier.cell_of_patch).float().mean() > 0.9
