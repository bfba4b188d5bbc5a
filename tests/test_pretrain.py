"""Pre-training of the demo recipe's frozen parts, on a few synthetic scenes."""

from __future__ import annotations

import torch

from blipserve.model.opt import OPTConfig
from blipserve.model.vision import VisionConfig
from blipserve.processing.image_processor import BLIP2_PREPROCESSOR_CONFIG, ImageProcessor
from blipserve.processing.tokenizer import Tokenizer
from blipserve.train.bpe import write_bpe_tokenizer
from blipserve.train.demo import _text_pairs
from blipserve.train.pretrain import (
    PretrainSettings,
    cell_word_ids,
    pretrain_language_model,
    pretrain_vision,
)
from blipserve.train.synthetic import cell_labels, corpus, render, scenes


def test_cell_word_ids_name_each_cell(tmp_path):
    tokenizer = Tokenizer.from_pretrained(
        write_bpe_tokenizer(corpus(300, 1), tmp_path, vocab_size=400)
    )
    scene = scenes(1, seed=4)[0]
    cells = cell_word_ids(tokenizer, scene)
    assert len(cells) == 9
    for obj in scene.objects:
        words = tokenizer.decode(cells[obj.row * 3 + obj.col]).split()
        assert words == [obj.size, obj.color, obj.shape]
    empty = [
        c for i, c in enumerate(cells) if not any(i == o.row * 3 + o.col for o in scene.objects)
    ]
    assert all(c == [tokenizer.pad_token_id] * 3 for c in empty)


def test_language_model_pretraining_lowers_the_target_loss(tmp_path):
    torch.set_num_threads(1)
    tokenizer = Tokenizer.from_pretrained(
        write_bpe_tokenizer(corpus(300, 1), tmp_path, vocab_size=400)
    )
    config = OPTConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32,
        eos_token_id=tokenizer.encode("\n")[1],
    )  # fmt: skip
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
        config, pixels, labels, PretrainSettings(200, 24, 3e-3, warmup_steps=5)
    )
    with torch.no_grad():
        predicted = classifier(pixels).argmax(-1)
    occupied = labels > 0
    assert (predicted[occupied] == labels[occupied]).float().mean() > 0.5  # of 48 object kinds
