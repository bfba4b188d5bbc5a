"""int8 weight-only quantization: the kernel paths agree with the dequantized weights, the
loader quantizes the language model as it reads it, and outputs stay close to bfloat16's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import blipserve
from blipserve.model.int8 import Int8Linear, kernel_max_rows, quantize_weight
from blipserve.train.evaluate import evaluate_synthetic


def test_quantized_weights_are_within_half_a_step():
    weight = torch.randn(64, 96) * torch.logspace(-3, 1, 64)[:, None]  # rows of every scale
    weight[5] = 0.0
    q, scales = quantize_weight(weight)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    error = (q.float() * scales[:, None] - weight).abs()
    assert torch.all(error <= scales[:, None] / 2 + 1e-7)
    assert torch.all(q[5] == 0)  # an all-zero row stays zero, with no division by zero


@pytest.mark.parametrize("rows", ["one", "at the limit", "past the limit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_equals_its_dequantized_weights(rows, dtype):
    """The int8 kernel (few rows) and the dequantizing path (many rows) compute the same
    product as a float linear layer on the dequantized weights, in the input's dtype."""
    limit = kernel_max_rows(dtype)
    rows = {"one": 1, "at the limit": limit // 2, "past the limit": limit // 2 + 1}[rows]
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 80), torch.randn(48)
    q, scales = quantize_weight(weight)
    layer = Int8Linear(80, 48, bias=True, compute_dtype=torch.bfloat16)
    layer.load_state_dict({"weight": q, "scales": scales.bfloat16(), "bias": bias})
    x = torch.randn(2, rows, 80, dtype=dtype)
    out = layer(x)
    assert out.shape == (2, rows, 48) and out.dtype == dtype
    dense = q.float() * scales.bfloat16().float()[:, None]
    want = F.linear(x.bfloat16().float(), dense, bias)
    # bfloat16 keeps 8 significant bits: errors scale with the outputs' size
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=1e-2 * want.abs().max().item())


@pytest.fixture(scope="module")
def pipes(tiny_checkpoint):
    load = lambda **kw: blipserve.load(str(tiny_checkpoint), device="cpu", **kw)  # noqa: E731
    return load(dtype="bfloat16"), load(dtype="bfloat16", quantize="int8")


def test_loading_quantizes_every_language_model_linear(pipes):
    plain, quantized = pipes
    lm = quantized.model.language_model
    layers = [m for m in lm.modules() if isinstance(m, torch.nn.Linear | Int8Linear)]
    assert layers and all(isinstance(m, Int8Linear) for m in layers)
    assert all(m.weight.dtype == torch.int8 for m in layers)
    # The tied head gets its own int8 copy; the embedding lookup keeps bfloat16.
    embedding = lm.model.decoder.embed_tokens.weight
    assert embedding.dtype == torch.bfloat16
    torch.testing.assert_close(
        embedding, plain.model.language_model.model.decoder.embed_tokens.weight
    )
    # The image encoder and Q-Former are untouched.
    assert not isinstance(quantized.model.vision_model.encoder.layers[0].mlp.fc1, Int8Linear)


def test_int8_logits_stay_close_to_bfloat16(pipes, photos):
    plain, quantized = pipes
    images = [photos["chelsea"], photos["coffee"], photos["astronaut"]]

    def first_step_logits(pipe):
        prefix = pipe.image_prefix(pipe.preprocess(images))
        ids = torch.tensor(pipe.tokenizer.encode_batch([""] * 3))
        embeds = torch.cat([prefix, pipe.model.language_model.embed_tokens(ids)], dim=1)
        positions = torch.arange(embeds.shape[1])[None].expand(3, -1)
        with torch.inference_mode():
            return pipe.model.language_model(embeds, positions, None, None, 0)[:, -1].float()

    ours, reference = first_step_logits(quantized), first_step_logits(plain)
    cosine = F.cosine_similarity(ours, reference, dim=-1)
    assert torch.all(cosine > 0.99), cosine
    # Random weights give nearly tied scores: int8's pick is among bfloat16's top five.
    top5 = reference.topk(5, dim=-1).indices
    assert all(pick in row for pick, row in zip(ours.argmax(-1), top5, strict=True))


def test_demo_model_keeps_its_accuracy_in_int8():
    """The quality bar stated in the README: >= 95% exact-match captions in int8."""
    pipe = blipserve.load("demo", device="cpu", quantize="int8")
    report = evaluate_synthetic(pipe, 100, seed=1000)
    assert report.caption_accuracy >= 0.95, report.summary()
    assert report.vqa_accuracy >= 0.95, report.summary()


def test_unknown_quantization_and_matching_checkpoints_are_refused(tiny_checkpoint):
    with pytest.raises(blipserve.InvalidRequest, match="quantize must be one of int8"):
        blipserve.load(str(tiny_checkpoint), device="cpu", quantize="int4")


def test_quantize_flag_on_the_command_line_and_the_server(tmp_path):
    """``--quantize int8`` gives what ``quantize="int8"`` gives; a bad value is refused."""
    from blipserve.server.settings import ServerSettings

    image = Path(__file__).parents[1] / "examples" / "scene-2.png"
    done = subprocess.run(
        [sys.executable, "-m", "blipserve", "caption", str(image), "--quantize", "int8"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    pipe = blipserve.load("demo", quantize="int8")
    assert done.stdout.strip() == pipe.caption([str(image)])[0]
    assert ServerSettings(quantize="int8").quantize == "int8"
    with pytest.raises(ValueError, match="--quantize must be one of none, int8"):
        ServerSettings(quantize="int4")
