"""Scenes drawn independently of the generator, to measure the demo model, not its data.

:mod:`blipserve.train.synthetic` makes the training scenes. This module shares none of
its code: it draws what a user would draw with plain PIL calls (``ellipse``,
``rectangle``, ``regular_polygon``, a hand-made star) on a 224-pixel canvas, in fixed,
named shades of each colour, at sizes and places from its own random draws, and writes
the caption and answers itself. It keeps to the world's rules (docs/demo-model.md): 1-3
objects, alone or in one row or column, "small" = 12-20% of the image, "big" = 38-60%.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

CANVAS = 224
SHADES: dict[str, list[tuple[int, int, int]]] = {  # a few everyday shades per colour
    "red": [(220, 30, 40), (200, 20, 20), (235, 55, 45), (178, 24, 34)],
    "orange": [(255, 140, 0), (248, 130, 30), (255, 160, 20)],
    "yellow": [(250, 220, 20), (255, 235, 50), (240, 210, 10)],
    "green": [(40, 170, 60), (20, 130, 40), (70, 180, 50), (34, 139, 34)],
    "blue": [(30, 80, 220), (20, 60, 180), (60, 110, 240), (0, 90, 200)],
    "purple": [(130, 40, 170), (110, 30, 150), (150, 60, 190), (120, 20, 128)],
}
KINDS = ("circle", "square", "triangle", "star")
WORDS = ("zero", "one", "two", "three")


@dataclass(frozen=True)
class Drawn:
    """One drawn scene: what is in it, in reading order, and how it is laid out."""

    things: tuple[tuple[str, str, str], ...]  # (size, colour, shape), left-right / top-bottom
    layout: str  # "single", "row" or "column"
    image: Image.Image

    @property
    def caption(self) -> str:
        names = [f"a {size} {color} {shape}" for size, color, shape in self.things]
        if len(names) == 1:
            return names[0]
        if len(names) == 2:
            return f"{names[0]} {'to the left of' if self.layout == 'row' else 'above'} {names[1]}"
        return f"{names[0]}, {names[1]} and {names[2]} in a {self.layout}"

    def questions(self) -> list[tuple[str, str, str]]:
        """(kind, question, answer) triples in the phrasings a user would type; the kinds
        are the generator's names ("count", "describe", "shape", "color", "size")."""
        shapes = [shape for _, _, shape in self.things]
        colors = [color for _, color, _ in self.things]
        asked = [
            ("count", "how many shapes are there?", WORDS[len(self.things)]),
            ("describe", "what is in the picture?", self.caption),
        ]
        if len(self.things) == 1:
            size, color, shape = self.things[0]
            asked += [
                ("shape", "what shape is it?", shape),
                ("color", "what color is it?", color),
                ("size", "is it big or small?", size),
            ]
        for size, color, shape in self.things:
            if shapes.count(shape) == 1:
                asked.append(("color", f"what color is the {shape}?", color))
                asked.append(("size", f"what size is the {shape}?", size))
            if colors.count(color) == 1:
                asked.append(("shape", f"what shape is the {color} object?", shape))
        for shape in KINDS:
            asked.append(("count", f"how many {shape}s are there?", WORDS[shapes.count(shape)]))
        return asked


def draw_scenes(count: int, seed: int = 77) -> list[Drawn]:
    """``count`` scenes from their own random draws."""
    rng = random.Random(seed)
    return [_draw_one(rng) for _ in range(count)]


def _draw_one(rng: random.Random) -> Drawn:
    n = rng.choice((1, 2, 3))
    layout = "single" if n == 1 else rng.choice(("row", "column"))
    while True:
        sizes = [rng.choice(("small", "big")) for _ in range(n)]
        sides = [
            round(CANVAS * (rng.uniform(0.12, 0.2) if s == "small" else rng.uniform(0.38, 0.6)))
            for s in sizes
        ]
        if sum(sides) + 14 * (n + 1) <= CANVAS:
            break
    things = tuple((size, rng.choice(list(SHADES)), rng.choice(KINDS)) for size in sizes)
    background = rng.choice([(255, 255, 255), (240, 240, 240), (225, 225, 225)])
    image = Image.new("RGB", (CANVAS, CANVAS), background)
    pen = ImageDraw.Draw(image)
    boxes = _boxes(sides, layout, rng)
    for (_, color, shape), (left, top, side) in zip(things, boxes, strict=True):
        _draw(pen, shape, left, top, side, rng.choice(SHADES[color]))
    return Drawn(things, layout, image)


def _boxes(sides: list[int], layout: str, rng: random.Random) -> list[tuple[int, int, int]]:
    """(left, top, side) squares for the objects, spread along the layout's axis with
    random gaps, lined up across it."""
    if layout == "single":
        side = sides[0]
        return [(rng.randint(6, CANVAS - side - 6), rng.randint(6, CANVAS - side - 6), side)]
    spare = CANVAS - sum(sides) - 14 * (len(sides) + 1)
    gaps = [14 + g for g in _split(spare, len(sides) + 1, rng)]
    across = rng.randint(6 + max(sides) // 2, CANVAS - 6 - max(sides) // 2)
    boxes, along = [], gaps[0]
    for side, gap in zip(sides, gaps[1:], strict=True):
        centre = across + rng.randint(-min(sides) // 6, min(sides) // 6)
        start = min(max(centre - side // 2, 2), CANVAS - side - 2)
        boxes.append((along, start, side) if layout == "row" else (start, along, side))
        along += side + gap
    return boxes


def _split(total: int, parts: int, rng: random.Random) -> list[int]:
    cuts = sorted(rng.randint(0, max(total, 0)) for _ in range(parts - 1))
    edges = [0, *cuts, max(total, 0)]
    return [b - a for a, b in itertools.pairwise(edges)]


def _draw(pen: ImageDraw.ImageDraw, shape: str, left: int, top: int, side: int, rgb) -> None:
    """A filled ``shape`` whose bounding box's longer side is ``side``, in that square."""
    if shape == "circle":
        pen.ellipse((left, top, left + side, top + side), fill=rgb)
    elif shape == "square":
        pen.rectangle((left, top, left + side, top + side), fill=rgb)
    elif shape == "triangle":
        radius = side / math.sqrt(3)  # width of an upright equilateral triangle: r * sqrt(3)
        centre = (left + side / 2, top + side / 2 + radius / 4)
        pen.regular_polygon((*centre, radius), 3, fill=rgb)
    else:
        outer = side / 1.9  # a five-pointed star is about 1.9 outer radii wide
        cx, cy = left + side / 2, top + side / 2 + outer * 0.05
        points = []
        for k in range(10):
            r = outer if k % 2 == 0 else outer * 0.4
            angle = math.pi * k / 5
            points.append((cx + r * math.sin(angle), cy - r * math.cos(angle)))
        pen.polygon(points, fill=rgb)
