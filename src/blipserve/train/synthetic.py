"""Synthetic scenes with exact captions and question/answer pairs, deterministic from a seed.

The demo model's whole world (docs/demo-model.md states it for users):

- 1 to 3 filled shapes (circle, square, triangle, star) in 6 colours, each colour drawn
  from a range of shades; any shape and colour may repeat;
- sizes measured against the image: an object's longer side is 10-22% of the image's
  ("small") or 34-66% ("big"); no scene has an object in the gap between;
- anywhere in the image, slightly rotated (up to 12 degrees), anti-aliased or not;
- two or three objects stand in one row (left to right, clearly apart, centres at about
  one height) or one column (top to bottom), so the caption's order is never ambiguous:
  "a big red circle", "a small red circle to the left of a big blue square",
  "a big green star above a small yellow triangle",
  "a small red circle, a big blue square and a small green star in a row";
- light backgrounds: white, light grey, a pale tint, or any of them with pixel noise.

Questions come in several phrasings per kind (:func:`questions`), each with one right
answer: colour ("what colour is the circle?" -> "red"), shape ("what shape is it?"),
size, count ("how many circles are there?" -> "two"), yes/no ("is there a blue square?"),
position ("what is on the left?" -> "a big red circle"), a description ("what is in the
picture?" -> the caption) and questions from outside this world ("who is this?"), whose
answer is "i don't know"; so is "where is the star?", which the demo's language model did
not learn to answer.
"""

from __future__ import annotations

import colorsys
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from blipserve.train.data import TrainExample

SHAPES = ("circle", "square", "triangle", "star")
# Each colour is a box in HSV: hue range (fractions of the circle, red wraps past 0),
# saturation range, value range. Every shade inside is that colour and no other's.
COLOR_RANGES: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    "red": ((-0.03, 0.03), (0.65, 1.0), (0.65, 1.0)),
    "orange": ((0.065, 0.1), (0.75, 1.0), (0.88, 1.0)),
    "yellow": ((0.135, 0.17), (0.7, 1.0), (0.85, 1.0)),
    "green": ((0.25, 0.42), (0.6, 1.0), (0.45, 0.85)),
    "blue": ((0.56, 0.67), (0.6, 1.0), (0.6, 1.0)),
    "purple": ((0.75, 0.83), (0.5, 0.9), (0.45, 0.8)),
}
COLORS = tuple(COLOR_RANGES)
SIZES = ("small", "big")
SIZE_RANGES = {"small": (0.10, 0.22), "big": (0.34, 0.66)}  # longer side / image side
LAYOUTS = ("single", "row", "column")
BACKGROUNDS = ("white", "grey", "tinted", "noisy")
MAX_ROTATION = 12.0  # degrees, either way
# Turned by up to 12 degrees, a shape's bounding box grows by up to cos 12 + sin 12 = 1.19
# times (a square's); places are planned with this footprint so nothing leaves the image
# or comes nearer a neighbour than GAP.
ROTATED = 1.19
MARGIN = 0.03  # empty border, fraction of the image
GAP = 0.05  # least space between neighbours in a row or column
COUNT_WORDS = ("zero", "one", "two", "three")
DONT_KNOW = "i don't know"
RENDER_SIZE = 192  # pixels; the model's image processor resizes to its own input size


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    extent: float  # longer side of the upright shape, fraction of the image side
    center: tuple[float, float]  # (x, y), fractions of the image, y downwards
    angle: float  # rotation, degrees
    rgb: tuple[int, int, int]

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape}"

    @property
    def label(self) -> str:
        """ "big-red-circle": what the scene language calls this object."""
        return f"{self.size}-{self.color}-{self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]  # in caption order: left to right or top to bottom
    layout: str  # "single" | "row" | "column"
    background: str  # one of BACKGROUNDS
    antialias: bool
    seed: int  # drives rendering details (background shade, noise)


class QA(NamedTuple):
    kind: str  # "color", "shape", "size", "count", "yes/no", "position", "describe", "unknown"
    question: str
    answer: str


@dataclass(frozen=True)
class Sample:
    """One training or evaluation example: an image, a prompt and the exact target text."""

    image: Image.Image
    prompt: str  # "" for captioning, "Question: ... Answer:" (after earlier turns) for VQA
    text: str
    scene: Scene


# -- scenes ------------------------------------------------------------------------------------


