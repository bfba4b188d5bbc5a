"""Our generate against the reference's, in BLIP-2's setting without the vision side.

The reference call mirrors ``Blip2ForConditionalGeneration.generate`` (transformers 5.x):
input_ids ``[pad ... | <image> x Q | </s> prompt]`` left-padded, ``inputs_embeds`` with the
prefix scattered over the ``<image>`` slots, the attention mask, and the generation options.

The special ids are picked among the tokens this random model likes to produce (two eos ids,
``<image>`` and ``<pad>``), so that eos endings, the repetition penalty over image and pad
ids, and the beam stopping rules all change the outcome; the ``*_matters`` tests check that.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from blipserve.engine.generate import GenerationParams, generate
from blipserve.testing.reference import TINY_OPT, left_padded, ours_from, reference_opt

BOS = 2
Q = 6
PROMPTS = [[BOS], [BOS, 17, 230, 5], [BOS, 400, 401, 402, 403, 404, 405]]
MAX_NEW = 14


@dataclass(frozen=True)
class Setup:
    reference: torch.nn.Module
    ours: torch.nn.Module
    prefix: torch.Tensor  # (B, Q, D)
    eos: list[int]
    image: int | None
    pad: int
    common: tuple[int, ...] = ()  # the model's favourite later tokens, commonest first

    def run_reference(self, prompts=PROMPTS, prefix=None, **options) -> list[list[tuple]]:
        """Reference outputs as ``(new token ids, finish reason)``, grouped per prompt."""
        prefix = self.prefix if prefix is None else prefix
        ids, mask = left_padded([[self.image] * Q + p for p in prompts], pad=self.pad)
        embeds = self.reference.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter((ids == self.image)[..., None], prefix)
        with torch.no_grad():
            out = self.reference.generate(
                input_ids=ids,
                inputs_embeds=embeds,
                attention_mask=mask,
                eos_token_id=self.eos,
                pad_token_id=self.pad,
                bos_token_id=BOS,
                **options,
            )
        results = []
        for row in out[:, ids.shape[1] :].tolist():
            ends = [i for i, t in enumerate(row) if t in self.eos]
            results.append((row[: ends[0] + 1], "stop") if ends else (row, "length"))
        n = options.get("num_return_sequences", 1)
        return [results[i : i + n] for i in range(0, len(results), n)]

    def run_ours(self, prompts=PROMPTS, prefix=None, **options) -> list[list[tuple]]:
        prefix = self.prefix if prefix is None else prefix
        outputs = generate(
            self.ours,
            prefix,
            prompts,
            GenerationParams.from_dict(options),
            eos_token_ids=self.eos,
            pad_token_id=self.pad,
            image_token_id=self.image,
        )
        return [[(o.token_ids, o.finish_reason) for o in row] for row in outputs]


@pytest.fixture(scope="module")
def setup() -> Setup:
    reference = reference_opt(seed=7, tie_word_embeddings=False)
    width = TINY_OPT["hidden_size"]
    prefix = torch.randn(len(PROMPTS), Q, width, generator=torch.Generator().manual_seed(4))
    probe = Setup(reference, ours_from(reference), prefix, eos=[], image=999, pad=1)
    beams = probe.run_ours(max_new_tokens=MAX_NEW, num_beams=4, num_return_sequences=4)
    later = [t for row in beams for ids, _ in row for t in ids[1:]]
    common = sorted(set(later), key=lambda t: (-later.count(t), t))
    return Setup(
        reference,
        probe.ours,
        prefix,
        eos=common[1:3],
        image=common[0],
        pad=common[3],
        common=tuple(common),
    )


CASES = {
    "greedy": dict(),
    "greedy-penalty": dict(repetition_penalty=1.5),
    "greedy-penalty-min-new": dict(repetition_penalty=1.3, min_new_tokens=4),
    "beam3": dict(num_beams=3),
    "beam3-lp-neg": dict(num_beams=3, length_penalty=-1.0),
    "beam4-lp0-early": dict(num_beams=4, length_penalty=0.0, early_stopping=True),
    "beam4-lp2": dict(num_beams=4, length_penalty=2.0),
    "beam4-lp2-early": dict(num_beams=4, length_penalty=2.0, early_stopping=True),
    "beam4-lp2-never": dict(num_beams=4, length_penalty=2.0, early_stopping="never"),
    "beam4-lp2-two-returned": dict(num_beams=4, length_penalty=2.0, num_return_sequences=2),
    "beam3-early-three-returned": dict(num_beams=3, early_stopping=True, num_return_sequences=3),
    "beam3-penalty-min-new": dict(num_beams=3, repetition_penalty=1.5, min_new_tokens=3),
    "beam4-strong-penalty": dict(num_beams=4, repetition_penalty=2.0),
    "beam3-penalty-below-one": dict(num_beams=3, repetition_penalty=0.7, length_penalty=0.0),
}


@pytest.mark.parametrize("options", CASES.values(), ids=CASES.keys())
def test_tokens_identical_to_reference(setup, options):
    options = dict(max_new_tokens=MAX_NEW, **options)
    assert setup.run_ours(**options) == setup.run_reference(**options)


@pytest.mark.parametrize("options", [dict(), dict(num_beams=3)], ids=["greedy", "beam3"])
def test_min_new_tokens_boundary_matches_reference(setup, options):
    """With min_new_tokens = j an eos at index j is allowed; with j + 1 it is not."""
    plain = setup.run_ours(max_new_tokens=MAX_NEW, **options)
    j = min(len(ids) - 1 for row in plain for ids, r in row if r == "stop" and len(ids) > 1)
    for m in (j, j + 1):
        params = dict(max_new_tokens=MAX_NEW, min_new_tokens=m, **options)
        assert setup.run_ours(**params) == setup.run_reference(**params), m


def test_many_eos_ids_keep_enough_candidates(setup):
    """With E eos ids the reference ranks (1 + E) * K candidates, so K beams stay alive."""
    many = Setup(**{**setup.__dict__, "eos": list(setup.common[1:5])})
    for options in (dict(num_beams=3), dict(num_beams=2, length_penalty=0.0)):
        options = dict(max_new_tokens=MAX_NEW, **options)
        assert many.run_ours(**options) == many.run_reference(**options)


def test_seeded_sampling_draws_like_the_reference(setup):
    """Same seed, same draws: the reference samples from torch's global RNG."""
    options = dict(
        max_new_tokens=MAX_NEW,
        do_sample=True,
        temperature=0.7,
        top_k=20,
        top_p=0.9,
        num_return_sequences=2,
        repetition_penalty=1.2,
    )
    torch.manual_seed(1234)
    expected = setup.run_reference(**options)
    assert setup.run_ours(seed=1234, **options) == expected


