"""The synthetic scene generator: deterministic, varied, and every description unambiguous."""

from __future__ import annotations

import colorsys
import itertools
import random
from collections import Counter

import numpy as np
import pytest

from blipserve.train import drawn
from blipserve.train.synthetic import (
    BACKGROUNDS,
    COLOR_RANGES,
    COLORS,
    DONT_KNOW,
    GAP,
    MARGIN,
    SHAPES,
    SIZE_RANGES,
    caption,
    object_map,
    outline,
    questions,
    render,
    samples,
    scene_tokens,
    scenes,
    shade,
    texts,
)


def test_same_seed_same_scenes_and_pixels():
    a, b = scenes(20, seed=5), scenes(20, seed=5)
    assert a == b
    assert np.array_equal(np.asarray(render(a[3])), np.asarray(render(b[3])))
    assert scenes(20, seed=6) != a


def test_coverage_of_the_world():
    """Every shape, colour, size, layout and background; repeats; sizes across the range;
    objects all over the image, rotated both ways."""
    many = scenes(800, seed=1)
    objects = [o for s in many for o in s.objects]
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.color for o in objects} == set(COLORS)
    assert {o.size for o in objects} == {"small", "big"}
    assert Counter(len(s.objects) for s in many).keys() == {1, 2, 3}
    assert {s.layout for s in many} == {"single", "row", "column"}
    assert {s.background for s in many} == set(BACKGROUNDS)
    assert {s.antialias for s in many} == {True, False}
    assert any(len({o.shape for o in s.objects}) < len(s.objects) for s in many)
    extents = [o.extent for o in objects]
    assert min(extents) < 0.11 and max(extents) > 0.6
    xs, ys = [o.center[0] for o in objects], [o.center[1] for o in objects]
    assert min(xs) < 0.15 and max(xs) > 0.85 and min(ys) < 0.15 and max(ys) > 0.85
    angles = [o.angle for o in objects]
    assert min(angles) < -10 and max(angles) > 10


def test_sizes_never_fall_in_the_gap():
    for obj in (o for s in scenes(500, seed=2) for o in s.objects):
        low, high = SIZE_RANGES[obj.size]
        assert low <= obj.extent <= high
    assert SIZE_RANGES["small"][1] < SIZE_RANGES["big"][0]


def test_layouts_are_unambiguous():
    """Objects (as drawn, rotated) inside the image, in caption order along the layout's
    axis with a clear gap, and lined up across it (centres nearer than the smaller
    object's half size)."""
    for scene in scenes(400, seed=3):
        boxes = []
        for obj in scene.objects:
            points = np.array(outline(obj, 1.0))
            assert points.min() >= MARGIN and points.max() <= 1 - MARGIN
            boxes.append((points.min(0), points.max(0), np.array(obj.center), obj.extent))
        if scene.layout == "single":
            continue
        axis = 0 if scene.layout == "row" else 1
        for (_, a_high, a, ea), (b_low, _, b, eb) in itertools.pairwise(boxes):
            assert b_low[axis] - a_high[axis] >= GAP  # in order, apart
            assert abs(b[1 - axis] - a[1 - axis]) <= min(ea, eb) / 2


def test_pixels_show_the_objects_in_their_colours():
    """Where the object map says an object is, the image has that object's colour."""
    for scene in scenes(40, seed=8):
        image = np.asarray(render(scene, 192)).astype(int)
        where = object_map(scene, 192)
        for index, obj in enumerate(scene.objects, start=1):
            inside = image[where == index]
            assert len(inside) > 0.5 * (obj.extent * 192) ** 2 * 0.4
            assert np.abs(np.median(inside, axis=0) - obj.rgb).max() < 40


def test_every_shade_is_its_colour_and_no_other():
    rng = random.Random(0)
    for color in COLORS:
        for _ in range(50):
            assert nearest_colour(shade(color, rng)) == color


def nearest_colour(rgb: tuple[int, int, int]) -> str:
    """The colour whose HSV box holds ``rgb``."""
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    found = []
    for name, ((h0, h1), (s0, s1), (v0, v1)) in COLOR_RANGES.items():
        hue_in = h0 - 1e-3 <= h <= h1 + 1e-3 or h0 - 1e-3 <= h - 1 <= h1 + 1e-3
        if hue_in and s0 - 1e-3 <= s <= s1 + 1e-3 and v0 - 1e-3 <= v <= v1 + 1e-3:
            found.append(name)
    assert len(found) == 1, (rgb, found)
    return found[0]


