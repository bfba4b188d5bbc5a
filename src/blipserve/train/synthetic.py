"""Synthetic scenes with exact captions and question/answer pairs, deterministic from a seed.

A scene is 1 to 3 objects on a 3x3 grid, each a distinct shape in a distinct colour, small
or big, on a plain, tinted or noisy background. Layouts are chosen so every description
is unambiguous:

- one object:    "a big red circle"
- two objects:   same row or same column: "a small red circle to the left of a big blue
                 square", "a big green star above a small yellow triangle"
- three objects: one row or one column, listed left to right or top to bottom:
                 "a small red circle, a big blue square and a small green star in a row"

Questions cover colour, shape, size, count, position and yes/no, each with one right answer:
"what color is the circle?" -> "red", "how many objects are there?" -> "two",
"where is the star?" -> "top left", "is there a blue square?" -> "yes".
This is the demo model's whole world; its tests can tell a right answer from a wrong one.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from blipserve.train.data import TrainExample

SHAPES = ("circle", "square", "triangle", "star")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (35, 75, 215),
    "yellow": (235, 205, 30),
    "purple": (135, 55, 175),
    "orange": (245, 135, 25),
}
SIZES = ("small", "big")
GRID = 3
ROW_NAMES = ("top", "middle", "bottom")
COLUMN_NAMES = ("left", "center", "right")
COUNT_WORDS = ("zero", "one", "two", "three")
RENDER_SIZE = 192  # pixels; the model's image processor resizes to its own input size
SIZE_RADIUS = {"small": 0.2, "big": 0.36}  # radius as a fraction of a grid cell


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    row: int  # 0 top .. 2 bottom
    col: int  # 0 left .. 2 right

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]  # in caption order: left to right, then top to bottom
    background: str  # "plain" | "tinted" | "noisy"
    seed: int  # drives rendering details (jitter, tints, noise)


@dataclass(frozen=True)
class Sample:
    """One training or evaluation example: an image, a prompt and the exact target text."""

    image: Image.Image
    prompt: str  # "" for captioning, "Question: ... Answer:" for VQA
    text: str
    scene: Scene


# -- scenes ------------------------------------------------------------------------------------


def random_scene(rng: random.Random) -> Scene:
    """Draw a scene: 1-3 objects with distinct shapes and colours on one row or column."""
    count = rng.choice((1, 2, 2, 3, 3))
    shapes = rng.sample(SHAPES, count)
    colors = rng.sample(list(COLORS), count)
    sizes = [rng.choice(SIZES) for _ in range(count)]
    if count == 1:
        cells = [(rng.randrange(GRID), rng.randrange(GRID))]
    elif rng.random() < 0.5:  # one row, left to right
        row = rng.randrange(GRID)
        cells = [(row, col) for col in sorted(rng.sample(range(GRID), count))]
    else:  # one column, top to bottom
        col = rng.randrange(GRID)
        cells = [(row, col) for row in sorted(rng.sample(range(GRID), count))]
    objects = tuple(
        SceneObject(shape, color, size, row, col)
        for shape, color, size, (row, col) in zip(shapes, colors, sizes, cells, strict=True)
    )
    background = rng.choice(("plain", "plain", "tinted", "noisy"))
    return Scene(objects, background, rng.randrange(2**31))


def is_row(scene: Scene) -> bool:
    return len({o.row for o in scene.objects}) == 1


def caption(scene: Scene) -> str:
    """The one correct caption of ``scene``."""
    phrases = [o.phrase() for o in scene.objects]
    if len(phrases) == 1:
        return phrases[0]
    if len(phrases) == 2:
        relation = "to the left of" if is_row(scene) else "above"
        return f"{phrases[0]} {relation} {phrases[1]}"
    arrangement = "in a row" if is_row(scene) else "in a column"
    return f"{phrases[0]}, {phrases[1]} and {phrases[2]} {arrangement}"


def place_name(obj: SceneObject) -> str:
    """Grid cell in words: "top left", "center", "middle right", "bottom center", ..."""
    if (obj.row, obj.col) == (1, 1):
        return "center"
    return f"{ROW_NAMES[obj.row]} {COLUMN_NAMES[obj.col]}"


def questions(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """Question/answer pairs about ``scene``, one of each kind, every answer unambiguous."""
    target = rng.choice(scene.objects)
    present = {(o.color, o.shape) for o in scene.objects}
    if rng.random() < 0.5:
        asked = (target.color, target.shape)
    else:  # a colour/shape combination that is not in the picture
        asked = rng.choice([(c, s) for c in COLORS for s in SHAPES if (c, s) not in present])
    return [
        (f"what color is the {target.shape}?", target.color),
        (f"what shape is the {target.color} object?", target.shape),
        (f"what size is the {target.shape}?", target.size),
        ("how many objects are there?", COUNT_WORDS[len(scene.objects)]),
        (f"where is the {target.shape}?", place_name(target)),
        (f"is there a {asked[0]} {asked[1]}?", "yes" if asked in present else "no"),
    ]


def vqa_prompt(question: str) -> str:
    return f"Question: {question} Answer:"


# -- rendering ---------------------------------------------------------------------------------


def render(scene: Scene, size: int = RENDER_SIZE) -> Image.Image:
    """Draw ``scene`` (anti-aliased by 2x supersampling, with background noise)."""
    rng = random.Random(scene.seed)
    scale = 2
    canvas = size * scale
    image = Image.new("RGB", (canvas, canvas), _background_color(scene.background, rng))
    draw = ImageDraw.Draw(image)
    cell = canvas / GRID
    for obj in scene.objects:
        cx = (obj.col + 0.5) * cell + rng.uniform(-0.12, 0.12) * cell
        cy = (obj.row + 0.5) * cell + rng.uniform(-0.12, 0.12) * cell
        radius = SIZE_RADIUS[obj.size] * cell * rng.uniform(0.9, 1.1)
        fill = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in COLORS[obj.color])
        _draw_shape(draw, obj.shape, cx, cy, radius, fill)
    image = image.resize((size, size), Image.Resampling.LANCZOS)
    if scene.background == "noisy":
        image = image.filter(ImageFilter.GaussianBlur(0.5))
    return _add_noise(image, rng, sigma=8.0 if scene.background == "noisy" else 2.0)


def _background_color(kind: str, rng: random.Random) -> tuple[int, int, int]:
    if kind == "plain":
        level = rng.randint(235, 255)
        return (level, level, level)
    base = rng.randint(180, 235)  # a light, low-saturation tint never mistaken for an object
    return tuple(min(255, base + rng.randint(-12, 12)) for _ in range(3))


def _draw_shape(draw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    """Upright shapes centred on (cx, cy) with outer radius ``r``."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = r * 0.9
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        points = [(cx + r * math.sin(a), cy - r * math.cos(a)) for a in (0, 2.094, 4.189)]
        draw.polygon(points, fill=fill)
    elif shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            a = k * math.pi / 5
            points.append((cx + radius * math.sin(a), cy - radius * math.cos(a)))
        draw.polygon(points, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _add_noise(image: Image.Image, rng: random.Random, sigma: float) -> Image.Image:
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0.0, sigma, (*image.size[::-1], 3))
    pixels = np.asarray(image, dtype=np.float32) + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


