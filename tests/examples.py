"""The generated scenes committed in ``examples/`` and their right captions, scenes drawn
with PIL alone, independently of the generator, and images as the PNG bytes clients send."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw

EXAMPLES = Path(__file__).parents[1] / "examples"


def example_captions() -> dict[str, str]:
    """File name -> the scene's one correct caption (from ``examples/captions.tsv``)."""
    lines = (EXAMPLES / "captions.tsv").read_text().splitlines()
    return dict(line.split("\t") for line in lines)


def draw(shape: str, color: str, box: tuple[int, int, int, int]) -> Image.Image:
    """One circle or square on white, drawn with PIL alone (224 x 224)."""
    image = Image.new("RGB", (224, 224), "white")
    painter = ImageDraw.Draw(image)
    (painter.ellipse if shape == "circle" else painter.rectangle)(box, fill=color)
    return image


def red_circle() -> Image.Image:
    return draw("circle", "red", (67, 67, 157, 157))  # centre, 90 px of 224: "big"


def blue_square() -> Image.Image:
    return draw("square", "blue", (26, 26, 56, 56))  # top left, 30 px of 224: "small"


def png_bytes(image: Image.Image | str, size: tuple[int, int] = (8, 8)) -> bytes:
    """``image`` encoded as PNG (its mode kept); a colour name stands for a plain ``size``
    RGB image of that colour."""
    if isinstance(image, str):
        image = Image.new("RGB", size, image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