def random_scene(rng: random.Random) -> Scene:
    """Draw a scene: 1-3 objects, alone or in one row or column, sizes that fit."""
    count = rng.choice((1, 1, 2, 2, 2, 3, 3, 3))
    layout = "single" if count == 1 else rng.choice(("row", "column"))
    distinct = rng.random() < 0.6  # most scenes as before; the rest repeat shapes or colours
    shapes = rng.sample(SHAPES, count) if distinct else [rng.choice(SHAPES) for _ in range(count)]
    colors = rng.sample(COLORS, count) if distinct else [rng.choice(COLORS) for _ in range(count)]
    while True:
        sizes = [rng.choice(SIZES) for _ in range(count)]
        extents = [rng.uniform(*SIZE_RANGES[s]) for s in sizes]
        if ROTATED * sum(extents) + GAP * (count - 1) <= 1 - 2 * MARGIN:
            break
    centers = _place([ROTATED * e for e in extents], layout, rng)
    objects = tuple(
        SceneObject(
            shape,
            color,
            size,
            round(extent, 4),
            (round(x, 4), round(y, 4)),
            round(rng.uniform(-MAX_ROTATION, MAX_ROTATION), 2),
            shade(color, rng),
        )
        for shape, color, size, extent, (x, y) in zip(
            shapes, colors, sizes, extents, centers, strict=True
        )
    )
    return Scene(objects, layout, rng.choice(BACKGROUNDS), rng.random() < 0.6, rng.randrange(2**31))


def _place(extents: list[float], layout: str, rng: random.Random) -> list[tuple[float, float]]:
    """Centres for objects of these footprints: along the layout's axis in order with at least
    ``GAP`` between them, across it at about one line (jitter under a fifth of the
    smallest object), everything inside the margins."""
    if layout == "single":
        (extent,) = extents
        low, high = MARGIN + extent / 2, 1 - MARGIN - extent / 2
        return [(rng.uniform(low, high), rng.uniform(low, high))]
    free = 1 - 2 * MARGIN - sum(extents) - GAP * (len(extents) - 1)
    cuts = sorted(rng.uniform(0, free) for _ in range(len(extents)))
    along, position, used = [], MARGIN, 0.0
    for extent, cut in zip(extents, cuts, strict=True):
        position += cut - used
        used = cut
        along.append(position + extent / 2)
        position += extent + GAP
    widest, smallest = max(extents), min(extents)
    line = rng.uniform(MARGIN + widest / 2, 1 - MARGIN - widest / 2)
    jitter = smallest / 5  # centres then differ by under 0.4 footprints: < half an extent
    across = [
        min(max(line + rng.uniform(-jitter, jitter), MARGIN + e / 2), 1 - MARGIN - e / 2)
        for e in extents
    ]
    pairs = zip(along, across, strict=True)
    return [(a, c) if layout == "row" else (c, a) for a, c in pairs]


def shade(color: str, rng: random.Random) -> tuple[int, int, int]:
    """A random shade of ``color`` from its HSV range."""
    (h0, h1), (s0, s1), (v0, v1) = COLOR_RANGES[color]
    r, g, b = colorsys.hsv_to_rgb(
        rng.uniform(h0, h1) % 1.0, rng.uniform(s0, s1), rng.uniform(v0, v1)
    )
    return (round(r * 255), round(g * 255), round(b * 255))


def caption(scene: Scene) -> str:
    """The one correct caption of ``scene``."""
    phrases = [o.phrase() for o in scene.objects]
    if scene.layout == "single":
        return phrases[0]
    if len(phrases) == 2:
        relation = "to the left of" if scene.layout == "row" else "above"
        return f"{phrases[0]} {relation} {phrases[1]}"
    arrangement = "in a row" if scene.layout == "row" else "in a column"
    return f"{phrases[0]}, {phrases[1]} and {phrases[2]} {arrangement}"


def vqa_prompt(question: str) -> str:
    return f"Question: {question} Answer:"


# -- questions ---------------------------------------------------------------------------------

DESCRIBE = (
    "what is in the picture?",
    "what is in the image?",
    "what do you see?",
    "what can you see?",
    "describe the picture.",
    "describe the image.",
    "what is this?",
)
UNKNOWN = (
    "who is this?",
    "who made this picture?",
    "what time is it?",
    "what is the weather like?",
    "where was this taken?",
    "what is the man doing?",
    "what is the woman holding?",
    "what animal is this?",
    "what breed is the dog?",
    "what is the name of the {shape}?",
    "why is the {shape} {color}?",
    "what year is it?",
    "how old is the {shape}?",
    "what does the {shape} taste like?",
    "what is the {shape} made of?",
    "what is the capital of france?",
    "how much does it cost?",
    "what is your name?",
    "what language is this?",
    "what is the {color} {shape} thinking?",
    "when was this made?",
    "what game is this?",
    "what sound does the {shape} make?",
    "who drew the {shape}?",
    # A small language model did not learn to name an object's place (docs/demo-model.md),
    # so the demo says it does not know rather than guess; "what is on the left?" it answers.
    "where is the {shape}?",
    "where is the {color} {shape}?",
)
REFERENCE_PARTS = (
    ("shape",),
    ("color", "shape"),
    ("size", "shape"),
    ("size", "color", "shape"),
    ("color",),
    ("size", "color"),
)
PLACES = {
    "row": {
        2: ("on the left", "on the right"),
        3: ("on the left", "in the middle", "on the right"),
    },
    "column": {
        2: ("at the top", "at the bottom"),
        3: ("at the top", "in the middle", "at the bottom"),
    },
}


