"""Turn whatever a user sends (PIL image, array, path, bytes, base64, URL) into a decoded PIL image.

Every failure raises :class:`~blipserve.errors.InvalidImage` with a message the user can act on
and, in a batch, the row of the offending input. Size limits are checked before pixel data is
decoded, so a small file that claims huge dimensions (a decompression bomb) costs nothing.
URLs are downloaded by :mod:`blipserve.processing.fetch`, which refuses private addresses
unless a ``UrlPolicy`` allows them.

The image is returned in its own mode (``L``, ``RGBA``, ``P``, ``CMYK``...): converting to RGB is
the image processor's job, done exactly as the reference does it.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from blipserve.errors import InvalidImage
from blipserve.processing.fetch import DEFAULT_URL_POLICY, UrlPolicy, check_url, fetch_url
from blipserve.processing.limits import (
    DEFAULT_LIMITS,
    ImageLimits,
    megabytes,
    megapixels,
    preview,
)

# Formats we decode. Restricting them keeps PIL away from plugins that shell out (EPS) or are
# rarely what a client meant to send.
SUPPORTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")  # JPEG covers MPO

_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_FILE_SUFFIX = re.compile(r"\.[A-Za-z][A-Za-z0-9]{1,4}$")
# First bytes of the SUPPORTED_FORMATS: JPEG, PNG, GIF, BMP, TIFF (both byte orders), WEBP.
_IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"II*\0", b"MM\0*", b"RIFF")


def load_image(
    source: Any,
    *,
    row: int | None = None,
    limits: ImageLimits = DEFAULT_LIMITS,
    exif_transpose: bool = True,
    url_policy: UrlPolicy | None = None,
    allow_paths: bool = True,
) -> Image.Image:
    """Decode one image input into a fully loaded PIL image in its own mode.

    ``source`` may be a PIL image, a numpy array (HxW, HxWx3, HxWx4; uint8, or float in [0, 1]),
    a path (str or os.PathLike), raw encoded bytes, a base64 string (plain, MIME with line
    breaks, or a ``data:image/...;base64,`` URL) or an http(s) URL. EXIF orientation is applied
    unless ``exif_transpose`` is False (the reference model code does not apply it).
    ``url_policy`` says which addresses a URL may be fetched from (None: public ones only).
    ``allow_paths=False`` refuses file paths: what a server must do with strings from clients.
    """
    try:
        image = _to_image(source, limits, url_policy, allow_paths)
    except InvalidImage as err:
        raise InvalidImage(err.reason, row=row, transient=err.transient) from err.__cause__
    return _apply_exif_orientation(image) if exif_transpose else image


def check_image(
    source: Any, *, row: int | None = None, limits: ImageLimits = DEFAULT_LIMITS
) -> None:
    """Raise the :class:`InvalidImage` that :func:`load_image` would raise for ``source``,
    reading only what comes before the pixels: the encoded size, the format and the pixel
    count from the header. URLs are checked for form (scheme, host, port), not fetched;
    pixel data is not decoded, so a truncated file passes here and fails when loaded."""
    try:
        text = source.strip() if isinstance(source, str) else ""
        if _URL_SCHEME.match(text):
            check_url(text)
        else:
            _to_image(source, limits, None, allow_paths=True, header_only=True)
    except InvalidImage as err:
        raise InvalidImage(err.reason, row=row, transient=err.transient) from err.__cause__


def load_images(
    sources: Sequence[Any],
    *,
    limits: ImageLimits = DEFAULT_LIMITS,
    exif_transpose: bool = True,
    url_policy: UrlPolicy | None = None,
    allow_paths: bool = True,
) -> list[Image.Image]:
    """Decode a batch of image inputs; an error names the index of the bad input as ``row``."""
    return [
        load_image(
            source,
            row=row,
            limits=limits,
            exif_transpose=exif_transpose,
            url_policy=url_policy,
            allow_paths=allow_paths,
        )
        for row, source in enumerate(sources)
    ]


def _to_image(
    source: Any,
    limits: ImageLimits,
    url_policy: UrlPolicy | None,
    allow_paths: bool,
    header_only: bool = False,
) -> Image.Image:
    """Dispatch on the input's type. Raises InvalidImage without a row. ``header_only``:
    encoded images are opened, not decoded (:func:`check_image`)."""
    if isinstance(source, Image.Image):
        _check_pixels(source.size, limits)
        return _load_pixels(source, limits, nbytes=None)
    if isinstance(source, np.ndarray):
        return _from_array(source, limits)
    if isinstance(source, bytes | bytearray | memoryview):
        return decode_image_bytes(bytes(source), limits, header_only=header_only)
    if isinstance(source, str):
        if not allow_paths:
            return _from_client_string(source, limits, url_policy, header_only)
        return _from_string(source, limits, url_policy, header_only)
    if isinstance(source, os.PathLike) and allow_paths:
        return decode_image_bytes(_read_file(source, limits), limits, header_only=header_only)
    raise InvalidImage(
        f"unsupported image input of type {type(source).__name__}; expected a PIL image, "
        "numpy array, file path, bytes, base64 string or http(s) URL"
    )


# --- strings: URL, data URL, path or base64 ---------------------------------------------------


def _from_string(
    text: str, limits: ImageLimits, url_policy: UrlPolicy | None, header_only: bool = False
) -> Image.Image:
    stripped = text.strip()
    if not stripped:
        raise InvalidImage("empty string; expected a file path, http(s) URL or base64 image")
    if encoded := _url_or_data_url(stripped, limits, url_policy):
        return decode_image_bytes(encoded, limits, header_only=header_only)
    if _exists(text):
        return decode_image_bytes(_read_file(text, limits), limits, header_only=header_only)
    data = _b64decode(stripped, limits)
    if data is not None:
        return _decode_base64_or_path(data, stripped, limits, header_only)
    if _looks_like_path(stripped):
        raise InvalidImage(f"no such file: {preview(stripped)}")
    raise InvalidImage(
        f"not a file path, URL or base64 image (got {len(stripped)} characters: "
        f"{preview(stripped)})"
    )


def _from_client_string(
    text: str, limits: ImageLimits, url_policy: UrlPolicy | None, header_only: bool = False
) -> Image.Image:
    """A string from a remote client: an http(s) URL, a data: URL or base64, never a path."""
    stripped = text.strip()
    if not stripped:
        raise InvalidImage("empty string; expected an http(s) URL or a base64 image")
    if encoded := _url_or_data_url(stripped, limits, url_policy):
        return decode_image_bytes(encoded, limits, header_only=header_only)
    data = _b64decode(stripped, limits)
    if data is None:
        raise InvalidImage(
            f"not an http(s) URL, data: URL or base64 image (got {len(stripped)} characters: "
            f"{preview(stripped)}); file paths are not read here"
        )
    return decode_image_bytes(data, limits, header_only=header_only)


def _url_or_data_url(text: str, limits: ImageLimits, url_policy: UrlPolicy | None) -> bytes | None:
    """The encoded image behind an http(s) or data: URL; None if ``text`` is neither."""
    if _URL_SCHEME.match(text):  # fetch_url refuses schemes other than http(s)
        return fetch_url(text, limits, url_policy or DEFAULT_URL_POLICY)
    if text[:5].lower() == "data:":
        return _decode_data_url(text, limits)
    return None


def _decode_base64_or_path(
    data: bytes, text: str, limits: ImageLimits, header_only: bool = False
) -> Image.Image:
    """Decode base64 payload bytes; a '/a/b'-like string that decodes to no known image format
    was probably a path (JPEG base64 starts with '/9j/', so '/' alone does not decide)."""
    try:
        return decode_image_bytes(data, limits, header_only=header_only)
    except InvalidImage as err:
        if not _looks_like_path(text) or _has_image_header(data):
            raise
        raise InvalidImage(
            f"no such file: {preview(text)} (read as base64 instead: {err.reason})"
        ) from None


def _has_image_header(data: bytes) -> bool:
    return data.startswith(_IMAGE_SIGNATURES)


def _exists(text: str) -> bool:
    # Long strings are base64 payloads, not paths; skip the pointless stat call.
    return len(text) < 4096 and os.path.exists(text)


def _looks_like_path(text: str) -> bool:
    return len(text) < 4096 and (
        text.startswith(("/", "./", "../", "~")) or "\\" in text or bool(_FILE_SUFFIX.search(text))
    )


def _b64decode(text: str, limits: ImageLimits) -> bytes | None:
    """Strict standard base64, ignoring whitespace (MIME line breaks); None if it is not base64."""
    compact = "".join(text.split())
    if len(compact) > limits.max_bytes * 4 // 3 + 4:
        limit = megabytes(limits.max_bytes)
        raise InvalidImage(f"base64 image is {len(compact)} characters, over the {limit} limit")
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return None
    return data or None


def _decode_data_url(text: str, limits: ImageLimits) -> bytes:
    header, comma, payload = text.partition(",")
    if not comma:
        raise InvalidImage("malformed data URL: no ',' between the header and the data")
    if not header.lower().endswith(";base64"):
        raise InvalidImage(
            f"data URL must be base64-encoded (expected 'data:image/...;base64,', got {header!r})"
        )
    if not payload.strip():
        raise InvalidImage("data URL carries no image data")
    data = _b64decode(payload, limits)
    if data is None:
        raise InvalidImage(f"invalid base64 in data URL ({len(payload)} characters)")
    return data


# --- files and arrays -------------------------------------------------------------------------


def _read_file(path: str | os.PathLike, limits: ImageLimits) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(limits.max_bytes + 1)
    except FileNotFoundError:
        raise InvalidImage(f"no such file: {preview(os.fspath(path))}") from None
    except IsADirectoryError:
        raise InvalidImage(f"{preview(os.fspath(path))} is a directory, not an image") from None
    except OSError as err:
        raise InvalidImage(f"cannot read {preview(os.fspath(path))}: {err.strerror}") from err
    if len(data) > limits.max_bytes:
        limit = megabytes(limits.max_bytes)
        raise InvalidImage(f"file {Path(path).name!r} is over the {limit} limit")
    return data


def _from_array(array: np.ndarray, limits: ImageLimits) -> Image.Image:
    """(H, W), (H, W, 1|3|4) uint8 (or float in [0, 1], or integers in [0, 255]) -> PIL image."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise InvalidImage(
            f"array of shape {array.shape} is not an image; expected (H, W), (H, W, 3) or (H, W, 4)"
        )
    if array.size == 0:
        raise InvalidImage(f"array of shape {array.shape} has no pixels")
    _check_pixels((array.shape[1], array.shape[0]), limits)
    return Image.fromarray(np.ascontiguousarray(_to_uint8(array)))


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        low, high = float(np.min(array)), float(np.max(array))
        if not (np.isfinite(low) and np.isfinite(high) and low >= 0.0 and high <= 1.0):
            raise InvalidImage(
                f"float image arrays must hold values in [0, 1] (got min {low:g}, max {high:g}); "
                "pass uint8 for 0-255 pixel values"
            )
        return np.round(array * 255.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer) and array.dtype != np.bool_:
        low, high = int(np.min(array)), int(np.max(array))
        if low >= 0 and high <= 255:
            return array.astype(np.uint8)
        raise InvalidImage(
            f"integer image arrays must hold values in [0, 255] (got {array.dtype} with min "
            f"{low}, max {high})"
        )
    raise InvalidImage(f"unsupported array dtype {array.dtype}; expected uint8 or float in [0, 1]")