def test_single_row_without_padding(setup):
    prompts, prefix = PROMPTS[1:2], setup.prefix[1:2]
    for options in (dict(), dict(num_beams=3, num_return_sequences=3)):
        options = dict(max_new_tokens=MAX_NEW, **options)
        expected = setup.run_reference(prompts, prefix, **options)
        assert setup.run_ours(prompts, prefix, **options) == expected


def test_batch_invariance(setup):
    """A row gives the same tokens alone and inside a padded batch."""
    batch = setup.run_ours(max_new_tokens=MAX_NEW, num_beams=3)
    for i, prompt in enumerate(PROMPTS):
        alone = setup.run_ours(
            [prompt], setup.prefix[i : i + 1], max_new_tokens=MAX_NEW, num_beams=3
        )
        assert alone[0] == batch[i]


# -- the cases above are only as good as the model makes them: check they discriminate -----


def test_both_endings_occur(setup):
    for options in (CASES["greedy-penalty"], CASES["beam4-lp2-early"]):
        out = setup.run_ours(max_new_tokens=MAX_NEW, **options)
        stopped = [ids for row in out for ids, r in row if r == "stop"]
        assert stopped and all(ids[-1] in setup.eos for ids in stopped)
        assert any(len(ids) < MAX_NEW for ids in stopped)
        assert any(r == "length" for row in out for _, r in row)


def test_early_stopping_modes_matter(setup):
    outs = [
        setup.run_ours(max_new_tokens=MAX_NEW, num_beams=4, length_penalty=2.0, early_stopping=mode)
        for mode in (False, True, "never")
    ]
    assert outs[0] != outs[1] and outs[0] != outs[2]


@pytest.mark.parametrize("options", [dict(), dict(num_beams=3)], ids=["greedy", "beam3"])
def test_penalty_over_image_ids_matters(setup, options):
    options = dict(max_new_tokens=MAX_NEW, repetition_penalty=1.5, **options)
    without_image_ids = Setup(**{**setup.__dict__, "image": None})
    assert setup.run_ours(**options) != without_image_ids.run_ours(**options)