def questions(scene: Scene, rng: random.Random) -> list[QA]:
    """One question of each kind that fits ``scene``, phrasing drawn from ``rng``; every
    answer is the only right one."""
    asked = [
        _attribute_question(scene, "color", rng),
        _attribute_question(scene, "shape", rng),
        _attribute_question(scene, "size", rng),
        _count_question(scene, rng),
        _count_question(scene, rng),  # counting is the slowest kind to learn
        _yes_no_question(scene, rng),
        _position_question(scene, rng),
        QA("describe", rng.choice(DESCRIBE), caption(scene)),
        _unknown_question(scene, rng),
    ]
    return [qa for qa in asked if qa is not None]


def _references(scene: Scene, leave_out: str) -> list[tuple[SceneObject, str]]:
    """(object, words that pick out only it) pairs, never naming the ``leave_out``
    property: "the circle", "the red circle", "the big red object", ..."""
    found = []
    for obj in scene.objects:
        for parts in REFERENCE_PARTS:
            if leave_out in parts:
                continue
            alike = [
                o for o in scene.objects if all(getattr(o, p) == getattr(obj, p) for p in parts)
            ]
            if len(alike) == 1:
                words = " ".join(getattr(obj, p) for p in parts)
                found.append((obj, f"the {words}" if "shape" in parts else f"the {words} object"))
    return found


def _pick_reference(scene: Scene, leave_out: str, rng: random.Random):
    choices = _references(scene, leave_out)
    if len(scene.objects) == 1 and rng.random() < 0.5:
        return scene.objects[0], "it"
    return rng.choice(choices) if choices else (None, "")


ATTRIBUTE_TEMPLATES = {
    "color": ("what color is {}?", "what colour is {}?", "which color is {}?"),
    "shape": ("what shape is {}?", "what kind of shape is {}?", "which shape is {}?"),
    "size": ("what size is {}?", "is {} big or small?", "is {} small or big?", "how big is {}?"),
}


def _attribute_question(scene: Scene, attribute: str, rng: random.Random) -> QA | None:
    """ "what color is the big star?" -> "red": one object's colour, shape or size, the
    object named by its other properties; None when no object can be named alone."""
    obj, ref = _pick_reference(scene, attribute, rng)
    if obj is None:
        return None
    template = rng.choice(ATTRIBUTE_TEMPLATES[attribute])
    return QA(attribute, template.format(ref), getattr(obj, attribute))


def _count_question(scene: Scene, rng: random.Random) -> QA:
    roll = rng.random()
    if roll < 0.4:
        question = rng.choice(
            (
                "how many objects are there?",
                "how many shapes are there?",
                "how many things are in the picture?",
                "how many objects are in the image?",
            )
        )
        return QA("count", question, COUNT_WORDS[len(scene.objects)])
    # Any shape or colour, not mostly those present: else "one" is right so often that a
    # small decoder answers it without reading the scene, and never says "zero". But a shape
    # or colour the scene repeats is asked about most of the time: drawn at random it made
    # "two" and "three" under 2% of the answers, and build 2 answered "one" to nearly every
    # repeated shape (docs/demo-model.md).
    by_shape = roll < 0.75
    kinds = [o.shape if by_shape else o.color for o in scene.objects]
    repeated = sorted({kind for kind in kinds if kinds.count(kind) > 1})
    if repeated and rng.random() < 0.7:
        kind = rng.choice(repeated)
    else:
        kind = rng.choice(SHAPES if by_shape else COLORS)
    if by_shape:
        question = rng.choice(("how many {}s are there?", "how many {}s are in the picture?"))
    else:
        question = rng.choice(("how many {} objects are there?", "how many {} shapes are there?"))
    return QA("count", question.format(kind), COUNT_WORDS[kinds.count(kind)])