def test_caption_grammar():
    for scene in scenes(200, seed=3):
        text = caption(scene)
        n = len(scene.objects)
        assert text.startswith("a ") and text.count("a small ") + text.count("a big ") == n
        if n == 2:
            assert (" to the left of " in text) != (" above " in text)
        if n == 3:
            assert text.endswith(" in a row") or text.endswith(" in a column")
        assert scene_tokens(scene)[0] == f"<layout:{scene.layout}>"


def test_questions_have_the_right_answers():
    """Answers checked against the scene by separate reasoning for each kind."""
    rng = random.Random(0)
    kinds = Counter()
    for scene in scenes(300, seed=4):
        objs = scene.objects
        for qa in questions(scene, rng):
            kinds[qa.kind] += 1
            q = qa.question
            if qa.kind == "count":
                counted = [o for o in objs if _mentions(q, o)]
                assert qa.answer == ["zero", "one", "two", "three"][len(counted)], q
            elif qa.kind == "yes/no":
                present = any(_mentions(q, o) for o in objs)
                assert qa.answer == ("yes" if present else "no"), q
            elif qa.kind in ("color", "shape", "size"):
                matching = [o for o in objs if _mentions(q, o)] if " it" not in q else objs
                assert len(matching) == 1, q  # the question picks out one object
                assert qa.answer == getattr(matching[0], qa.kind), q
            elif qa.kind == "position" and q.startswith("where"):
                (obj,) = [o for o in objs if _mentions(q, o)]
                place = objs.index(obj)
                assert qa.answer.endswith(
                    {0: ("left", "top"), len(objs) - 1: ("right", "bottom")}.get(place, "middle")
                ), q
            elif qa.kind == "describe":
                assert qa.answer == caption(scene)
            elif qa.kind == "unknown":
                assert qa.answer == DONT_KNOW
    assert set(kinds) == {
        "color", "shape", "size", "count", "yes/no", "position", "describe", "unknown"
    }  # fmt: skip


def _mentions(question: str, obj) -> bool:
    """Every colour, shape and size word in ``question`` fits ``obj``."""
    question = question.replace("how big", "how")  # a size question, not a size word
    words = [w.rstrip("s") if w.rstrip("s") in SHAPES else w for w in question.rstrip("?").split()]
    for word in words:
        if word in SHAPES and word != obj.shape:
            return False
        if word in COLORS and word != obj.color:
            return False
        either_size = "big or small" in question or "small or big" in question
        if word in ("small", "big") and word != obj.size and not either_size:
            return False
    return True


def test_conversations_repeat_earlier_turns():
    rng = random.Random(1)
    prompts = [p for s in scenes(100, seed=5) for p, _ in texts(s, rng, 8)]
    follow_ups = [p for p in prompts if p.count("Question:") > 1]
    assert 0.15 < len(follow_ups) / len(prompts) < 0.45
    assert max(p.count("Question:") for p in prompts) >= 6


def test_training_samples_pair_images_with_texts():
    got = list(samples(5, seed=9, questions_per_scene=3))
    assert len(got) == 5 * 4
    assert all(s.prompt.endswith("Answer:") for s in got if s.prompt)
    assert sum(s.prompt == "" for s in got) == 5


@pytest.mark.parametrize("color", COLORS)
def test_independent_shades_lie_in_the_colour_ranges(color):
    for rgb in drawn.SHADES[color]:
        assert nearest_colour(rgb) == color


def test_independent_scenes_keep_the_worlds_rules():
    """The drawn set's objects have the sizes its captions say (measured from pixels)."""
    for scene in drawn.draw_scenes(30, seed=3):
        pixels = np.asarray(scene.image).astype(int)
        background = pixels[0, 0]
        painted = np.abs(pixels - background).sum(-1) > 60
        ys, xs = np.nonzero(painted)
        if len(scene.things) == 1:
            side = max(xs.max() - xs.min(), ys.max() - ys.min()) / drawn.CANVAS
            low, high = SIZE_RANGES[scene.things[0][0]]
            assert low <= side <= high + 0.01, (scene.caption, side)
