"""Parity of ImageProcessor with the reference BLIP image processor (transformers, PIL backend)."""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from sklearn.datasets import load_sample_image
from transformers import AutoImageProcessor, BlipImageProcessorPil

from blipserve.processing.image_processor import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageProcessor,
    convert_to_rgb,
)
from blipserve.processing.images import load_image

# preprocessor_config.json of Salesforce/blip2-opt-2.7b
BLIP2_CONFIG = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": list(OPENAI_CLIP_MEAN),
    "image_processor_type": "BlipImageProcessor",
    "image_std": list(OPENAI_CLIP_STD),
    "processor_class": "Blip2Processor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 224, "width": 224},
}
REFERENCE_KEYS = ("do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "image_mean")
REFERENCE_KEYS += ("image_std", "resample", "rescale_factor", "size")

PHOTOS = {
    "chelsea": skdata.chelsea,
    "coffee": skdata.coffee,
    "astronaut": skdata.astronaut,
    "china": lambda: load_sample_image("china.jpg"),
}


def reference(config: dict, images: list[Image.Image]) -> torch.Tensor:
    kwargs = {key: config[key] for key in REFERENCE_KEYS if key in config}
    processor = BlipImageProcessorPil(**kwargs)
    return processor(images=images, return_tensors="pt")["pixel_values"]


def photo(name: str) -> Image.Image:
    return Image.fromarray(PHOTOS[name]())


def assert_identical(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    max_diff = (ours - ref).abs().max().item()
    assert torch.equal(ours, ref), f"max abs diff {max_diff:g}"


@pytest.mark.parametrize("name", list(PHOTOS))
def test_photo_matches_reference_exactly(name: str) -> None:
    image = photo(name)
    ours = ImageProcessor.from_dict(BLIP2_CONFIG)([image])
    assert_identical(ours, reference(BLIP2_CONFIG, [image]))


def test_batch_of_different_sizes_matches_reference() -> None:
    images = [photo(name) for name in PHOTOS]
    ours = ImageProcessor.from_dict(BLIP2_CONFIG)(images)
    assert ours.shape == (4, 3, 224, 224)
    assert ours.dtype == torch.float32 and ours.is_contiguous()
    assert_identical(ours, reference(BLIP2_CONFIG, images))


def rgba_from_photo() -> Image.Image:
    rgb = skdata.coffee()
    h, w, _ = rgb.shape
    alpha = (np.linspace(0, 255, w)[None, :] * np.ones((h, 1))).astype(np.uint8)  # left to right
    return Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA")


def palette_with_transparency() -> Image.Image:
    image = photo("chelsea").quantize(colors=64)
    image.info["transparency"] = 0  # palette index 0 is see-through
    return image


def cmyk_jpeg() -> Image.Image:
    buffer = io.BytesIO()
    photo("astronaut").convert("CMYK").save(buffer, format="JPEG", quality=90)
    return Image.open(io.BytesIO(buffer.getvalue()))


MODES = {
    "L": lambda: Image.fromarray(skdata.camera()),
    "RGBA": rgba_from_photo,
    "P": lambda: photo("china").quantize(colors=128),
    "P+transparency": palette_with_transparency,
    "LA": lambda: rgba_from_photo().convert("LA"),
    "1": lambda: Image.fromarray(skdata.camera()).convert("1"),
    "I;16": lambda: Image.fromarray(skdata.camera().astype(np.uint16) * 257),
    "CMYK": cmyk_jpeg,
}


@pytest.mark.parametrize("mode", list(MODES))
def test_image_modes_match_reference(mode: str) -> None:
    image = MODES[mode]()
    assert image.mode == mode.split("+")[0]
    ours = ImageProcessor.from_dict(BLIP2_CONFIG)([image])
    assert_identical(ours, reference(BLIP2_CONFIG, [image]))


def test_transparency_is_composited_onto_white() -> None:
    see_through = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    opaque = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    assert convert_to_rgb(see_through).getpixel((0, 0)) == (255, 255, 255)
    assert convert_to_rgb(opaque).getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize(
    "overrides",
    [
        {"do_normalize": False},
        {"do_rescale": False},
        {"resample": 2, "size": {"height": 160, "width": 96}},
        {"rescale_factor": 0.5, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.5, 1.0]},
    ],
    ids=["no-normalize", "no-rescale", "bilinear-nonsquare", "custom-stats"],
)
def test_other_settings_match_reference(overrides: dict) -> None:
    config = {**BLIP2_CONFIG, **overrides}
    image = photo("coffee")
    ours = ImageProcessor.from_dict(config)([image])
    assert_identical(ours, reference(config, [image]))


def test_float32_rescale_would_not_be_exact() -> None:
    """Pins why we rescale in float64: the float32 shortcut differs from the reference."""
    image = photo("chelsea")
    processor = ImageProcessor.from_dict(BLIP2_CONFIG)
    resized = processor.preprocess_one(image)
    rgb = np.array(image.resize((224, 224), resample=3)).transpose(2, 0, 1)
    shortcut = torch.from_numpy(rgb).float() * (1 / 255)
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    assert not torch.equal((shortcut - mean) / std, resized)


def test_from_dict_fills_reference_defaults() -> None:
    compact = {"size": {"height": 224, "width": 224}, "unknown_key": 1}
    ours = ImageProcessor.from_dict(compact)
    ref = BlipImageProcessorPil(size=compact["size"])
    assert ours.size == (ref.size.height, ref.size.width) == (224, 224)
    assert ours.resample == ref.resample == 3
    assert ours.rescale_factor == ref.rescale_factor
    assert ours.image_mean == tuple(ref.image_mean)
    assert ours.image_std == tuple(ref.image_std)
    assert ours.do_convert_rgb and ours.do_resize and ours.do_rescale and ours.do_normalize
    assert ours == ImageProcessor.from_dict(BLIP2_CONFIG)

    empty = ImageProcessor.from_dict({})
    assert empty == ImageProcessor()
    assert empty.size == (BlipImageProcessorPil().size.height, BlipImageProcessorPil().size.width)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ({"height": 224, "width": 160}, (224, 160)),
        ({"shortest_edge": 224}, (224, 224)),
        (336, (336, 336)),
        ([200, 100], (200, 100)),
    ],
)
def test_size_forms(size: object, expected: tuple[int, int]) -> None:
    assert ImageProcessor.from_dict({"size": size}).size == expected


