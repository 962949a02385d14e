"""Property tests: whatever bytes arrive, the decoder returns a 224x224x3 uint8 image or
raises one of the project's typed image errors — never anything else."""

from __future__ import annotations

import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from harness.data import (
    check_decode_or_typed_error,
    image_bytes,
    jpeg_bytes,
    png_bytes,
    shape_image,
)
from imgsearch.imaging import decode_image

SEEDS = {
    "jpeg": jpeg_bytes(shape_image(2, 5, 96)),
    "png": png_bytes(shape_image(3, 6, 64)),
    "gif": image_bytes(shape_image(4, 7, 48).convert("P"), "GIF"),
    "webp": image_bytes(shape_image(5, 8, 48), "WEBP"),
    "bmp": image_bytes(shape_image(6, 9, 40), "BMP"),
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_random_bytes(data):
    check_decode_or_typed_error(data)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(SEEDS)), st.binary(min_size=0, max_size=64))
def test_magic_prefix_with_garbage(fmt, tail):
    # right magic bytes, wrong everything else: the parser paths, not just the sniffer
    check_decode_or_typed_error(SEEDS[fmt][:16] + tail)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(SEEDS)), st.data())
def test_mutated_real_images(fmt, data):
    raw = bytearray(SEEDS[fmt])
    n = data.draw(st.integers(1, 12))
    for _ in range(n):
        op = data.draw(st.sampled_from(["flip", "cut", "dup", "zero"]))
        pos = data.draw(st.integers(0, len(raw) - 1))
        if op == "flip":
            raw[pos] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del raw[pos:pos + data.draw(st.integers(1, 64))]
        elif op == "dup":
            raw[pos:pos] = raw[pos:pos + data.draw(st.integers(1, 64))]
        else:
            raw[pos:pos + 8] = bytes(8)
        if not raw:
            break
    check_decode_or_typed_error(bytes(raw))


@pytest.mark.parametrize("fmt", sorted(SEEDS))
def test_seed_images_decode(fmt):
    out = decode_image(SEEDS[fmt])
    assert out.shape == (224, 224, 3)
    # the generated images are not flat: decoding kept the content
    assert out.std() > 10


def test_huge_dimensions_in_header_are_too_large():
    im = Image.new("L", (9000, 9000))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    from imgsearch.errors import ImageTooLarge

    with pytest.raises(ImageTooLarge):
        decode_image(buf.getvalue(), max_pixels=50_000_000)
