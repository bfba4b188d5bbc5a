"""Exact-match evaluation on held-out synthetic scenes (the demo model's quality bar).

Scenes come from a seed that no training step uses (:data:`EVAL_SEED`); every caption and
every answer has exactly one right string, so accuracy is plain exact match after the
pipeline's usual decoding (special tokens skipped, whitespace stripped).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from blipserve.api import Pipeline
from blipserve.train.synthetic import caption, questions, render, scenes, vqa_prompt

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
    rng = random.Random(seed)
    held_out = scenes(count, seed)
    images = [render(scene) for scene in held_out]
    captions = [caption(scene) for scene in held_out]
    got_captions: list[str] = []
    for start in range(0, count, batch_size):
        got_captions += pipe.caption(images[start : start + batch_size], max_new_tokens=40)

    asked = [(i, q, a) for i, s in enumerate(held_out) for q, a in questions(s, rng)]
    answers: list[str] = []
    for start in range(0, len(asked), batch_size):
        chunk = asked[start : start + batch_size]
        rows = pipe.generate(
            [images[i] for i, _, _ in chunk], [vqa_prompt(q) for _, q, _ in chunk], max_new_tokens=8
        )
        answers += [row[0].text for row in rows]

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
