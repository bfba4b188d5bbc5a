"""Exact-match evaluation on held-out synthetic scenes (the demo model's quality bar).

Scenes come from a seed that no training step uses (:data:`EVAL_SEED`); every caption and
every answer has exactly one right string, so accuracy is plain exact match after the
pipeline's usual decoding (special tokens skipped, whitespace stripped).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from blipserve.api import Pipeline
from blipserve.engine.generate import generate
from blipserve.engine.params import GenerationParams
from blipserve.model.opt import OPTForCausalLM
from blipserve.processing.tokenizer import Tokenizer
from blipserve.train.pretrain import cell_token_ids
from blipserve.train.synthetic import Scene, caption, questions, render, scenes, vqa_prompt

EVAL_SEED = 1000  # held out: the demo recipe trains on seeds 1, 2 and 3 only


@dataclass
class EvalReport:
    images: int
    caption_accuracy: float
    vqa_accuracy: float
    vqa_by_question: dict[str, float] = field(default_factory=dict)
    caption_mistakes: list[tuple[str, str]] = field(default_factory=list)  # (expected, got)

    def summary(self) -> str:
        lines = [
            f"{self.images} held-out images",
            f"caption exact match: {self.caption_accuracy:.1%}",
            f"VQA exact match:     {self.vqa_accuracy:.1%}",
        ]
        lines += [f"  {kind:10s} {acc:.1%}" for kind, acc in sorted(self.vqa_by_question.items())]
        return "\n".join(lines)


def question_kind(question: str) -> str:
    """'what color is the circle?' -> 'color'; 'is there a ...?' -> 'yes/no'."""
    for kind in ("color", "shape", "size", "how many", "where"):
        if kind in question:
            return {"how many": "count", "where": "position"}.get(kind, kind)
    return "yes/no"


def evaluate_synthetic(
    pipe: Pipeline, count: int = 500, seed: int = EVAL_SEED, batch_size: int = 32
) -> EvalReport:
    """Caption every scene and ask each of its questions; greedy decoding."""
    held_out = scenes(count, seed)
    images = [render(scene) for scene in held_out]

    def complete(indices: list[int], prompts: list[str], max_new_tokens: int) -> list[str]:
        rows = pipe.generate([images[i] for i in indices], prompts, max_new_tokens=max_new_tokens)
        return [row[0].text for row in rows]

    return _exact_match(held_out, seed, complete, batch_size)


@torch.no_grad()
def evaluate_language_model(
    lm: OPTForCausalLM,
    tokenizer: Tokenizer,
    count: int = 500,
    seed: int = EVAL_SEED,
    batch_size: int = 64,
) -> EvalReport:
    """The demo recipe's decoder alone, reading each scene's true cell tokens where the
    query outputs will go: the best stage 2 can do with this frozen decoder."""
    held_out = scenes(count, seed)
    eos = lm.config.eos_token_id

    def complete(indices: list[int], prompts: list[str], max_new_tokens: int) -> list[str]:
        cells = torch.tensor([cell_token_ids(tokenizer, held_out[i]) for i in indices])
        rows = generate(
            lm,
            lm.embed_tokens(cells),  # (B, 9, D)
            tokenizer.encode_batch(prompts),
            GenerationParams(max_new_tokens=max_new_tokens),
            eos_token_ids=[eos] if isinstance(eos, int) else list(eos),
            pad_token_id=tokenizer.pad_token_id,
            image_token_id=None,
        )
        return tokenizer.decode_batch([row[0].token_ids for row in rows])

    return _exact_match(held_out, seed, complete, batch_size)


Complete = Callable[[list[int], list[str], int], list[str]]  # scene indices, prompts, limit


def _exact_match(held_out: list[Scene], seed: int, complete: Complete, batch: int) -> EvalReport:
    rng = random.Random(seed)
    count = len(held_out)
    captions = [caption(scene) for scene in held_out]
    got_captions: list[str] = []
    for start in range(0, count, batch):
        indices = list(range(start, min(start + batch, count)))
        got_captions += complete(indices, [""] * len(indices), 40)

    asked = [(i, q, a) for i, s in enumerate(held_out) for q, a in questions(s, rng)]
    answers: list[str] = []
    for start in range(0, len(asked), batch):
        chunk = asked[start : start + batch]
        answers += complete([i for i, _, _ in chunk], [vqa_prompt(q) for _, q, _ in chunk], 8)

    right, total = Counter(), Counter()
    for (_, question, answer), got in zip(asked, answers, strict=True):
        kind = question_kind(question)
        total[kind] += 1
        right[kind] += got == answer
    mistakes = [(e, g) for e, g in zip(captions, got_captions, strict=True) if e != g]
    return EvalReport(
        images=count,
        caption_accuracy=1 - len(mistakes) / count,
        vqa_accuracy=sum(right.values()) / len(asked),
        vqa_by_question={kind: right[kind] / total[kind] for kind in total},
        caption_mistakes=mistakes,
    )
