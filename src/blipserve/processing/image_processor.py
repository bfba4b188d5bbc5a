"""PIL images -> normalised pixel tensors, bit-identical to the reference BLIP image processor.

The reference is transformers' ``BlipImageProcessorPil`` (what ``BlipImageProcessor`` and
``AutoImageProcessor`` give when torchvision is not installed). Per image it does, in order:

1. convert to RGB: images with an alpha band or a ``transparency`` entry are composited onto
   white, everything else goes through ``Image.convert("RGB")``;
2. resize to (height, width) with PIL (bicubic for BLIP-2 checkpoints, ``reducing_gap=None``);
3. rescale: ``uint8 -> float64``, times ``rescale_factor``, then cast to float32;
4. normalise in float32: ``(x - mean) / std`` with mean and std as float32;
5. channels first.

Doing step 3 in float32 instead moves values by up to ~2.4e-7, so we keep the float64 detour.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from blipserve.errors import CheckpointError, InvalidImage

CONFIG_NAME = "preprocessor_config.json"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The reference class default; every BLIP-2 checkpoint overrides it with 224x224.
DEFAULT_SIZE = (384, 384)
# ``preprocessor_config.json`` of the Salesforce/blip2-opt-* checkpoints, written out in full.
BLIP2_PREPROCESSOR_CONFIG: dict[str, Any] = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": list(OPENAI_CLIP_MEAN),
    "image_std": list(OPENAI_CLIP_STD),
    "image_processor_type": "BlipImageProcessor",
    "resample": 3,
    "rescale_factor": 1 / 255,
    "size": {"height": 224, "width": 224},
}


@dataclass
class ImageProcessor:
    """Preprocessing settings, as in ``preprocessor_config.json``; call it on a batch of images.

    The defaults are the reference class defaults (``BlipImageProcessor``), which is what a
    config that omits a key gets.
    """

    size: tuple[int, int] = DEFAULT_SIZE  # (height, width)
    resample: int = int(Image.Resampling.BICUBIC)
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    do_convert_rgb: bool = True

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ImageProcessor:
        """Read a ``preprocessor_config.json`` dict; omitted keys take the defaults, unknown
        keys (``image_processor_type``, ``processor_class``...) are ignored."""
        default = cls()

        def get(key: str) -> Any:  # an explicit null means "the default", as in the reference
            value = config.get(key)
            return getattr(default, key) if value is None else value

        return cls(
            size=_parse_size(get("size")),
            resample=_parse_resample(get("resample")),
            do_resize=bool(get("do_resize")),
            do_rescale=bool(get("do_rescale")),
            rescale_factor=float(get("rescale_factor")),
            do_normalize=bool(get("do_normalize")),
            image_mean=_parse_channels(get("image_mean"), "image_mean"),
            image_std=_parse_channels(get("image_std"), "image_std"),
            do_convert_rgb=bool(get("do_convert_rgb")),
        )

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> ImageProcessor:
        """Read ``directory/preprocessor_config.json`` if present, else use the defaults."""
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            return cls()
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"cannot read {path}: {err}") from err
        if not isinstance(config, dict):
            raise CheckpointError(f"{path} must hold a JSON object")
        return cls.from_dict(config)

    def to_dict(self) -> dict[str, Any]:
        """The ``preprocessor_config.json`` form, readable by us and by transformers."""
        height, width = self.size
        return {
            "do_convert_rgb": self.do_convert_rgb,
            "do_normalize": self.do_normalize,
            "do_rescale": self.do_rescale,
            "do_resize": self.do_resize,
            "image_mean": list(self.image_mean),
            "image_processor_type": "BlipImageProcessor",
            "image_std": list(self.image_std),
            "resample": int(self.resample),
            "rescale_factor": self.rescale_factor,
            "size": {"height": height, "width": width},
        }

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Preprocess a batch of decoded images -> float32 pixel values (B, 3, H, W)."""
        pixels = [self.preprocess_one(image) for image in images]
        shapes = {tuple(p.shape) for p in pixels}
        if len(shapes) > 1:
            raise InvalidImage(f"images of different sizes cannot be batched: {sorted(shapes)}")
        if not pixels:
            height, width = self.size
            return torch.empty(0, 3, height, width)
        return torch.stack(pixels)  # (B, 3, H, W) float32

    def preprocess_one(self, image: Image.Image) -> torch.Tensor:
        """One image -> (3, H, W) float32."""
        if self.do_convert_rgb:
            image = convert_to_rgb(image)
        elif image.mode != "RGB":
            raise InvalidImage(f"image mode {image.mode!r} is not RGB and do_convert_rgb is off")
        if self.do_resize:
            height, width = self.size
            image = image.resize((width, height), resample=self.resample)
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # (3, H, W) uint8
        if self.do_rescale:
            x = (x.to(torch.float64) * self.rescale_factor).to(torch.float32)
        else:
            x = x.to(torch.float32)
        if self.do_normalize:
            mean = torch.tensor(self.image_mean, dtype=torch.float32).view(-1, 1, 1)
            std = torch.tensor(self.image_std, dtype=torch.float32).view(-1, 1, 1)
            x = (x - mean) / std
        return x.contiguous()


def convert_to_rgb(image: Image.Image) -> Image.Image:
    """RGB as the reference makes it: transparency composited onto white, else ``convert``."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _parse_size(size: Any) -> tuple[int, int]:
    """``{"height", "width"}``, ``{"shortest_edge"}``, an int or ``[h, w]`` -> (height, width).

    BLIP-2's vision tower has position embeddings for one square size, so ``shortest_edge: n``
    is read as n x n (the reference would keep the aspect ratio, which the model cannot take).
    """
    if isinstance(size, dict):
        if {"height", "width"} <= size.keys():
            return int(size["height"]), int(size["width"])
        if set(size) == {"shortest_edge"}:
            return int(size["shortest_edge"]), int(size["shortest_edge"])
    elif isinstance(size, int) and not isinstance(size, bool):
        return size, size
    elif isinstance(size, list | tuple) and len(size) == 2:
        return int(size[0]), int(size[1])
    raise CheckpointError(
        f"unsupported preprocessor size {size!r}; expected {{'height': h, 'width': w}}, "
        "{'shortest_edge': n} or an int"
    )


def _parse_resample(resample: Any) -> int:
    if isinstance(resample, int) and resample in {int(r) for r in Image.Resampling}:
        return int(resample)
    raise CheckpointError(f"unsupported resample {resample!r}; expected a PIL filter id (0-5)")


def _parse_channels(value: Any, name: str) -> tuple[float, ...]:
    """A per-channel list of 3 floats; a single float applies to all channels."""
    if isinstance(value, int | float):
        return (float(value),) * 3
    if isinstance(value, list | tuple) and len(value) == 3:
        return tuple(float(v) for v in value)
    raise CheckpointError(f"{name} must be 3 floats (one per RGB channel), got {value!r}")
