"""The one decoder: unusual but valid images are accepted and right; bad input gives typed errors."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from harness.data import (
    bomb_png,
    check_decode_or_typed_error,
    image_bytes,
    jpeg_bytes,
    png_bytes,
    shape_image,
    truncated_jpeg,
)
from imgsearch.errors import CorruptImage, ImageTooLarge, UnsupportedImage
from imgsearch.imaging import decode_image, sniff_format, thumbnail

RED, BLUE, GREEN = (230, 20, 20), (20, 20, 230), (20, 200, 20)


def halves(w: int, h: int, left=RED, right=BLUE) -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = left
    a[:, w // 2 :] = right
    return Image.fromarray(a)


def mean(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1, 3).mean(0)


def close(colour, expected, tol=25) -> bool:
    return bool(np.all(np.abs(np.asarray(colour, float) - np.asarray(expected, float)) <= tol))


def test_plain_jpeg_shape_dtype_and_colours():
    out = decode_image(jpeg_bytes(halves(300, 200), 95))
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8 and out.flags["C_CONTIGUOUS"]
    assert close(mean(out[:, :100]), RED) and close(mean(out[:, 124:]), BLUE)


def test_large_jpeg_uses_draft_and_still_resizes_exactly():
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1500, 2000, 3), dtype=np.uint8))
    assert decode_image(jpeg_bytes(big, 80)).shape == (224, 224, 3)


def test_cmyk_jpeg_becomes_rgb():
    # CMYK (0, 255, 255, 0): no cyan, full magenta + yellow = red
    im = Image.new("CMYK", (64, 48), (0, 255, 255, 0))
    data = image_bytes(im, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_image(data)
    r, g, b = mean(out)
    assert r > 200 and g < 60 and b < 60, (r, g, b)


def test_16bit_png_scaled_not_clipped():
    a = np.tile(np.linspace(0, 65535, 256, dtype=np.uint16), (32, 1))
    im = Image.fromarray(a)
    im16 = im if im.mode.startswith("I;16") else im.convert("I;16")
    data = image_bytes(im16, "PNG")
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I;16B", "I")
    out = decode_image(data)
    assert np.all(out[..., 0] == out[..., 1]) and np.all(out[..., 1] == out[..., 2])  # grey
    left, right = out[:, :20].mean(), out[:, -20:].mean()
    assert left < 30 and right > 225, (left, right)  # a plain convert("L") would clip to 255 everywhere


def test_rgba_png_transparent_pixels_are_white():
    a = np.zeros((50, 100, 4), np.uint8)
    a[:, :50] = (*RED, 255)  # opaque red
    a[:, 50:] = (0, 0, 0, 0)  # fully transparent black
    out = decode_image(png_bytes(Image.fromarray(a, "RGBA")))
    assert close(mean(out[:, :100]), RED) and close(mean(out[:, 124:]), (255, 255, 255), 2)


def test_palette_gif_and_png():
    im = halves(80, 40, RED, GREEN).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    for fmt in ("GIF", "PNG"):
        data = image_bytes(im, fmt)
        assert Image.open(io.BytesIO(data)).mode == "P"
        out = decode_image(data)
        assert close(mean(out[:, :100]), RED) and close(mean(out[:, 124:]), GREEN), fmt


def test_animated_gif_gives_the_first_frame():
    frames = [Image.new("RGB", (40, 40), c).convert("P") for c in (RED, BLUE, GREEN)]
    data = image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    assert close(mean(decode_image(data)), RED)


def test_webp_and_bmp_and_greyscale():
    assert close(mean(decode_image(image_bytes(Image.new("RGB", (60, 30), BLUE), "WEBP", quality=90))), BLUE)
    assert close(mean(decode_image(image_bytes(Image.new("RGB", (60, 30), GREEN), "BMP"))), GREEN, 1)
    grey = decode_image(image_bytes(Image.new("L", (30, 30), 77), "PNG"))
    assert np.all(grey == 77)


@pytest.mark.parametrize("orientation, rotate", [(6, -1), (8, 1), (3, 2)])
def test_exif_orientation_is_applied(orientation, rotate):
    stored = halves(200, 100)  # stored pixels: left red, right blue
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = image_bytes(stored, "JPEG", quality=95, exif=exif.tobytes())
    out = decode_image(data).astype(float)
    # what a viewer shows: the stored pixels turned by the orientation tag (np.rot90 k=-1 is clockwise)
    expected = np.asarray(Image.fromarray(np.rot90(np.asarray(stored), k=rotate).copy()).resize((224, 224)))
    unrotated = np.asarray(stored.resize((224, 224)), float)
    err = np.abs(out - expected).mean()
    assert err < 15, err
    assert np.abs(out - unrotated).mean() > 4 * err  # and clearly not the stored layout


def test_tiny_image_is_upscaled():
    assert decode_image(png_bytes(Image.new("RGB", (1, 1), RED))).shape == (224, 224, 3)


def bad_crc_png() -> bytes:
    data = bytearray(png_bytes(shape_image(2, 3, 64)))
    # the IHDR chunk's CRC sits right after its 13 data bytes (8 signature + 8 header + 13)
    data[29] ^= 0xFF
    return bytes(data)


@pytest.mark.parametrize("name, data, error", [
    ("empty", b"", CorruptImage),
    ("text named .jpg", b"hello, this is not a picture\n" * 4, UnsupportedImage),
    ("html", b"<!doctype html><html><body>x</body></html>", UnsupportedImage),
    ("svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', UnsupportedImage),
    ("pdf", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n", UnsupportedImage),
    ("truncated jpeg", truncated_jpeg(), CorruptImage),
    ("jpeg magic only", b"\xff\xd8\xff\xe0" + b"\x00" * 64, CorruptImage),
    ("png bad crc", bad_crc_png(), CorruptImage),
    ("bomb 10000x10000", bomb_png(10000, 10000), ImageTooLarge),
])
def test_bad_input_gives_typed_errors(name, data, error):
    with pytest.raises(error):
        decode_image(data)


def test_tiff_is_refused_even_though_pillow_reads_it():
    data = image_bytes(Image.new("RGB", (20, 20), RED), "TIFF")
    assert sniff_format(data) is None
    with pytest.raises(UnsupportedImage):
        decode_image(data)


def test_pixel_limit_is_configurable():
    data = png_bytes(Image.new("RGB", (300, 300), RED))
    with pytest.raises(ImageTooLarge):
        decode_image(data, max_pixels=300 * 300 - 1)
    assert decode_image(data, max_pixels=300 * 300).shape == (224, 224, 3)


def test_thumbnail_keeps_aspect_and_rejects_bad_input():
    th = Image.open(io.BytesIO(thumbnail(io.BytesIO(jpeg_bytes(halves(400, 200))), 128)))
    assert th.format == "JPEG" and th.size == (128, 64)
    with pytest.raises(UnsupportedImage):
        thumbnail(io.BytesIO(b"GIF? no"))
    with pytest.raises(ImageTooLarge):
        thumbnail(io.BytesIO(bomb_png(10000, 10000)))


def test_thumbnail_reads_an_open_file_in_blocks_as_it_decodes():
    rng = np.random.default_rng(5)
    data = png_bytes(Image.fromarray(rng.integers(0, 256, (1200, 1500, 3), dtype=np.uint8)))
    reads = []

    class Recorded(io.BytesIO):
        def read(self, n: int | None = -1) -> bytes:
            out = super().read(n)
            reads.append(len(out))
            return out

    f = Recorded(data)
    f.seek(7)  # read from where the caller left it
    with pytest.raises(UnsupportedImage):
        thumbnail(f)
    f.seek(0)
    reads.clear()
    th = Image.open(io.BytesIO(thumbnail(f, 128)))
    assert th.size[0] == 128 and abs(th.size[1] - 128 * 1200 / 1500) <= 1, th.size  # aspect kept
    assert sum(reads) >= len(data) and max(reads) <= len(data) // 16, (len(data), max(reads))


# --- property tests: whatever the bytes, only the project's typed errors come out -------
SEEDS = [jpeg_bytes(shape_image(1, 1, 64)), png_bytes(shape_image(2, 2, 48)),
         image_bytes(shape_image(3, 3, 40), "GIF"), image_bytes(shape_image(4, 4, 40), "WEBP"),
         image_bytes(shape_image(5, 5, 32), "BMP")]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_random_bytes_only_raise_typed_errors(data):
    check_decode_or_typed_error(data)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
       st.one_of(st.none(), st.integers(0, 10**6)))
def test_mutated_images_only_raise_typed_errors(seed, flips, cut):
    data = bytearray(seed)
    for pos, val in flips:
        data[pos % len(data)] = val
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    check_decode_or_typed_error(bytes(data))


def test_png_with_huge_header_claims_is_refused_fast():
    # a 30000x30000 RGB header with valid CRCs and almost no pixel data: refused on the header alone
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b""))
    assert len(data) < 200
    with pytest.raises(ImageTooLarge):
        decode_image(data)
