"""Benchmark inputs: real photos that ship inside packages, and the reference preprocessing."""

from __future__ import annotations

from PIL import Image


def sample_photos() -> dict[str, Image.Image]:
    import skimage.data
    from sklearn.datasets import load_sample_image

    arrays = {
        "chelsea": skimage.data.chelsea(),
        "coffee": skimage.data.coffee(),
        "astronaut": skimage.data.astronaut(),
        "rocket": skimage.data.rocket(),
        "china": load_sample_image("china.jpg"),
        "flower": load_sample_image("flower.jpg"),
    }
    return {name: Image.fromarray(array) for name, array in arrays.items()}


def photo_batch(n: int) -> list[Image.Image]:
    """``n`` photos, cycling through the sample set."""
    photos = list(sample_photos().values())
    return [photos[i % len(photos)] for i in range(n)]


def reference_image_processor(checkpoint):
    """transformers' BLIP image processor for ``checkpoint``, pinned to its PIL backend
    (the one blipserve matches) even where torchvision is installed."""
    from blipserve.testing.reference import ReferenceImageProcessor

    return ReferenceImageProcessor.from_pretrained(checkpoint)