def test_from_pretrained_matches_auto_image_processor(tmp_path) -> None:
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(BLIP2_CONFIG))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = AutoImageProcessor.from_pretrained(tmp_path)
    assert ref.backend == "pil"  # torchvision is absent: the reference takes the PIL path
    image = photo("chelsea")
    ours = ImageProcessor.from_pretrained(tmp_path)([image])
    assert_identical(ours, ref(images=[image], return_tensors="pt")["pixel_values"])


def test_to_dict_round_trips(tmp_path) -> None:
    processor = ImageProcessor.from_dict({**BLIP2_CONFIG, "size": {"height": 96, "width": 128}})
    assert ImageProcessor.from_dict(processor.to_dict()) == processor
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor.to_dict()))
    assert ImageProcessor.from_pretrained(tmp_path) == processor
    assert ImageProcessor.from_pretrained(tmp_path / "missing") == ImageProcessor()


def test_output_shape_and_dtype() -> None:
    processor = ImageProcessor.from_dict(BLIP2_CONFIG)
    images = [Image.new("RGB", (50, 30), "red"), Image.new("L", (7, 900), 128)]
    pixels = processor(images)
    assert pixels.shape == (2, 3, 224, 224)
    assert pixels.dtype == torch.float32
    assert processor([]).shape == (0, 3, 224, 224)


def test_decoded_jpeg_matches_reference_on_the_same_file() -> None:
    """load_image (EXIF off, as the reference) + ImageProcessor == reference on Image.open."""
    buffer = io.BytesIO()
    Image.fromarray(load_sample_image("flower.jpg")).save(buffer, format="JPEG", quality=85)
    jpeg = buffer.getvalue()
    ours = ImageProcessor.from_dict(BLIP2_CONFIG)([load_image(jpeg, exif_transpose=False)])
    assert_identical(ours, reference(BLIP2_CONFIG, [Image.open(io.BytesIO(jpeg))]))
