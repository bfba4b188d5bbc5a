"""oneDNN-packed linear layers: the same numbers as plain ones, on inference pipelines
only; float32 is packed only under dtype "auto" (float32 by name stays token-identical to
transformers)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import blipserve
from blipserve.model.packed import PackedLinear, can_pack, pack_linears

pytestmark = pytest.mark.skipif(not can_pack(torch.float32), reason="no oneDNN in this torch")
needs_bf16_packing = pytest.mark.skipif(
    not can_pack(torch.bfloat16), reason="oneDNN refuses bfloat16 on this CPU (AVX2)"
)
TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-5}  # relative to the largest output


@pytest.mark.parametrize(
    "dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_bf16_packing)]
)
@pytest.mark.parametrize("shape", [(1, 64), (2, 7, 64), (300, 64)])
def test_packed_linear_equals_linear(shape, dtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96).to(dtype)
    x = torch.randn(*shape).to(dtype)
    packed = PackedLinear(linear)
    with torch.inference_mode():
        out = packed(x)
    want = F.linear(x.float(), linear.weight.float(), linear.bias.float())
    assert out.shape == (*shape[:-1], 96) and out.dtype == dtype
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(
        out.float(), want, rtol=tolerance, atol=tolerance * want.abs().max().item()
    )


def test_only_the_dtypes_asked_for_are_packed():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8).double(), torch.nn.Linear(8, 8))
    assert pack_linears(model) == []  # bfloat16 by default: nothing here
    assert pack_linears(model, (torch.float32, torch.bfloat16)) == ["1"]
    assert isinstance(model[0], torch.nn.Linear) and isinstance(model[1], PackedLinear)


def test_bfloat16_is_packed_only_where_onednn_computes_it():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8).bfloat16())
    packed = pack_linears(model)  # never an error: an AVX2 CPU keeps the plain layer
    assert packed == (["0"] if can_pack(torch.bfloat16) else [])


def test_auto_float32_packs_and_gives_the_exact_paths_tokens(tiny_checkpoint, photos, monkeypatch):
    """On a CPU without native bfloat16, "auto" is float32 with packed layers: the tokens
    of float32 by name (transformers' kernels), while float32 by name stays plain."""
    monkeypatch.setattr("blipserve.resolve.cpu_has_native_bf16", lambda: False)
    load = lambda dtype: blipserve.load(str(tiny_checkpoint), device="cpu", dtype=dtype)  # noqa: E731
    auto, exact = load("auto"), load("float32")
    assert auto.model.dtype == torch.float32
    assert isinstance(auto.model.language_model.lm_head, PackedLinear)
    assert isinstance(auto.model.vision_model.encoder.layers[0].mlp.fc1, PackedLinear)
    assert not any(isinstance(m, PackedLinear) for m in exact.model.modules())
    images = [photos["chelsea"], photos["coffee"], photos["astronaut"], photos["china"]]
    ours = auto.generate(images, max_new_tokens=12)
    reference = exact.generate(images, max_new_tokens=12)
    assert [r[0].token_ids for r in ours] == [r[0].token_ids for r in reference]


@needs_bf16_packing
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