def _yes_no_question(scene: Scene, rng: random.Random) -> QA:
    target = rng.choice(scene.objects)
    if rng.random() < 0.5:  # ask for what is there, else for a random combination
        color, shape, size = target.color, target.shape, target.size
    else:
        color, shape, size = rng.choice(COLORS), rng.choice(SHAPES), rng.choice(SIZES)
    form = rng.randrange(4)
    if form == 0:
        question = f"is there a {color} {shape}?"
        present = any(o.color == color and o.shape == shape for o in scene.objects)
    elif form == 1:
        question = rng.choice((f"is there a {shape}?", f"is there a {shape} in the picture?"))
        present = any(o.shape == shape for o in scene.objects)
    elif form == 2:
        question = f"is there anything {color}?"
        present = any(o.color == color for o in scene.objects)
    else:
        question = f"is there a {size} {shape}?"
        present = any(o.size == size and o.shape == shape for o in scene.objects)
    return QA("yes/no", question, "yes" if present else "no")


def _position_question(scene: Scene, rng: random.Random) -> QA | None:
    if scene.layout == "single":
        return None
    places = PLACES[scene.layout][len(scene.objects)]
    index = rng.randrange(len(scene.objects))
    return QA("position", f"what is {places[index]}?", scene.objects[index].phrase())


def _unknown_question(scene: Scene, rng: random.Random) -> QA:
    obj = rng.choice(scene.objects)
    return QA("unknown", rng.choice(UNKNOWN).format(shape=obj.shape, color=obj.color), DONT_KNOW)


def conversation_prompt(turns: list[tuple[str, str]], question: str) -> str:
    """Earlier (question, answer) turns then the new question, as ``blipserve chat`` writes
    them: "Question: q1 Answer: a1 Question: q2 Answer:"."""
    earlier = [f"{vqa_prompt(q)} {a}" for q, a in turns]
    return " ".join([*earlier, vqa_prompt(question)])


# -- rendering ---------------------------------------------------------------------------------


