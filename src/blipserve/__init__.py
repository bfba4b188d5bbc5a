"""blipserve: self-hosted BLIP-2 image-to-text (captioning, VQA, chat).

    import blipserve
    pipe = blipserve.load("Salesforce/blip2-opt-2.7b", device="cuda", dtype="bfloat16")
    pipe.caption(["cat.jpg"])          # ["a cat sitting on a couch"]

Public names are imported on first use, so ``import blipserve`` (and ``blipserve --help``)
stays fast and submodules can be imported on their own.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "load": "blipserve.api",
    "load_matcher": "blipserve.matching",
    "Matcher": "blipserve.matching",
    "Pipeline": "blipserve.api",
    "Generation": "blipserve.outputs",
    "GenerationParams": "blipserve.engine.params",
    "BlipserveError": "blipserve.errors",
    "CheckpointError": "blipserve.errors",
    "InvalidImage": "blipserve.errors",
    "InvalidRequest": "blipserve.errors",
    "ModelNotFound": "blipserve.errors",
    "UnsupportedModel": "blipserve.errors",
}

__all__ = sorted([*_EXPORTS, "__version__"])

if TYPE_CHECKING:
    from blipserve.api import Pipeline, load
    from blipserve.engine.params import GenerationParams
    from blipserve.errors import (
        BlipserveError,
        CheckpointError,
        InvalidImage,
        InvalidRequest,
        ModelNotFound,
        UnsupportedModel,
    )
    from blipserve.outputs import Generation


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'blipserve' has no attribute {name!r}")
