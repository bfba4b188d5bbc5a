"""Our encoder-decoder generation against transformers' ``Blip2ForConditionalGeneration
.generate`` on tiny random BLIP-2 Flan-T5 checkpoints, in float32, token for token.

The reference runs from pixels and ids as ``Blip2Processor`` hands them over with the T5
tokenizer's (right) padding: ``[<image> x Q | prompt ids </s> | pad ...]``. Ours loads the
saved checkpoint with the loader, computes the prefix once per image and runs the engine.
Two eos ids are picked among the tokens the random model likes (the checkpoint's own eos,
``</s>``, is rarely produced by random weights), so endings, the penalties and the beam
stopping rules all change the outcome; the ``*_matters`` tests check that.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import pytest
import torch

from blipserve.engine.generate import GenerationParams, generate, stream
from blipserve.model.blip2 import Blip2Config, Blip2Model
from blipserve.testing import checkpoints
from blipserve.weights import load_model

EOS = 1  # T5's </s>: every prompt ends with it
PROMPTS = [[EOS], [5, 17, 30, EOS], [40, 41, 42, 43, 44, 45, 46, 47, EOS]]
MAX_NEW = 12


@dataclass(frozen=True)
class Setup:
    reference: torch.nn.Module
    ours: Blip2Model
    pixels: torch.Tensor  # (B, 3, 224, 224)
    eos: list[int]
    common: tuple[int, ...] = ()  # the model's favourite tokens after the first, commonest first

    @property
    def image(self) -> int:
        return self.reference.config.image_token_index

    @property
    def queries(self) -> int:
        return self.reference.config.num_query_tokens

    def run_reference(self, prompts=PROMPTS, rows=None, **options) -> list[list[tuple]]:
        """Reference outputs as ``(new token ids, finish reason)``, grouped per prompt."""
        pixels = self.pixels if rows is None else self.pixels[rows]
        width = max(map(len, prompts))
        ids = [[self.image] * self.queries + p + [0] * (width - len(p)) for p in prompts]
        mask = [[1] * (self.queries + len(p)) + [0] * (width - len(p)) for p in prompts]
        with torch.no_grad():
            out = self.reference.generate(
                pixel_values=pixels,
                input_ids=torch.tensor(ids),
                attention_mask=torch.tensor(mask),
                eos_token_id=self.eos,
                **options,
            )
        assert (out[:, 0] == 0).all(), "the reference returns the decoder start token first"
        results = []
        for row in out[:, 1:].tolist():
            ends = [i for i, t in enumerate(row) if t in self.eos]
            results.append((row[: ends[0] + 1], "stop") if ends else (row, "length"))
        n = options.get("num_return_sequences", 1)
        return [results[i : i + n] for i in range(0, len(results), n)]

    def prefix(self, rows=None) -> torch.Tensor:
        with torch.no_grad():
            return self.ours.image_prefix(self.pixels if rows is None else self.pixels[rows])

    def run_ours(self, prompts=PROMPTS, rows=None, **options) -> list[list[tuple]]:
        outputs = generate(
            self.ours.language_model,
            self.prefix(rows),
            prompts,
            GenerationParams.from_dict(options),
            eos_token_ids=self.eos,
            pad_token_id=0,
            image_token_id=self.image,
        )
        return [[(o.token_ids, o.finish_reason) for o in row] for row in outputs]


def make_setup(tmp_path, variant: int) -> Setup:
    reference = checkpoints.build_t5_reference(tmp_path, variant=variant, seed=variant)
    directory = checkpoints.save_checkpoint(reference, tmp_path, "single")
    config = Blip2Config.from_hf(json.loads((directory / "config.json").read_text()))
    ours = load_model(directory, config, dtype=torch.float32)
    pixels = torch.randn(len(PROMPTS), 3, 224, 224, generator=torch.Generator().manual_seed(9))
    probe = Setup(reference, ours, pixels, eos=[EOS])
    beams = probe.run_ours(max_new_tokens=MAX_NEW, num_beams=4, num_return_sequences=4)
    later = [t for row in beams for ids, _ in row for t in ids[1:]]
    common = sorted(set(later), key=lambda t: (-later.count(t), t))
    return replace(probe, eos=[EOS, *common[:2]], common=tuple(common))


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    return make_setup(tmp_path_factory.mktemp("t5-generation"), variant=0)


CASES = {
    "greedy": dict(),
    "greedy-penalty": dict(repetition_penalty=1.5),
    "greedy-penalty-min-new": dict(repetition_penalty=1.3, min_new_tokens=4),
    "beam3": dict(num_beams=3),
    "beam3-lp-neg": dict(num_beams=3, length_penalty=-1.0),
    "beam4-lp0-early": dict(num_beams=4, length_penalty=0.0, early_stopping=True),
    "beam4-lp2-early": dict(num_beams=4, length_penalty=2.0, early_stopping=True),
    "beam4-lp2-never": dict(num_beams=4, length_penalty=2.0, early_stopping="never"),
    "beam4-two-returned": dict(num_beams=4, length_penalty=2.0, num_return_sequences=2),
    "beam3-penalty-min-new": dict(num_beams=3, repetition_penalty=1.5, min_new_tokens=3),
    "beam3-penalty-below-one": dict(num_beams=3, repetition_penalty=0.7, length_penalty=0.0),
}


@pytest.mark.parametrize("options", CASES.values(), ids=CASES.keys())
def test_tokens_identical_to_reference(setup, options):
    options = dict(max_new_tokens=MAX_NEW, **options)
    assert setup.run_ours(**options) == setup.run_reference(**options)


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


def test_stream_yields_the_generated_tokens(setup):
    options = dict(max_new_tokens=MAX_NEW, repetition_penalty=1.5)
    events = list(
        stream(
            setup.ours.language_model,
            setup.prefix(),
            PROMPTS,
            GenerationParams.from_dict(options),
            eos_token_ids=setup.eos,
            pad_token_id=0,
            image_token_id=setup.image,
        )
    )
    for row, expected in enumerate(setup.run_reference(**options)):
        ids = [e.token_id for e in events if e.row == row]
        reasons = [e.finish_reason for e in events if e.row == row and e.finished]
        assert [(ids, reasons[0])] == expected


@pytest.mark.parametrize("variant", [1, 2])
def test_other_shapes_match_reference(tmp_path, variant):
    """Other depths (encoder deeper than the decoder), widths, head counts, bucket tables
    and query counts."""
    other = make_setup(tmp_path, variant)
    for options in (
        dict(),
        dict(num_beams=3, num_return_sequences=2),
        dict(repetition_penalty=2.0),
    ):
        options = dict(max_new_tokens=MAX_NEW, **options)
        assert other.run_ours(**options) == other.run_reference(**options), options


def test_batch_invariance(setup):
    """A row gives the same tokens alone and inside a padded batch."""
    batch = setup.run_ours(max_new_tokens=MAX_NEW, num_beams=3)
    for i, prompt in enumerate(PROMPTS):
        alone = setup.run_ours([prompt], rows=[i], max_new_tokens=MAX_NEW, num_beams=3)
        assert alone[0] == batch[i]


# -- the cases above are only as good as the model makes them: check they discriminate -----


def test_outputs_depend_on_the_image_and_the_prompt(setup):
    same_prompt = setup.run_ours([PROMPTS[1]] * 3, max_new_tokens=MAX_NEW)
    assert len({tuple(row[0][0]) for row in same_prompt}) >= 2
    same_image = setup.run_ours(PROMPTS, rows=[0, 0, 0], max_new_tokens=MAX_NEW)
    assert len({tuple(row[0][0]) for row in same_image}) >= 2


def test_both_endings_occur(setup):
    outs = [
        setup.run_ours(max_new_tokens=MAX_NEW, **CASES[name])
        for name in ("greedy", "greedy-penalty", "beam4-lp2-early")
    ]
    endings = [(len(ids), reason) for out in outs for row in out for ids, reason in row]
    assert any(reason == "stop" and n < MAX_NEW for n, reason in endings)
    assert any(reason == "length" for _, reason in endings)


def test_early_stopping_modes_matter(setup):
    outs = [
        setup.run_ours(max_new_tokens=MAX_NEW, num_beams=4, length_penalty=2.0, early_stopping=mode)
        for mode in (False, True, "never")
    ]
    assert outs[0] != outs[1] or outs[0] != outs[2]


def test_penalty_sees_the_decoder_start_token(setup):
    """The reference penalises the decoder's ids only, the start token (0) among them: with
    id 0 made a favourite on both sides, a strong penalty changes what we pick alike."""
    heads = [
        setup.ours.language_model.lm_head.weight,
        setup.reference.language_model.lm_head.weight,
    ]
    originals = [head[0].clone() for head in heads]
    options = dict(max_new_tokens=MAX_NEW, repetition_penalty=3.0)
    with torch.no_grad():
        try:
            for head in heads:
                head[0] = 2 * head[setup.common[0]]  # id 0 now scores high (no near-ties)
            unpenalised = setup.run_ours(max_new_tokens=MAX_NEW)
            assert any(0 in ids for row in unpenalised for ids, _ in row)
            assert setup.run_ours(**options) == setup.run_reference(**options)
        finally:
            for head, original in zip(heads, originals, strict=True):
                head[0] = original