def render(scene: Scene, size: int = RENDER_SIZE) -> Image.Image:
    """Draw ``scene`` at ``size`` x ``size`` pixels."""
    rng = random.Random(scene.seed)
    scale = 3 if scene.antialias else 1
    background = _background_color(scene.background, rng)
    image = Image.new("RGB", (size * scale, size * scale), background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        draw.polygon(outline(obj, size * scale), fill=obj.rgb)
    if scale > 1:
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    if scene.background == "noisy":
        image = image.filter(ImageFilter.GaussianBlur(0.5))
        return _add_noise(image, rng, sigma=rng.uniform(5.0, 12.0))
    return _add_noise(image, rng, sigma=1.5)


def object_map(scene: Scene, size: int) -> np.ndarray:
    """(size, size) uint8: 0 where the background shows, else 1 + the index (in caption
    order) of the object drawn there. The demo's image encoder learns to read it."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for index, obj in enumerate(scene.objects):
        draw.polygon(outline(obj, size), fill=index + 1)
    return np.asarray(canvas)


def outline(obj: SceneObject, size: float) -> list[tuple[float, float]]:
    """The object's outline as polygon points in pixels of a ``size``-pixel image."""
    points = _UNIT_OUTLINES[obj.shape]
    turn = math.radians(obj.angle)
    cos, sin = math.cos(turn), math.sin(turn)
    scale = obj.extent * size
    cx, cy = obj.center[0] * size, obj.center[1] * size
    return [(cx + scale * (x * cos - y * sin), cy + scale * (x * sin + y * cos)) for x, y in points]


def _unit_outlines() -> dict[str, list[tuple[float, float]]]:
    """Each shape upright, centred on its bounding box, its longer side 1."""

    def star_points() -> list[tuple[float, float]]:
        return [
            (
                (1.0 if k % 2 == 0 else 0.42) * math.sin(k * math.pi / 5),
                -(1.0 if k % 2 == 0 else 0.42) * math.cos(k * math.pi / 5),
            )
            for k in range(10)
        ]

    def fit(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        xs, ys = [x for x, _ in points], [y for _, y in points]
        mx, my = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
        side = max(max(xs) - min(xs), max(ys) - min(ys))
        return [((x - mx) / side, (y - my) / side) for x, y in points]

    circle = [(math.cos(2 * math.pi * k / 64), math.sin(2 * math.pi * k / 64)) for k in range(64)]
    square = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    triangle = [(math.sin(a), -math.cos(a)) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
    return {
        "circle": fit(circle),
        "square": fit(square),
        "triangle": fit(triangle),
        "star": fit(star_points()),
    }


_UNIT_OUTLINES = _unit_outlines()


def _background_color(kind: str, rng: random.Random) -> tuple[int, int, int]:
    base = rng.choice(("white", "grey", "tinted")) if kind == "noisy" else kind
    if base == "white":
        level = rng.randint(244, 255)
        return (level, level, level)
    if base == "grey":
        level = rng.randint(190, 236)
        return (level, level, level)
    level = rng.randint(195, 240)  # a pale, low-saturation tint never mistaken for an object
    return tuple(min(255, level + rng.randint(-14, 14)) for _ in range(3))


def _add_noise(image: Image.Image, rng: random.Random, sigma: float) -> Image.Image:
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0.0, sigma, (*image.size[::-1], 3))
    pixels = np.asarray(image, dtype=np.float32) + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


# -- the scene language ------------------------------------------------------------------------

MAX_OBJECTS = 3
NO_OBJECT = "none"
OBJECT_LABELS: tuple[str, ...] = (
    NO_OBJECT,
    *(f"{size}-{color}-{shape}" for shape in SHAPES for color in COLORS for size in SIZES),
)
# The demo language model reads a scene as 4 tokens: its layout, then up to 3 objects in
# caption order ("<obj:none>" after the last), where BLIP-2 puts the query outputs.
SCENE_TOKENS: tuple[str, ...] = (
    *(f"<layout:{layout}>" for layout in LAYOUTS),
    *(f"<obj:{label}>" for label in OBJECT_LABELS),
)
SCENE_LENGTH = 1 + MAX_OBJECTS


def scene_labels(scene: Scene) -> list[int]:
    """[layout index, object label index x 3]: the scene as class labels."""
    objects = [OBJECT_LABELS.index(o.label) for o in scene.objects]
    return [LAYOUTS.index(scene.layout), *objects, *[0] * (MAX_OBJECTS - len(objects))]


def scene_tokens(scene: Scene) -> list[str]:
    """The scene in its own language: ``<layout:row> <obj:big-red-circle> ...``."""
    layout, *objects = scene_labels(scene)
    return [f"<layout:{LAYOUTS[layout]}>", *(f"<obj:{OBJECT_LABELS[i]}>" for i in objects)]


# -- datasets ----------------------------------------------------------------------------------


def scenes(count: int, seed: int) -> list[Scene]:
    rng = random.Random(seed)
    return [random_scene(rng) for _ in range(count)]


def texts(
    scene: Scene, rng: random.Random, questions_per_scene: int, follow_ups: float = 0.3
) -> list[tuple[str, str]]:
    """(prompt, target) pairs about ``scene``: its caption (empty prompt), then
    ``questions_per_scene`` questions, a ``follow_ups`` share of them after 1-6 earlier
    turns of a conversation."""
    pairs = [("", caption(scene))]
    asked = questions(scene, rng)
    for qa in rng.sample(asked, min(questions_per_scene, len(asked))):
        turns = []
        if rng.random() < follow_ups:
            earlier = [questions(scene, rng) for _ in range(2)]
            pool = [q for group in earlier for q in group]
            turns = [(q.question, q.answer) for q in rng.sample(pool, rng.randint(1, 6))]
        pairs.append((conversation_prompt(turns, qa.question), qa.answer))
    return pairs


def samples(
    count: int,
    seed: int,
    *,
    questions_per_scene: int = 3,
    follow_ups: float = 0.3,
    size: int = RENDER_SIZE,
) -> Iterator[Sample]:
    """``count`` scenes, each as a caption sample plus ``questions_per_scene`` questions
    (:func:`texts`)."""
    rng = random.Random(seed ^ 0x5EED)
    for scene in scenes(count, seed):
        image = render(scene, size)
        for prompt, text in texts(scene, rng, questions_per_scene, follow_ups):
            yield Sample(image, prompt, text, scene)


def synthetic_examples(
    count: int, seed: int, *, questions_per_scene: int = 3, follow_ups: float = 0.3
) -> list[TrainExample]:
    """:func:`samples` as stage-2 training examples (captions and questions together)."""
    return [
        TrainExample(s.image, s.text, s.prompt, origin=f"synthetic scene {s.scene.seed}")
        for s in samples(
            count, seed, questions_per_scene=questions_per_scene, follow_ups=follow_ups
        )
    ]


def corpus(count: int, seed: int) -> list[str]:
    """Every prompt and target text of ``count`` scenes: the demo tokenizer's training text."""
    rng = random.Random(seed)
    lines = []
    for scene in scenes(count, seed):
        lines += [f"{prompt} {target}".strip() for prompt, target in texts(scene, rng, 8)]
    return lines
