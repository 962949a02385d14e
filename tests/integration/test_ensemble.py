"""File bytes -> Triton (preprocess -> encoder, the image_search ensemble) vs pixels decoded here.

Both paths run through the real tritonserver. With the CPU config, ``preprocess`` decodes
with the project's own decoder, so the two paths must agree exactly; with the
``torchvision`` decoder (the code nvJPEG runs on a GPU, here on the CPU) they agree
within a stated tolerance. A bad file gets its own typed error; the rest of the batch goes on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from harness.data import (
    bomb_png,
    image_bytes,
    jpeg_bytes,
    load_module,
    png_bytes,
    shape_image,
    truncated_jpeg,
)
from imgsearch.errors import CorruptImage, ImageTooLarge, UnsupportedImage
from imgsearch.export.triton_config import PREPROCESS_CPU, preprocess_config
from imgsearch.imaging import decode_image
from imgsearch.triton_client import TritonEncoder
from imgsearch.triton_metrics import fetch_model_stats, stats_since
from imgsearch.triton_server import LocalTriton

MODEL = "resnet152"
TEMPLATE = Path(__file__).resolve().parents[2] / "export" / "templates" / "preprocess_decoder.py"


def exif_jpeg(im: Image.Image, orientation: int) -> bytes:
    ex = Image.Exif()
    ex[0x0112] = orientation
    return image_bytes(im, "JPEG", quality=90, exif=ex.tobytes())


def progressive_jpeg(im: Image.Image) -> bytes:
    return image_bytes(im, "JPEG", quality=90, progressive=True)


def sample_files() -> dict[str, bytes]:
    """JPEG and PNG, up- and down-scaled, grey, with alpha, EXIF-rotated, progressive."""
    rgba = shape_image(7, 3).convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 128))
    return {
        "jpeg_160": jpeg_bytes(shape_image(1, 1)),
        "jpeg_640x480": jpeg_bytes(shape_image(3, 5, 640).resize((640, 480))),
        "jpeg_grey": jpeg_bytes(shape_image(2, 2).convert("L")),
        "jpeg_exif6": exif_jpeg(shape_image(6, 6).resize((200, 120)), 6),
        "jpeg_exif3": exif_jpeg(shape_image(4, 4).resize((120, 200)), 3),
        "jpeg_progressive": progressive_jpeg(shape_image(5, 8, 300)),
        "png_160": png_bytes(shape_image(0, 4)),
        "png_rgba": png_bytes(rgba),
        "png_300x200": png_bytes(shape_image(8, 9, 300).resize((300, 200))),
    }


def direct(repo: Path, pixels: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(repo / MODEL / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(["embedding"], {"images": pixels})[0]


async def both_paths(url: str, files: list[bytes]):
    """(bytes path: one request per file, concurrently; the same files in one request; pixels path)."""
    enc = TritonEncoder(url, MODEL)
    try:
        assert await enc.has_ensemble()
        singles = await asyncio.gather(*[enc.encode_bytes([f]) for f in files])
        together = await enc.encode_bytes(files)
        pixels = await enc.encode(np.stack([decode_image(f) for f in files]))
    finally:
        await enc.close()
    return np.concatenate([s.embeddings for s in singles]), together.embeddings, pixels.embeddings


def test_bytes_and_pixels_paths_give_the_same_embeddings(triton, repo18):
    files = list(sample_files().values())
    singles, together, pixels = asyncio.run(both_paths(triton.grpc_url, files))
    assert singles.shape == (len(files), 512)
    # same decoder on both sides (Pillow in preprocess): the same numbers, value by value
    np.testing.assert_allclose(singles, pixels, atol=1e-5)
    np.testing.assert_allclose(together, pixels, atol=1e-5)
    np.testing.assert_allclose(pixels, direct(repo18, np.stack([decode_image(f) for f in files])), atol=1e-4)
    # and the files are not all alike: the comparison above can fail
    assert (singles @ singles.T)[np.triu_indices(len(files), 1)].min() < 0.999


def test_a_bad_file_gets_its_own_error_and_the_batch_goes_on(triton, repo18):
    good = [jpeg_bytes(shape_image(i, 100 + i)) for i in range(6)] + [png_bytes(shape_image(9, 7))]
    bad = {"truncated": (truncated_jpeg(), CorruptImage), "not_an_image": (b"hello, world" * 20, UnsupportedImage),
           "bomb": (bomb_png(), ImageTooLarge), "empty": (b"", CorruptImage)}
    files = good[:3] + [b for b, _ in bad.values()] + good[3:]
    before = fetch_model_stats(triton.metrics_url, "preprocess")

    async def go():
        enc = TritonEncoder(triton.grpc_url, MODEL)
        try:
            return await asyncio.gather(*[enc.encode_bytes([f]) for f in files], return_exceptions=True)
        finally:
            await enc.close()

    results = asyncio.run(go())
    got = dict(zip(range(len(files)), results))
    for k, (name, (_, err)) in enumerate(bad.items()):
        r = got.pop(3 + k)
        assert isinstance(r, err), (name, r)
        assert str(r), name
    assert all(not isinstance(r, Exception) for r in got.values()), got
    served = np.concatenate([got[i].embeddings for i in sorted(got)])
    np.testing.assert_allclose(served, direct(repo18, np.stack([decode_image(f) for f in good])), atol=1e-4)
    delta = stats_since(triton.metrics_url, "preprocess", before, len(files))
    assert delta.requests == len(files)
    assert delta.executions < len(files), f"no batch held good and bad files together: {delta}"


def test_one_bad_file_fails_its_request_only(triton):
    async def go():
        enc = TritonEncoder(triton.grpc_url, MODEL)
        try:
            mixed = enc.encode_bytes([jpeg_bytes(shape_image(1, 2)), truncated_jpeg(), jpeg_bytes(shape_image(2, 3))])
            fine = enc.encode_bytes([jpeg_bytes(shape_image(3, 4)), png_bytes(shape_image(4, 5))])
            return await asyncio.gather(mixed, fine, return_exceptions=True)
        finally:
            await enc.close()

    mixed, fine = asyncio.run(go())
    assert isinstance(mixed, CorruptImage) and "image 2 of 3" in str(mixed)
    assert fine.embeddings.shape == (2, 512)


# --- the torchvision decoder (what nvJPEG runs on a GPU), on the CPU ---------------------------


@pytest.fixture(scope="module")
def tv_triton(tmp_path_factory, repo18):
    """configs/tv.pbtxt: the CPU configs, but preprocess decodes JPEGs with torchvision."""
    repo = tmp_path_factory.mktemp("tv")
    for name in (MODEL, "preprocess", "image_search"):
        shutil.copytree(repo18 / name, repo / name)
        (repo / name / "configs" / "tv.pbtxt").write_text((repo / name / "configs" / "cpu.pbtxt").read_text())
    one = dataclasses.replace(PREPROCESS_CPU, instances=1)  # each stub imports torch: keep start-up short
    (repo / "preprocess" / "configs" / "tv.pbtxt").write_text(preprocess_config(224, one, decoder="torchvision"))
    with LocalTriton(repo, "tv", exit_timeout_s=2) as server:
        yield server


def test_torchvision_decoder_agrees_with_pillow_within_tolerance(tv_triton, repo18):
    files = sample_files()
    blobs = list(files.values())
    singles, together, pixels = asyncio.run(both_paths(tv_triton.grpc_url, blobs))
    cos = (singles * pixels).sum(1)
    assert cos.min() >= 0.999, dict(zip(files, cos.round(6)))
    np.testing.assert_allclose(together, singles, atol=1e-5)
    log = tv_triton.log_text()
    assert "decoder torchvision" in log


def load_preprocess_module():
    return load_module(TEMPLATE, "preprocess_decoder")


def test_torchvision_decoder_pixels_match_pillow_and_orientation():
    """The fast path's pixels vs decode_image: EXIF orientation right, resize within a few levels."""
    mod = load_preprocess_module()
    dec = mod.Decoder("torchvision", "cpu")
    base = shape_image(6, 6).resize((200, 120))
    files = {f"exif{o}": exif_jpeg(base, o) for o in range(1, 9)}
    files.update(sample_files())
    files["truncated"] = truncated_jpeg()
    out = dict(zip(files, dec.decode(list(files.values()))))
    assert isinstance(out.pop("truncated"), CorruptImage)
    for name, px in out.items():
        ref = decode_image(files[name])
        diff = np.abs(px.astype(int) - ref.astype(int))
        # 640x480: Pillow decodes at 1/2 scale (draft), torchvision at full scale, then both resize
        assert diff.mean() < 1.0 and diff.max() <= 20, (name, diff.mean(), diff.max())
    # the JPEGs took the fast path; the progressive JPEG, the PNGs and the truncated file went to Pillow
    assert dec.stats["fast"] == 8 + 5 and dec.stats["pillow"] == 1 + 3 + 1, dec.stats


def test_jpeg_header_parser_refuses_what_it_cannot_read():
    mod = load_preprocess_module()
    good = jpeg_bytes(shape_image(1, 1, 100).resize((100, 60)))
    assert mod.jpeg_header(good)[:3] == (100, 60, 3)
    assert mod.jpeg_header(exif_jpeg(shape_image(1, 1), 6))[4] == 6
    for broken in (b"", b"\xff\xd8", good[:20], b"\xff\xd8\x00\x00" + good[4:], png_bytes(shape_image(1, 1))):
        assert mod.jpeg_header(broken) is None
        assert mod.fast_path_ok(broken, 10**8) is None
    assert mod.fast_path_ok(good, 100 * 60 - 1) is None  # over the pixel limit: Pillow names the error
    assert mod.fast_path_ok(good[:-2], 10**8) is None  # no end marker: truncated
