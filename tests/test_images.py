"""load_image: every accepted input form, EXIF orientation, and clear errors for bad inputs.

Network tests talk only to an http.server on 127.0.0.1 started here, so they pass a
``UrlPolicy`` that allows private addresses; tests/test_fetch.py covers the refusals.
"""

from __future__ import annotations

import base64
import io
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from blipserve.errors import InvalidImage
from blipserve.processing.fetch import UrlPolicy, fetch_url
from blipserve.processing.images import check_image, load_image, load_images
from blipserve.processing.limits import ImageLimits
from tests.examples import png_bytes
from tests.live_server import free_port

LOCAL = UrlPolicy(allow_private=True)  # the test server listens on 127.0.0.1


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)


PIXELS = skdata.chelsea()[:96, :128]  # (96, 128, 3) uint8, a real photo crop


def encode_jpeg(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **options)
    return buffer.getvalue()


PNG = png_bytes(Image.fromarray(PIXELS))
JPEG = encode_jpeg(Image.fromarray(PIXELS), quality=90)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height 1-bit pixels; its data is a few bytes of zeros."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
        + chunk(b"IEND", b"")
    )


def assert_invalid(source: object, *fragments: str, **kwargs) -> InvalidImage:
    with pytest.raises(InvalidImage) as info:
        load_image(source, **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert info.value.__class__ is InvalidImage
    return info.value


# --- a tiny local HTTP server -----------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        path = self.path
        if path == "/cat.png":
            self.reply(200, PNG)
        elif path.startswith("/hop/"):
            remaining = int(path.removeprefix("/hop/"))
            target = "/cat.png" if remaining == 0 else f"/hop/{remaining - 1}"
            self.redirect(target)
        elif path == "/to-file":
            self.redirect("file:///etc/passwd")
        elif path == "/big":
            self.reply(200, b"\0" * 5000)
        elif path == "/big-unannounced":
            self.send_response(200)
            self.end_headers()  # no Content-Length: the body runs until the connection closes
            self.wfile.write(b"\0" * 5000)
            self.close_connection = True
        elif path == "/trickle":
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(30):  # 3 s in all, 10 bytes at a time
                    self.wfile.write(b"\0" * 10)
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:  # the client gave up, as it should
                pass
            self.close_connection = True
        elif path == "/slow":
            time.sleep(1.0)
            self.reply(200, PNG)
        else:
            self.reply(404, b"not here")

    def reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


Handler.protocol_version = "HTTP/1.0"


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


# --- every input form gives the same pixels ---------------------------------------------------


def input_forms(tmp_path: Path, url: str) -> dict[str, object]:
    path = tmp_path / "cat.png"
    path.write_bytes(PNG)
    b64 = base64.b64encode(PNG).decode()
    return {
        "pil": Image.fromarray(PIXELS),
        "numpy": PIXELS,
        "numpy-float": PIXELS.astype(np.float32) / 255,
        "path-str": str(path),
        "path-object": path,
        "bytes": PNG,
        "bytearray": bytearray(PNG),
        "base64": b64,
        "base64-mime": base64.encodebytes(PNG).decode(),
        "base64-padded-whitespace": f"  \n{b64}\r\n ",
        "data-url": f"data:image/png;base64,{b64}",
        "data-url-mime": "data:image/png;base64," + base64.encodebytes(PNG).decode(),
        "url": f"{url}/cat.png",
        "url-redirected": f"{url}/hop/2",
    }


def test_every_input_form_gives_the_same_pixels(tmp_path: Path, server: str) -> None:
    forms = input_forms(tmp_path, server)
    assert "\n" in forms["base64-mime"]  # MIME base64 breaks lines every 76 characters
    for name, source in forms.items():
        image = load_image(source, url_policy=LOCAL)
        assert image.mode == "RGB", name
        np.testing.assert_array_equal(np.asarray(image), PIXELS, err_msg=name)


def test_images_keep_their_own_mode() -> None:
    gray = Image.fromarray(skdata.camera()[:64, :64])
    assert load_image(png_bytes(gray)).mode == "L"
    assert load_image(png_bytes(gray.convert("RGBA"))).mode == "RGBA"
    assert load_image(png_bytes(gray.quantize(16))).mode == "P"
    assert load_image(np.zeros((8, 8, 4), np.uint8)).mode == "RGBA"
    assert load_image(np.zeros((8, 8), np.uint8)).mode == "L"


def test_pil_inputs_are_fully_decoded(tmp_path: Path) -> None:
    path = tmp_path / "cut.jpg"
    path.write_bytes(JPEG[:1200])
    lazy = Image.open(path)  # opening reads the header only
    assert_invalid(lazy, "truncated or corrupt image data", "JPEG")


# --- EXIF orientation -------------------------------------------------------------------------


def jpeg_with_orientation(orientation: int) -> bytes:
    image = Image.fromarray(PIXELS)  # 128 wide, 96 tall
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode_jpeg(image, quality=95, exif=exif.tobytes())


def test_exif_orientation_applied_by_default() -> None:
    rotated = load_image(jpeg_with_orientation(6))  # 6: rotate 90 degrees clockwise to display
    assert rotated.size == (96, 128)
    raw = load_image(jpeg_with_orientation(6), exif_transpose=False)
    assert raw.size == (128, 96)
    expected = np.asarray(raw.transpose(Image.Transpose.ROTATE_270))
    np.testing.assert_array_equal(np.asarray(rotated), expected)


def test_exif_orientation_normal_is_untouched() -> None:
    image = load_image(jpeg_with_orientation(1))
    assert image.size == (128, 96)


# --- bad inputs -------------------------------------------------------------------------------


def test_text_bytes() -> None:
    assert_invalid(b"this is not a jpg", "not an image", "17 bytes of text")


def test_html_bytes() -> None:
    assert_invalid(b"<html><body>Access denied</body></html>", "not an image", "HTML")


def test_truncated_jpeg() -> None:
    error = assert_invalid(JPEG[:1200], "truncated or corrupt image data", "JPEG", "1200 bytes")
    assert error.__cause__ is not None  # the decoder's own error stays attached for logs


def test_decompression_bomb_beyond_pil_limit() -> None:
    bomb = png_header_only(30000, 30000)
    assert len(bomb) < 200
    assert_invalid(bomb, "900 megapixels", "over the 40 megapixel limit")
    # a number a person reads, not 1e+04
    assert_invalid(png_header_only(100000, 100000), "image is 10,000 megapixels, over the 40")


def test_too_many_pixels_refused_before_decoding() -> None:
    # 50 megapixels: under PIL's own bomb threshold, over ours. The header is all there is,
    # so reaching the decoder would report a truncated image instead.
    assert_invalid(png_header_only(10000, 5000), "10000x5000 = 50 megapixels", "40 megapixel")


def test_pixel_limit_applies_to_arrays_and_pil_images() -> None:
    limits = ImageLimits(max_pixels=1000)
    assert_invalid(PIXELS, "128x96", "over the 0.001 megapixel limit", limits=limits)
    assert_invalid(Image.fromarray(PIXELS), "128x96", limits=limits)


def test_encoded_size_limit() -> None:
    limits = ImageLimits(max_bytes=1000)
    assert_invalid(PNG, "over the", "MB limit", limits=limits)
    assert_invalid(base64.b64encode(PNG).decode(), "over the", limits=limits)


def test_empty_inputs() -> None:
    assert_invalid("", "empty string")
    assert_invalid("   \n", "empty string")
    assert_invalid(b"", "empty image data")
    assert_invalid("data:image/png;base64,", "no image data")


def test_invalid_base64() -> None:
    assert_invalid("hello world!", "not a file path, URL or base64 image", "12 characters")
    assert_invalid("data:image/png;base64,@@@not-base64@@@", "invalid base64 in data URL")
    assert_invalid("data:image/png,rawbytes", "must be base64-encoded")


def test_base64_of_non_image() -> None:
    assert_invalid(base64.b64encode(b"just some words").decode(), "not an image", "15 bytes")
    assert_invalid(bytes(range(20)), "20 bytes of binary data starting 00 01 02")


def test_truncated_jpeg_base64_is_not_mistaken_for_a_path() -> None:
    b64 = base64.b64encode(JPEG[:150]).decode()
    assert b64.startswith("/9j/")  # looks like an absolute path, but is a JPEG
    assert_invalid(b64, "truncated or corrupt image data", "150 bytes")


def test_missing_path_that_is_also_valid_base64() -> None:
    assert base64.b64decode("/data/images/img", validate=True)  # 16 base64 characters
    assert_invalid("/data/images/img", "no such file: '/data/images/img'")


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jpg"
    assert_invalid(missing, "no such file", "nope.jpg")
    assert_invalid(str(missing), "no such file", "nope.jpg")
    assert_invalid(str(tmp_path), "is a directory")
    assert_invalid(tmp_path, "is a directory")


def test_bad_arrays() -> None:
    assert_invalid(np.zeros((4, 4, 2), np.uint8), "shape (4, 4, 2)")
    assert_invalid(np.full((4, 4), 2.0), "values in [0, 1]")
    assert_invalid(np.full((4, 4), np.nan, np.float32), "values in [0, 1]")
    assert_invalid(np.full((4, 4), 300, np.int64), "[0, 255]")
    assert_invalid(np.zeros((4, 4), bool), "unsupported array dtype")


def test_unsupported_type() -> None:
    assert_invalid(12345, "unsupported image input of type int")


def test_unsupported_url_schemes() -> None:
    assert_invalid("file:///etc/passwd", "unsupported URL scheme 'file'")
    assert_invalid("ftp://127.0.0.1/cat.png", "unsupported URL scheme 'ftp'")


def test_url_404(server: str) -> None:
    assert_invalid(f"{server}/missing.jpg?sig=secret", "HTTP 404", "/missing.jpg", url_policy=LOCAL)
    with pytest.raises(InvalidImage) as info:
        load_image(f"{server}/missing.jpg?sig=secret", url_policy=LOCAL)
    assert "secret" not in str(info.value)  # signed-URL tokens are not echoed


def test_url_connection_refused() -> None:
    port = free_port()
    assert_invalid(
        f"http://127.0.0.1:{port}/cat.png",
        f"127.0.0.1:{port}",
        "connection refused",
        url_policy=LOCAL,
    )


def test_url_over_byte_cap(server: str) -> None:
    limits = ImageLimits(max_bytes=1000)
    assert_invalid(f"{server}/big", "5000 bytes, over the", limits=limits, url_policy=LOCAL)
    assert_invalid(f"{server}/big-unannounced", "over the", limits=limits, url_policy=LOCAL)


def test_url_too_many_redirects(server: str) -> None:
    assert load_image(f"{server}/hop/2", url_policy=LOCAL).size == (128, 96)  # 3 redirects: allowed
    assert_invalid(f"{server}/hop/3", "too many redirects", "more than 3", url_policy=LOCAL)
    one = ImageLimits(max_redirects=1)
    assert_invalid(f"{server}/hop/1", "too many redirects", limits=one, url_policy=LOCAL)


def test_url_redirect_to_other_scheme_refused(server: str) -> None:
    assert_invalid(f"{server}/to-file", "redirect refused", "'file'", url_policy=LOCAL)


def test_url_read_timeout(server: str) -> None:
    limits = ImageLimits(timeout_s=0.2)
    assert_invalid(f"{server}/slow", "timed out", limits=limits, url_policy=LOCAL)


def test_url_total_time_limit(server: str) -> None:
    # Each read arrives well within timeout_s; only the overall deadline stops the download.
    start = time.monotonic()
    limits = ImageLimits(total_timeout_s=0.3)
    assert_invalid(f"{server}/trickle", "took over 0.3 s", limits=limits, url_policy=LOCAL)
    assert time.monotonic() - start < 1.5


def test_url_invalid_port() -> None:
    assert_invalid("http://127.0.0.1:notaport/cat.png", "invalid port")


def test_fetch_url_returns_bytes(server: str) -> None:
    assert fetch_url(f"{server}/cat.png", policy=LOCAL) == PNG


# --- rows -------------------------------------------------------------------------------------


def test_row_is_reported() -> None:
    error = assert_invalid(b"nope", "row 7:", row=7)
    assert error.row == 7
    assert error.reason.startswith("not an image")


def test_load_images_names_the_bad_index() -> None:
    good = base64.b64encode(PNG).decode()
    assert len(load_images([good, PNG, PIXELS])) == 3
    with pytest.raises(InvalidImage) as info:
        load_images([good, PNG, "not an image!", PIXELS])
    assert info.value.row == 2
    assert str(info.value).startswith("row 2: not a file path")


def test_paths_can_be_refused_for_client_strings(tmp_path):
    """A server passes allow_paths=False: a client's string must never read a local file."""
    path = tmp_path / "local.png"
    Image.new("RGB", (8, 8), "red").save(path)
    assert load_image(str(path)).size == (8, 8)  # the CLI and Python API read paths
    with pytest.raises(InvalidImage, match="file paths are not read here"):
        load_image(str(path), allow_paths=False)
    with pytest.raises(InvalidImage, match="unsupported image input"):
        load_image(path, allow_paths=False)
    text = tmp_path / "notes.txt"
    text.write_text("secret words")
    with pytest.raises(InvalidImage) as err:
        load_image(str(text), allow_paths=False)
    assert "secret" not in str(err.value)
    encoded = base64.b64encode(png_bytes("blue", (8, 8))).decode()
    assert load_image(encoded, allow_paths=False).size == (8, 8)


def test_check_image_reads_headers_only_and_fetches_nothing() -> None:
    """check_image refuses what load_image refuses before the pixels, with the same
    message, without decoding them (a truncated file passes) or fetching a URL."""
    big = base64.b64encode(png_header_only(8000, 6000)).decode()
    with pytest.raises(InvalidImage, match="8000x6000 = 48 megapixels") as checked:
        check_image(big, row=3)
    with pytest.raises(InvalidImage) as loaded:
        load_image(big, row=3)
    assert (checked.value.row, str(checked.value)) == (loaded.value.row, str(loaded.value))
    truncated = png_bytes("red", (64, 64))[:-40]
    check_image(truncated)  # the header is fine
    assert_invalid(truncated, "truncated or corrupt")
    check_image(f"http://127.0.0.1:{free_port()}/nothing-listens-here.png")
    with pytest.raises(InvalidImage, match="unsupported URL scheme 'ftp'"):
        check_image("ftp://example.com/a.png")
