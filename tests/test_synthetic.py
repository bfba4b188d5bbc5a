"""The synthetic scene generator: deterministic, varied, and every description unambiguous."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np

from blipserve.train.synthetic import (
    COLORS,
    GRID,
    SHAPES,
    caption,
    cell_labels,
    questions,
    render,
    samples,
    scenes,
)


def test_same_seed_same_scenes_and_pixels():
    a, b = scenes(20, seed=5), scenes(20, seed=5)
    assert a == b
    assert np.array_equal(np.asarray(render(a[3])), np.asarray(render(b[3])))
    assert scenes(20, seed=6) != a


def test_coverage_of_the_domain():
    """>= 4 shapes x >= 6 colours, both sizes, 1-3 objects, every grid cell, 3 backgrounds."""
    many = scenes(600, seed=1)
    objects = [o for s in many for o in s.objects]
    assert len(SHAPES) >= 4 and len(COLORS) >= 6
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.color for o in objects} == set(COLORS)
    assert {o.size for o in objects} == {"small", "big"}
    assert Counter(len(s.objects) for s in many).keys() == {1, 2, 3}
    assert {(o.row, o.col) for o in objects} == {(r, c) for r in range(GRID) for c in range(GRID)}
    assert {s.background for s in many} == {"plain", "tinted", "noisy"}


def test_descriptions_are_unambiguous():
    """Distinct shapes and colours in a scene; objects on one row or column, in order."""
    for scene in scenes(300, seed=2):
        shapes = [o.shape for o in scene.objects]
        colors = [o.color for o in scene.objects]
        assert len(set(shapes)) == len(shapes) and len(set(colors)) == len(colors)
        cells = [(o.row, o.col) for o in scene.objects]
        assert cells == sorted(cells) and len(set(cells)) == len(cells)
        if len(cells) > 1:
            assert len({r for r, _ in cells}) == 1 or len({c for _, c in cells}) == 1


def test_caption_grammar():
    for scene in scenes(200, seed=3):
        text = caption(scene)
        n = len(scene.objects)
        assert text.startswith("a ") and text.count("a small ") + text.count("a big ") == n
        if n == 2:
            assert (" to the left of " in text) != (" above " in text)
        if n == 3:
            assert text.endswith(" in a row") or text.endswith(" in a column")


def test_questions_have_the_right_answers():
    rng = random.Random(0)
    for scene in scenes(200, seed=4):
        by_shape = {o.shape: o for o in scene.objects}
        for question, answer in questions(scene, rng):
            words = question.rstrip("?").split()
            if question.startswith("what color is the"):
                assert by_shape[words[-1]].color == answer
            elif question.startswith("how many"):
                assert answer == ["one", "two", "three"][len(scene.objects) - 1]
            elif question.startswith("is there a"):
                color, shape = words[-2], words[-1]
                present = any(o.color == color and o.shape == shape for o in scene.objects)
                assert answer == ("yes" if present else "no")


def test_rendered_objects_are_where_the_scene_says():
    """Each object's grid cell holds pixels of its colour; empty cells hold none of them."""
    cell = 192 // GRID
    for scene in scenes(40, seed=7):
        image = np.asarray(render(scene, size=192)).astype(int)
        occupied = {(o.row, o.col): o for o in scene.objects}
        for row in range(GRID):
            for col in range(GRID):
                region = image[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell]
                for name, rgb in COLORS.items():
                    close = (np.abs(region - np.array(rgb)).max(axis=-1) < 40).sum()
                    obj = occupied.get((row, col))
                    if obj is not None and obj.color == name:
                        assert close >= 30, (obj, close)
                    elif obj is None:
                        assert close == 0, (row, col, name, close)


def test_cell_labels_mark_objects_only():
    scene = scenes(1, seed=9)[0]
    labels = cell_labels(scene)
    assert len(labels) == GRID * GRID
    assert sum(label > 0 for label in labels) == len(scene.objects)


def test_samples_mix_captions_and_questions():
    out = list(samples(5, seed=8, vqa_per_image=2))
    assert len(out) == 15
    assert [s.prompt == "" for s in out].count(True) == 5
    assert all(
        s.prompt.startswith("Question: ") and s.prompt.endswith(" Answer:") for s in out if s.prompt
    )
