"""Our T5 (Flan-T5 / T5 v1.1) against the reference's, on tiny random weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers
from torch import nn

from blipserve.engine.kv_cache import KVCache
from blipserve.errors import UnsupportedModel
from blipserve.model.t5 import T5Config, T5ForConditionalGeneration, relative_position_bucket

TINY = {
    "vocab_size": 100,
    "d_model": 64,
    "d_kv": 16,
    "d_ff": 96,
    "num_layers": 2,
    "num_decoder_layers": 3,
    "num_heads": 4,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 64,
    "decoder_start_token_id": 0,
}
FLAN = {**TINY, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}
ORIGINAL = {**TINY, "feed_forward_proj": "relu", "tie_word_embeddings": True}
CONFIGS = pytest.mark.parametrize("hf", [FLAN, ORIGINAL], ids=["gated-gelu-untied", "relu-tied"])
# Copies of ``shared.weight`` in the reference's state dict; we hold the table once.
TIED_COPIES = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}


def reference_t5(hf: dict, seed: int = 0) -> transformers.T5ForConditionalGeneration:
    """The reference on random weights, with every table made to matter."""
    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**hf)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)  # initialised to ones
            if "relative_attention_bias" in name:
                p.normal_(0.0, 1.0)  # initialised small: let the buckets show
        if not hf["tie_word_embeddings"]:
            # transformers 5.24 ties ``lm_head`` to ``shared`` at init even when the config
            # says untied (from_pretrained unties when a checkpoint holds both, as Flan-T5's
            # do): give the head its own values, as in a real Flan-T5 checkpoint.
            model.lm_head.weight = nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.1)
    return model


def ours_from(reference: transformers.T5ForConditionalGeneration, hf: dict):
    """Our model from the same ``config.json`` dict, loaded strictly from the reference."""
    ours = T5ForConditionalGeneration(T5Config.from_hf(hf)).eval()
    state = {k: v for k, v in reference.state_dict().items() if k not in TIED_COPIES}
    ours.load_state_dict(state, strict=True)
    return ours


def encoder_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, 20, 64) embeddings with right padding; 20 positions reach the log-spaced buckets."""
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(3, 20, TINY["d_model"], generator=g)
    lengths = torch.tensor([20, 13, 5])
    mask = torch.arange(20)[None, :] < lengths[:, None]  # (3, 20)
    return embeds, mask.long()


def assert_close_to_scale(got: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, atol=1e-5 * scale, rtol=1e-5)


@CONFIGS
def test_state_dict_names_and_shapes_match_reference(hf):
    reference = reference_t5(hf)
    ours = T5ForConditionalGeneration(T5Config.from_hf(hf))
    theirs = {k: v.shape for k, v in reference.state_dict().items() if k not in TIED_COPIES}
    assert {k: v.shape for k, v in ours.state_dict().items()} == theirs
    assert sum("relative_attention_bias" in k for k in theirs) == 2, "block 0 of each stack"


def test_relative_position_buckets_match_reference():
    offsets = torch.arange(-300, 301)[None, :]
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (32, 64), (16, 20)):
            expected = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
                offsets, bidirectional, buckets, distance
            )
            got = relative_position_bucket(offsets, bidirectional, buckets, distance)
            assert torch.equal(got, expected), (bidirectional, buckets, distance)


@CONFIGS
def test_encoder_matches_reference_on_padded_batch(hf):
    reference = reference_t5(hf)
    ours = ours_from(reference, hf)
    embeds, mask = encoder_inputs()
    with torch.no_grad():
        expected = reference.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        got = ours.encode(embeds, mask)
    assert got.shape == (3, 20, TINY["d_model"])
    assert_close_to_scale(got, expected)


@CONFIGS
def test_decoder_logits_match_reference(hf):
    reference = reference_t5(hf, seed=1)
    ours = ours_from(reference, hf)
    embeds, mask = encoder_inputs(seed=1)
    g = torch.Generator().manual_seed(1)
    decoder_ids = torch.randint(2, TINY["vocab_size"], (3, 18), generator=g)
    decoder_ids[:, 0] = hf["decoder_start_token_id"]  # 18 positions reach the causal log buckets
    with torch.no_grad():
        expected = reference(
            inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_ids
        ).logits
        got = ours(embeds, mask, decoder_ids)
    assert got.shape == (3, 18, TINY["vocab_size"])
    assert_close_to_scale(got, expected)


