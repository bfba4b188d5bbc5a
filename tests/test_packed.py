"""oneDNN-packed bfloat16 linear layers: the same numbers as plain ones, on inference
pipelines only, and never on float32 (which stays token-identical to transformers)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import blipserve
from blipserve.model.packed import PackedLinear, can_pack, pack_linears

pytestmark = pytest.mark.skipif(not can_pack(), reason="this torch build has no oneDNN")


@pytest.mark.parametrize("shape", [(1, 64), (2, 7, 64), (300, 64)])
def test_packed_linear_equals_linear(shape):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96).bfloat16()
    x = torch.randn(*shape).bfloat16()
    packed = PackedLinear(linear)
    with torch.inference_mode():
        out = packed(x)
    want = F.linear(x.float(), linear.weight.float(), linear.bias.float())
    assert out.shape == (*shape[:-1], 96) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_only_bfloat16_cpu_layers_are_packed():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8).bfloat16(), torch.nn.Linear(8, 8))
    assert pack_linears(model) == ["0"]
    assert isinstance(model[0], PackedLinear) and isinstance(model[1], torch.nn.Linear)


def test_pipelines_pack_bfloat16_and_match_the_plain_model(tiny_checkpoint, photos):
    load = lambda **kw: blipserve.load(str(tiny_checkpoint), device="cpu", **kw)  # noqa: E731
    packed, plain = load(dtype="bfloat16"), load(dtype="bfloat16", for_training=True)
    assert isinstance(packed.model.language_model.lm_head, PackedLinear)
    assert isinstance(plain.model.language_model.lm_head, torch.nn.Linear)
    assert not any(isinstance(m, PackedLinear) for m in load(dtype="float32").model.modules())
    images = [photos["chelsea"], photos["coffee"], photos["astronaut"]]
    ours = packed.image_prefix(packed.preprocess(images)).float()
    reference = plain.image_prefix(plain.preprocess(images)).float()
    assert F.cosine_similarity(ours.flatten(1), reference.flatten(1)).min() > 0.999
