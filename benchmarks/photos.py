"""Real photos that ship inside packages (no downloads): the benchmark and parity inputs."""

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