@CONFIGS
def test_greedy_tokens_match_reference(hf):
    reference = reference_t5(hf, seed=2)
    ours = ours_from(reference, hf)
    embeds, mask = encoder_inputs(seed=2)
    start = torch.full((3, 1), hf["decoder_start_token_id"])
    theirs, mine = start, start
    with torch.no_grad():
        for _ in range(8):  # full recompute each step, on both sides
            logits = reference(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=theirs)
            theirs = torch.cat([theirs, logits.logits[:, -1:].argmax(-1)], dim=1)
            mine = torch.cat([mine, ours(embeds, mask, mine)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(mine, theirs)


def test_decoder_output_scaling_read_as_reference():
    """The reference reads ``tie_word_embeddings`` as ``scale_decoder_outputs`` (its own
    ``tie_word_embeddings`` attribute is always True in transformers 5.24), and a file it
    wrote carries both: ``true`` and ``false`` for a Flan-T5."""
    written_by_transformers_5 = {
        **FLAN,
        "tie_word_embeddings": True,
        "scale_decoder_outputs": False,
    }
    for hf in (FLAN, ORIGINAL, written_by_transformers_5, {}):
        expected = transformers.T5Config(**hf).scale_decoder_outputs
        assert T5Config.from_hf(hf).scale_decoder_outputs == expected, hf
    assert T5Config.from_hf(written_by_transformers_5).tie_word_embeddings


@CONFIGS
def test_cached_decoding_equals_full_recompute(hf):
    """Token by token through a preallocated cache, cross-attention K/V computed once: the
    logits of every step equal the no-cache decode of the whole sequence."""
    reference = reference_t5(hf, seed=3)
    ours = ours_from(reference, hf)
    embeds, mask = encoder_inputs(seed=3)
    g = torch.Generator().manual_seed(3)
    decoder_ids = torch.randint(2, TINY["vocab_size"], (3, 18), generator=g)
    decoder_ids[:, 0] = hf["decoder_start_token_id"]
    config = ours.config
    cache = KVCache(
        config.num_decoder_layers, 3, config.num_heads, 24, config.d_kv, torch.float32, "cpu"
    )
    with torch.no_grad():
        cross_kv = ours.cross_key_values(ours.encode(embeds, mask))  # (L, 3, H, 20, d_kv)
        full = ours.decode(decoder_ids, cross_kv, mask)  # (3, 18, V)
        steps = [ours.decode(decoder_ids[:, :5], cross_kv, mask, cache, 0)]  # a 5-token start
        for t in range(5, 18):
            steps.append(ours.decode(decoder_ids[:, t : t + 1], cross_kv, mask, cache, t))
    assert cross_kv.k.shape == (config.num_decoder_layers, 3, config.num_heads, 20, config.d_kv)
    assert_close_to_scale(torch.cat(steps, dim=1), full)


def test_cross_key_values_widen_and_select_rows():
    ours = ours_from(reference_t5(FLAN), FLAN)
    embeds, mask = encoder_inputs()
    with torch.no_grad():
        cross_kv = ours.cross_key_values(ours.encode(embeds, mask))
    k = cross_kv.k.clone()
    cross_kv.repeat_interleave(2)  # rows 0 0 1 1 2 2
    cross_kv.select(torch.tensor([5, 0]))
    assert torch.equal(cross_kv.k, k[:, [2, 0]])
    assert torch.equal(cross_kv.layer(1)[0], k[1, [2, 0]])


def test_from_hf_defaults_equal_reference_class_defaults():
    ours, theirs = T5Config.from_hf({}), transformers.T5Config()
    not_in_reference = {"decoder_start_token_id"}  # set by every T5 checkpoint, not the class
    for field in dataclasses.fields(T5Config):
        if field.name not in not_in_reference:
            assert getattr(ours, field.name) == getattr(theirs, field.name), field.name
    assert ours.num_decoder_layers == ours.num_layers == 6
    assert (ours.is_gated, ours.act_name) == (False, "relu")


def test_flan_t5_config_reads_gated_tanh_gelu():
    config = T5Config.from_hf({"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False})
    assert (config.is_gated, config.act_name, config.tie_word_embeddings) == (
        True,
        "gelu_new",
        False,
    )


@pytest.mark.parametrize(
    ("proj", "match"),
    [("gated-swish", "swish"), ("silly-gelu", "silly-gelu"), ("a-b-c", "a-b-c")],
)
def test_unsupported_feed_forward_is_refused_by_name(proj, match):
    with pytest.raises(UnsupportedModel, match=match):
        T5Config.from_hf({"feed_forward_proj": proj})
