"""Image-text matching with a stage-1 BLIP-2 checkpoint (e.g. ``Salesforce/blip2-itm-vit-g``).

    import blipserve
    matcher = blipserve.load_matcher("Salesforce/blip2-itm-vit-g", device="cuda")
    matcher.similarity(["cat.jpg", "dog.jpg"], ["a cat", "a dog"])  # (2, 2) cosine (ITC)
    matcher.match(["cat.jpg"], ["a cat on a sofa"])                  # [0.97]  P(match), ITM

``similarity`` is fast (each image and text encoded once; use it to rank many
candidates); ``match`` runs image and text through the Q-Former together, pair by pair
(use it to re-rank a few).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch

from blipserve.errors import InvalidRequest, UnsupportedModel
from blipserve.model.retrieval import (
    Blip2Retrieval,
    Blip2RetrievalConfig,
    is_retrieval_config,
    similarity,
)
from blipserve.processing.image_processor import ImageProcessor
from blipserve.processing.images import load_images
from blipserve.processing.qformer_text import TextCodec
from blipserve.resolve import resolve_device, resolve_dtype, resolve_matcher_checkpoint
from blipserve.weights import load_model


def load_matcher(
    model: str, *, device: str | torch.device | None = "auto", dtype: str | None = "auto"
) -> Matcher:
    """Load an image-text matching checkpoint: ``demo`` (the bundled demo matcher), a
    local directory or a Hub id."""
    directory = resolve_matcher_checkpoint(model)
    raw = json.loads((directory / "config.json").read_text())
    if not is_retrieval_config(raw):
        raise UnsupportedModel(
            f"{model} is not an image-text matching checkpoint (its config.json does not name "
            "Blip2ForImageTextRetrieval); captioning checkpoints load with blipserve.load"
        )
    target = resolve_device(device)
    config = Blip2RetrievalConfig.from_hf(raw)
    loaded = load_model(directory, config, device=target, dtype=resolve_dtype(dtype, target))
    assert isinstance(loaded, Blip2Retrieval)
    return Matcher(
        loaded, TextCodec.from_pretrained(directory), ImageProcessor.from_pretrained(directory)
    )


class Matcher:
    """Scores images against texts; see the module docstring."""

    def __init__(self, model: Blip2Retrieval, codec: TextCodec, image_processor: ImageProcessor):
        self.model = model.eval()
        self.codec = codec
        self.image_processor = image_processor

    @property
    def device(self) -> torch.device:
        return self.model.query_tokens.device

    def _image_sequence(self, images: Sequence[Any]) -> torch.Tensor:
        """Images (paths, bytes, base64, URLs, PIL) -> (B, S, d_vision) encoder outputs, float32."""
        if not images:
            raise InvalidRequest("no images given")
        pixels = self.image_processor(load_images(list(images)))  # (B, 3, H, W)
        return self.model.vision_features(pixels)

    def _texts(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise InvalidRequest("texts must be a non-empty list of non-empty strings")
        ids, mask = self.codec(texts)
        return ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def similarity(self, images: Sequence[Any], texts: Sequence[str]) -> torch.Tensor:
        """(len(images), len(texts)) cosine similarities (ITC), on the CPU."""
        image_features = self.model.image_features(self._image_sequence(images))
        text_features = self.model.text_features(*self._texts(texts))
        return similarity(image_features.float(), text_features.float()).cpu()

    @torch.inference_mode()
    def match(self, images: Sequence[Any], texts: Sequence[str]) -> list[float]:
        """P(image i matches text i) for each pair (ITM)."""
        if len(images) != len(texts):
            raise InvalidRequest(f"{len(images)} images but {len(texts)} texts: match pairs them")
        logits = self.model.match_logits(self._image_sequence(images), *self._texts(texts))
        return logits.float().softmax(dim=-1)[:, 1].tolist()