# --- decoding ---------------------------------------------------------------------------------


def decode_image_bytes(
    data: bytes, limits: ImageLimits = DEFAULT_LIMITS, *, header_only: bool = False
) -> Image.Image:
    """Decode encoded image bytes, refusing oversized inputs before the pixels are decoded
    (``header_only``: open and check them, but do not decode the pixels)."""
    if not data:
        raise InvalidImage("empty image data (0 bytes)")
    if len(data) > limits.max_bytes:
        raise InvalidImage(
            f"image data is {len(data)} bytes, over the {megabytes(limits.max_bytes)} limit"
        )
    try:
        image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except UnidentifiedImageError:
        raise InvalidImage(f"not an image (got {_describe_bytes(data)})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise InvalidImage(_bomb_message(err, limits)) from None
    except Exception as err:  # PIL's parsers raise many types on hostile headers
        raise InvalidImage(f"truncated or corrupt image data ({len(data)} bytes): {err}") from err
    _check_pixels(image.size, limits)
    return image if header_only else _load_pixels(image, limits, nbytes=len(data))


def _load_pixels(image: Image.Image, limits: ImageLimits, *, nbytes: int | None) -> Image.Image:
    """Decode the pixel data now, so truncated files fail here and not in the model worker."""
    try:
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise InvalidImage(_bomb_message(err, limits)) from None
    except Exception as err:  # decoders raise OSError, SyntaxError, ValueError, zlib.error...
        what = ", ".join(str(x) for x in (image.format, nbytes and f"{nbytes} bytes") if x)
        raise InvalidImage(f"truncated or corrupt image data ({what or image.mode})") from err
    return image


def _check_pixels(size: tuple[int, int], limits: ImageLimits) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise InvalidImage(f"image has no pixels ({width}x{height})")
    if width * height > limits.max_pixels:
        raise InvalidImage(
            f"image is {width}x{height} = {megapixels(width * height)} megapixels, over the "
            f"{megapixels(limits.max_pixels)} megapixel limit"
        )


def _bomb_message(err: Exception, limits: ImageLimits) -> str:
    # PIL refuses images far beyond its own limit inside Image.open, before we can read .size;
    # its message carries the pixel count.
    match = re.search(r"\((\d+) pixels\)", str(err))
    size = f"{megapixels(int(match.group(1)))} megapixels" if match else "too large"
    return (
        f"image is {size}, over the {megapixels(limits.max_pixels)} megapixel limit "
        "(refused before decoding)"
    )


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a corrupt EXIF block should not cost the user their caption
        return image


# --- message helpers --------------------------------------------------------------------------


def _describe_bytes(data: bytes) -> str:
    try:
        text = data[:4096].decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if not text or not "".join(text.split()).isprintable():
        return f"{len(data)} bytes of binary data starting {data[:8].hex(' ')}"
    kind = "HTML" if text.lstrip()[:1] == "<" else "text"
    return f"{len(data)} bytes of {kind}: {preview(text)}"
