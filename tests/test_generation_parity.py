"""Our generate against the reference's, in BLIP-2's setting without the vision side.

The reference call mirrors ``Blip2ForConditionalGeneration.generate`` (transformers 5.x):
input_ids ``[pad ... | <image> x Q | </s> prompt]`` left-padded, ``inputs_embeds`` with the
prefix scattered over the ``<image>`` slots, the attention mask, and the generation options.
"""

from __future__ import annotations

import pytest
import torch

from blipserve.engine.generate import GenerationParams, generate
from tests.test_opt import left_padded, ours_from, reference_opt

IMAGE, PAD, BOS = 999, 1, 2
Q = 6
PROMPTS = [[BOS], [BOS, 17, 230, 5], [BOS, 400, 401, 402, 403, 404, 405]]
MAX_NEW = 10


@pytest.fixture(scope="module")
def models():
    reference = reference_opt(seed=3, tie_word_embeddings=False)
    prefix = torch.randn(len(PROMPTS), Q, 64, generator=torch.Generator().manual_seed(4))
    return reference, ours_from(reference), prefix


def reference_generate(reference, prefix, prompts, eos, **options) -> list[list[tuple]]:
    """Reference outputs as ``(new token ids, finish reason)``, grouped per prompt."""
    ids, mask = left_padded([[IMAGE] * Q + p for p in prompts], pad=PAD)
    embeds = reference.get_input_embeddings()(ids)
    image_slots = (ids == IMAGE)[..., None]
    embeds = embeds.masked_scatter(image_slots, prefix.to(embeds.dtype))
    with torch.no_grad():
        out = reference.generate(
            input_ids=ids, inputs_embeds=embeds, attention_mask=mask, eos_token_id=eos,
            pad_token_id=PAD, bos_token_id=BOS, **options,
        )
    per_prompt = options.get("num_return_sequences", 1)
    results = []
    for row in out[:, ids.shape[1] :].tolist():
        ends = [i for i, t in enumerate(row) if t in eos]
        if ends:
            results.append((row[: ends[0] + 1], "stop"))
        else:
            results.append((row, "length"))
    return [results[i : i + per_prompt] for i in range(0, len(results), per_prompt)]


def ours_generate(ours, prefix, prompts, eos, **options) -> list[list[tuple]]:
    params = GenerationParams.from_dict(options)
    outputs = generate(ours, prefix, prompts, params, eos_token_ids=eos, pad_token_id=PAD,
                       image_token_id=IMAGE)
    return [[(o.token_ids, o.finish_reason) for o in row] for row in outputs]


@pytest.fixture(scope="module")
def eos(models):
    """An eos id the model really produces: the commonest later token of 4-beam search."""
    _, ours, prefix = models
    plain = ours_generate(ours, prefix, PROMPTS, [], max_new_tokens=MAX_NEW, num_beams=4,
                          num_return_sequences=4)
    later = [t for row in plain for ids, _ in row for t in ids[1:]]
    return [max(set(later), key=later.count)]


CASES = {
    "greedy": dict(),
    "greedy-penalty-min-new": dict(repetition_penalty=1.5, min_new_tokens=4),
    "beam3": dict(num_beams=3),
    "beam4-lp0-early": dict(num_beams=4, length_penalty=0.0, early_stopping=True),
    "beam4-lp2-two-returned": dict(num_beams=4, length_penalty=2.0, num_return_sequences=2),
    "beam3-never": dict(num_beams=3, early_stopping="never"),
    "beam3-early-two-returned": dict(num_beams=3, early_stopping=True, num_return_sequences=2),
    "beam3-penalty-min-new": dict(num_beams=3, repetition_penalty=1.3, min_new_tokens=3),
}


@pytest.mark.parametrize("options", CASES.values(), ids=CASES.keys())
def test_tokens_identical_to_reference(models, eos, options):
    reference, ours, prefix = models
    options = dict(max_new_tokens=MAX_NEW, **options)
    expected = reference_generate(reference, prefix, PROMPTS, eos, **options)
    got = ours_generate(ours, prefix, PROMPTS, eos, **options)
    assert got == expected


def test_eos_and_length_endings_are_both_exercised(models, eos):
    _, ours, prefix = models
    for options in (dict(repetition_penalty=1.5, min_new_tokens=4),
                    dict(num_beams=3, early_stopping=True, num_return_sequences=2)):
        out = ours_generate(ours, prefix, PROMPTS, eos, max_new_tokens=MAX_NEW, **options)
        stopped = [ids for row in out for ids, r in row if r == "stop"]
        assert stopped and all(ids[-1] == eos[0] for ids in stopped)
        assert any(len(ids) < MAX_NEW for ids in stopped)
        assert any(r == "length" for row in out for _, r in row)


def test_seeded_sampling_draws_like_the_reference(models, eos):
    """Same seed, same draws: the reference samples from torch's global RNG."""
    reference, ours, prefix = models
    options = dict(max_new_tokens=MAX_NEW, do_sample=True, temperature=0.7, top_k=20, top_p=0.9,
                   num_return_sequences=2)
    torch.manual_seed(1234)
    expected = reference_generate(reference, prefix, PROMPTS, eos, **options)
    got = ours_generate(ours, prefix, PROMPTS, eos, seed=1234, **options)
    assert got == expected


def test_single_row_without_padding(models, eos):
    reference, ours, prefix = models
    prompts, one = PROMPTS[1:2], prefix[1:2]
    for options in (dict(), dict(num_beams=3, num_return_sequences=3)):
        options = dict(max_new_tokens=MAX_NEW, **options)
        expected = reference_generate(reference, one, prompts, eos, **options)
        assert ours_generate(ours, one, prompts, eos, **options) == expected


def test_batch_invariance(models, eos):
    """A row gives the same tokens alone and inside a padded batch."""
    _, ours, prefix = models
    batch = ours_generate(ours, prefix, PROMPTS, eos, max_new_tokens=MAX_NEW, num_beams=3)
    for i, prompt in enumerate(PROMPTS):
        alone = ours_generate(ours, prefix[i : i + 1], [prompt], eos, max_new_tokens=MAX_NEW,
                              num_beams=3)
        assert alone[0] == batch[i]
