"""Image-text matching (BLIP-2 stage 1): the same scores as transformers'
``Blip2ForImageTextRetrieval`` on random weights, loaded from its own checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Blip2Config as HFBlip2Config
from transformers import Blip2ForImageTextRetrieval

from blipserve.model.retrieval import (
    Blip2Retrieval,
    Blip2RetrievalConfig,
    is_retrieval_config,
    similarity,
)
from blipserve.testing.checkpoints import randomize
from blipserve.weights import load_model

VOCAB = 120


def tiny_retrieval_config(cross_attention_frequency: int = 2) -> HFBlip2Config:
    return HFBlip2Config(
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
        ),
        qformer_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            cross_attention_frequency=cross_attention_frequency,
            use_qformer_text_input=True,
            vocab_size=VOCAB,
            max_position_embeddings=40,
        ),
        num_query_tokens=6,
        image_text_hidden_size=16,
    )


@pytest.fixture(scope="module", params=[1, 2])
def pair(request, tmp_path_factory):
    """(transformers' model, ours loaded from its saved checkpoint)."""
    torch.manual_seed(request.param)
    reference = Blip2ForImageTextRetrieval(tiny_retrieval_config(request.param)).eval()
    randomize(reference, seed=request.param)
    directory = tmp_path_factory.mktemp("itm")
    reference.save_pretrained(directory)
    d = json.loads((directory / "config.json").read_text())
    assert is_retrieval_config(d)
    ours = load_model(directory, Blip2RetrievalConfig.from_hf(d), dtype=torch.float32)
    assert isinstance(ours, Blip2Retrieval)
    return reference, ours


def texts(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids with [CLS]-like id 1 first and right padding of different lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    ids[:, 0] = 1
    mask = torch.ones(batch, length, dtype=torch.long)
    for i in range(batch):
        keep = length - (i * 3) % (length - 2)
        mask[i, keep:] = 0
        ids[i, keep:] = 0
    return ids, mask


@torch.inference_mode()
def test_contrastive_similarity_equals_reference(pair):
    reference, ours = pair
    pixels = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    ids, mask = texts(4, 12, seed=1)
    ref = reference(pixel_values=pixels, input_ids=ids, attention_mask=mask)
    image = ours.vision_model(pixels)
    image_features = ours.image_features(image)  # (3, Q, 16)
    text_features = ours.text_features(ids, mask)  # (4, 16)
    torch.testing.assert_close(image_features, ref.image_embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(text_features, ref.text_embeds, rtol=1e-5, atol=1e-5)
    scores = similarity(image_features, text_features)  # (3, 4)
    torch.testing.assert_close(scores, ref.logits_per_image, rtol=1e-5, atol=1e-5)
    assert scores.std() > 0.05  # the scores depend on the inputs


@torch.inference_mode()
def test_matching_logits_equal_reference(pair):
    reference, ours = pair
    pixels = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    ids, mask = texts(4, 10, seed=3)
    ref = reference(
        pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True
    )
    logits = ours.match_logits(ours.vision_model(pixels), ids, mask)  # (4, 2)
    torch.testing.assert_close(logits, ref.logits_per_image, rtol=1e-5, atol=1e-5)
    # Padding is ignored: the same text without its padding gives the same logits.
    keep = int(mask[3].sum())
    alone = ours.match_logits(ours.vision_model(pixels[3:]), ids[3:, :keep], mask[3:, :keep])
    torch.testing.assert_close(alone, logits[3:], rtol=1e-5, atol=1e-5)
