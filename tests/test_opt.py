"""Our OPT decoder against the reference's, on tiny random weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers

from blipserve.engine.kv_cache import KVCache
from blipserve.errors import UnsupportedModel
from blipserve.model.opt import OPTConfig, OPTForCausalLM
from blipserve.testing.reference import TINY_OPT, left_padded, ours_from, reference_opt


def positions(mask: torch.Tensor) -> torch.Tensor:
    return mask.cumsum(-1) * mask - 1


PROMPTS = [[2, 50, 60, 70, 80, 90, 11], [2, 7], [2, 300, 301, 302]]


def test_state_dict_names_and_shapes_match_reference():
    reference = reference_opt()
    ours = OPTForCausalLM(OPTConfig.from_hf(reference.config.to_dict()))
    theirs = {k: v.shape for k, v in reference.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == theirs
    table = ours.model.decoder.embed_positions.weight
    assert table.shape == (TINY_OPT["max_position_embeddings"] + 2, TINY_OPT["hidden_size"])


def test_logits_match_reference_on_left_padded_batch():
    reference = reference_opt()
    ours = ours_from(reference)
    ids, mask = left_padded(PROMPTS)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
        got = ours(ours.embed_tokens(ids), positions(mask), mask.bool())
    real = mask.bool()
    assert got.shape == expected.shape
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(got).all(), "padding rows must not produce NaN"


def test_last_only_gives_the_last_row():
    ours = ours_from(reference_opt())
    ids, mask = left_padded(PROMPTS)
    with torch.no_grad():
        full = ours(ours.embed_tokens(ids), positions(mask), mask.bool())
        last = ours(ours.embed_tokens(ids), positions(mask), mask.bool(), last_only=True)
    assert last.shape == (3, 1, TINY_OPT["vocab_size"])
    torch.testing.assert_close(last[:, 0], full[:, -1])


def test_incremental_decoding_with_cache_equals_full_forward():
    ours = ours_from(reference_opt(seed=1))
    ids, mask = left_padded(PROMPTS)
    extra = torch.tensor([[5, 6, 7], [8, 9, 10], [11, 12, 13]])
    full_ids = torch.cat([ids, extra], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(extra)], dim=1)
    with torch.no_grad():
        full = ours(ours.embed_tokens(full_ids), positions(full_mask), full_mask.bool())
        c = ours.config
        cache = KVCache(
            c.num_hidden_layers, 3, c.num_attention_heads, 16, c.head_dim, torch.float32, "cpu"
        )
        width = ids.shape[1]
        steps = [ours(ours.embed_tokens(ids), positions(mask), mask.bool(), cache, 0)[:, -1]]
        pos = positions(full_mask)
        for j in range(extra.shape[1] - 1):
            slot = width + j
            logits = ours(
                ours.embed_tokens(extra[:, j : j + 1]),
                pos[:, slot : slot + 1],
                full_mask[:, : slot + 1].bool(),
                cache,
                slot,
            )
            steps.append(logits[:, -1])
    expected = full[:, width - 1 : width - 1 + extra.shape[1]]
    torch.testing.assert_close(torch.stack(steps, dim=1), expected, atol=1e-5, rtol=1e-5)


def test_unpadded_batch_without_mask_equals_masked():
    """``key_mask=None`` (no padding: causal prefill, unmasked decode) gives the same
    logits as an explicit all-True mask, at prefill and at each cached decode step."""
    ours = ours_from(reference_opt(seed=2))
    ids = torch.tensor([[2, 5, 9, 14, 3], [2, 7, 7, 1, 20]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    pos = positions(mask.long())
    c = ours.config
    outputs = {}
    with torch.no_grad():
        for name, key_mask in (("masked", mask), ("unmasked", None)):
            cache = KVCache(
                c.num_hidden_layers, 2, c.num_attention_heads, 8, c.head_dim, torch.float32, "cpu"
            )
            logits = [
                ours(
                    ours.embed_tokens(ids[:, :3]),
                    pos[:, :3],
                    None if key_mask is None else key_mask[:, :3],
                    cache,
                    0,
                )
            ]
            for slot in (3, 4):
                step_mask = None if key_mask is None else key_mask[:, : slot + 1]
                logits.append(
                    ours(
                        ours.embed_tokens(ids[:, slot : slot + 1]),
                        pos[:, slot : slot + 1],
                        step_mask,
                        cache,
                        slot,
                    )
                )
            outputs[name] = torch.cat(logits, dim=1)
    torch.testing.assert_close(outputs["unmasked"], outputs["masked"], atol=1e-6, rtol=1e-6)


def test_cache_reorder_and_repeat_move_rows():
    cache = KVCache(1, 2, 1, 4, 2, torch.float32, "cpu")
    k = torch.arange(2.0)[:, None, None, None].expand(2, 1, 3, 2)
    cache.update(0, k, k + 10, 0)
    cache.repeat_interleave(2)
    assert cache.k[0, :, 0, 0, 0].tolist() == [0.0, 0.0, 1.0, 1.0]
    cache.select(torch.tensor([3, 0, 0, 2]))
    assert cache.v[0, :, 0, 0, 0].tolist() == [11.0, 10.0, 10.0, 11.0]


def test_dtype_follows_parameters():
    ours = ours_from(reference_opt()).to(torch.bfloat16)
    ids, mask = left_padded(PROMPTS)
    with torch.no_grad():
        logits = ours(ours.embed_tokens(ids), positions(mask), mask.bool(), last_only=True)
    assert logits.dtype == torch.bfloat16


def test_from_hf_defaults_equal_reference_class_defaults():
    ours, theirs = OPTConfig.from_hf({}), transformers.OPTConfig()
    for field in dataclasses.fields(OPTConfig):
        assert getattr(ours, field.name) == getattr(theirs, field.name), field.name
    assert ours.head_dim == 64


def test_from_hf_fills_omitted_fields_of_the_blip2_opt_diff():
    config = OPTConfig.from_hf(
        {
            "model_type": "opt",
            "hidden_size": 2560,
            "ffn_dim": 10240,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "vocab_size": 50304,
            "eos_token_id": 50118,
            "word_embed_proj_dim": 2560,
            "torch_dtype": "float32",
        }
    )
    assert (config.head_dim, config.max_position_embeddings, config.activation_function) == (
        80,
        2048,
        "relu",
    )
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (1, 2, 50118)
    assert config.do_layer_norm_before and config.enable_bias


@pytest.mark.parametrize(
    ("diff", "field"),
    [
        ({"do_layer_norm_before": False}, "do_layer_norm_before"),
        ({"word_embed_proj_dim": 512}, "word_embed_proj_dim"),
        ({"activation_function": "swish"}, "swish"),
        ({"_remove_final_layer_norm": True}, "_remove_final_layer_norm"),
    ],
)
def test_unsupported_variants_are_refused_by_name(diff, field):
    with pytest.raises(UnsupportedModel, match=field):
        OPTConfig.from_hf(diff)