# -- datasets ----------------------------------------------------------------------------------


def scenes(count: int, seed: int) -> list[Scene]:
    rng = random.Random(seed)
    return [random_scene(rng) for _ in range(count)]


def samples(
    count: int, seed: int, *, vqa_per_image: int = 2, size: int = RENDER_SIZE
) -> Iterator[Sample]:
    """``count`` scenes, each as a caption sample plus ``vqa_per_image`` VQA samples."""
    rng = random.Random(seed ^ 0x5EED)
    for scene in scenes(count, seed):
        image = render(scene, size)
        yield Sample(image, "", caption(scene), scene)
        for question, answer in rng.sample(questions(scene, rng), vqa_per_image):
            yield Sample(image, vqa_prompt(question), answer, scene)


def synthetic_examples(count: int, seed: int, *, vqa_per_image: int = 2) -> list[TrainExample]:
    """:func:`samples` as stage-2 training examples (captions and VQA together)."""
    return [
        TrainExample(
            s.image, s.text, s.prompt, origin=f"synthetic scene {i // (1 + vqa_per_image)}"
        )
        for i, s in enumerate(samples(count, seed, vqa_per_image=vqa_per_image))
    ]


def cell_labels(scene: Scene) -> list[int]:
    """Per grid cell (row-major): 0 if empty, else 1 + index of (shape, colour, size).

    The demo's vision encoder is pre-trained to predict these from the pixels."""
    labels = [0] * (GRID * GRID)
    for obj in scene.objects:
        index = (SHAPES.index(obj.shape) * len(COLORS) + list(COLORS).index(obj.color)) * len(
            SIZES
        ) + SIZES.index(obj.size)
        labels[obj.row * GRID + obj.col] = 1 + index
    return labels


NUM_CELL_CLASSES = 1 + len(SHAPES) * len(COLORS) * len(SIZES)

# One token per cell label, in label order: the demo language model's "scene language".
CELL_TOKENS: tuple[str, ...] = (
    "<cell:empty>",
    *(f"<cell:{size}-{color}-{shape}>" for shape in SHAPES for color in COLORS for size in SIZES),
)


def cell_tokens(scene: Scene) -> list[str]:
    """The scene as 9 cell tokens, row-major: ``<cell:small-red-circle>`` or ``<cell:empty>``."""
    return [CELL_TOKENS[label] for label in cell_labels(scene)]


def corpus(count: int, seed: int) -> list[str]:
    """Every prompt and target text of ``count`` scenes: the demo tokenizer's and language
    model's training text (no images needed)."""
    rng = random.Random(seed)
    texts = []
    for scene in scenes(count, seed):
        texts.append(caption(scene))
        for question, answer in questions(scene, rng):
            texts.append(f"{vqa_prompt(question)} {answer}")
    return texts
