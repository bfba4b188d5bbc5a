"""Limits on image inputs, and the helpers their messages share.

Both image decoding (:mod:`blipserve.processing.images`) and URL fetching
(:mod:`blipserve.processing.fetch`) enforce these, so they live below both.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_IMAGE_BYTES = 20 * 1024 * 1024  # encoded size: file, download or decoded base64
MAX_IMAGE_PIXELS = 40_000_000  # width * height, checked before decoding
URL_TIMEOUT_S = 10.0  # connect, and each read
URL_TOTAL_TIMEOUT_S = 30.0  # the whole download, so a trickling server cannot hold a worker
MAX_REDIRECTS = 3


@dataclass(frozen=True)
class ImageLimits:
    """Limits applied to every image input; the defaults suit a public server."""

    max_bytes: int = MAX_IMAGE_BYTES
    max_pixels: int = MAX_IMAGE_PIXELS
    timeout_s: float = URL_TIMEOUT_S
    total_timeout_s: float = URL_TOTAL_TIMEOUT_S
    max_redirects: int = MAX_REDIRECTS


DEFAULT_LIMITS = ImageLimits()


def preview(text: str, limit: int = 60) -> str:
    """repr of text, cut in the middle when long so both ends (a file name) stay visible."""
    if len(text) > limit:
        head = (limit - 3) // 2
        text = text[:head] + "..." + text[len(text) - (limit - 3 - head) :]
    return repr(text)


def megabytes(nbytes: int) -> str:
    """``20971520`` -> ``'20 MB'``."""
    return f"{nbytes / (1024 * 1024):g} MB"


def megapixels(pixels: int) -> str:
    """A pixel count as a person reads it in megapixels: ``40_000_000`` -> ``'40'``,
    ``1e10`` -> ``'10,000'``, ``1_000`` -> ``'0.001'`` (never ``'1e+04'``)."""
    value = pixels / 1e6
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"
