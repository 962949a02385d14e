"""Hostile and unusual uploads over real HTTP: each gets its documented answer, the gateway
never answers 5xx, its memory stays bounded, nothing is written anywhere, and the log
never holds upload bytes.

The corpus is built here. Every upload carries MARK (as text, a JPEG comment or a PNG
tEXt chunk), so "the log never holds image bytes" can be checked for raw, hex and base64.
"""

from __future__ import annotations

import base64
import os
import select
import socket
import struct
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from harness.data import bomb_png, image_bytes, shape_image
from harness.faults import RssSampler
from imgsearch.triton_metrics import metric_sum

pytestmark = pytest.mark.integration

MARK = b"RELMARK-5d1c9e-not-for-logs"
UPLOAD_LIMIT = 10 * 1024 * 1024  # the default IMGSEARCH_MAX_UPLOAD_BYTES, which main_gw keeps
HUGE = 64 * 1024 * 1024
# The whole corpus (two 64 MiB uploads included) may grow the gateway's RSS by at most this:
# under half of one huge upload, so neither can have been buffered whole.
RSS_BOUND_MIB = 32
ESCAPE_NAME = f"rel-escape-{uuid.uuid4().hex[:12]}.jpg"


# --- the corpus ---------------------------------------------------------------------------

def jpeg(im: Image.Image, **kw) -> bytes:
    return image_bytes(im, "JPEG", quality=90, comment=MARK, **kw)


def png(im: Image.Image) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", MARK.decode())
    return image_bytes(im, "PNG", pnginfo=info)


def flip_crc(data: bytes, chunk: bytes) -> bytes:
    """Invert the first byte of ``chunk``'s CRC; the chunk's data stays intact."""
    i = data.index(chunk)
    n = struct.unpack(">I", data[i - 4:i])[0]
    c = i + 4 + n
    return data[:c] + bytes([data[c] ^ 0xFF]) + data[c + 1:]


def corrupt_idat(data: bytes) -> bytes:
    """Flip a byte in the middle of the compressed pixels (so the CRC is wrong too)."""
    i = data.index(b"IDAT")
    n = struct.unpack(">I", data[i - 4:i])[0]
    k = i + 4 + n // 2
    return data[:k] + bytes([data[k] ^ 0x55]) + data[k + 1:]


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    return jpeg(shape_image(2, 31, 200).crop((0, 0, 200, 120)), exif=exif.tobytes())


def animated_gif() -> bytes:
    frames = [shape_image(c, 40 + c, 96).convert("P") for c in range(3)]
    return image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0, comment=MARK)


@dataclass
class Case:
    name: str
    data: bytes
    status: int
    code: str | None = None  # the error code, for non-200
    filename: str = "q.jpg"
    ctype: str = "image/jpeg"


def corpus() -> list[Case]:
    base = shape_image(1, 7, 128)
    good_jpeg = jpeg(base)
    good_png = png(base)
    return [
        Case("empty file", b"", 422, "undecodable_image"),
        Case("text named .jpg", b"plain text " + MARK + b"\n", 415, "unsupported_media_type"),
        Case("html named .jpg", b"<!doctype html><html><body><p>" + MARK + b"</p><script>alert(1)</script>",
             415, "unsupported_media_type"),
        Case("truncated JPEG", jpeg(shape_image(3, 9, 256))[:2500], 422, "undecodable_image"),
        Case("PNG, bad IHDR CRC", flip_crc(good_png, b"IHDR"), 422, "undecodable_image", "q.png", "image/png"),
        Case("PNG, corrupt IDAT (bad CRC)", corrupt_idat(good_png), 422, "undecodable_image", "q.png", "image/png"),
        # Pillow does not verify IDAT CRCs; zlib's own checksum guards the pixels, which are intact
        Case("PNG, bad IDAT CRC only", flip_crc(good_png, b"IDAT"), 200, None, "q.png", "image/png"),
        Case("PNG bomb 10000x10000", bomb_png(10000, 10000), 422, "image_too_large", "q.png", "image/png"),
        Case("PNG bomb 30000x30000", bomb_png(30000, 30000), 422, "image_too_large", "q.png", "image/png"),
        Case("SVG", b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="9" height="9">'
             b"<desc>" + MARK + b"</desc><rect width=\"9\" height=\"9\"/></svg>", 415, "unsupported_media_type",
             "q.svg", "image/svg+xml"),
        Case("PDF", b"%PDF-1.4\n% " + MARK + b"\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF",
             415, "unsupported_media_type", "q.pdf", "application/pdf"),
        Case("TIFF", image_bytes(base, "TIFF", description=MARK.decode()), 415, "unsupported_media_type", "q.tif",
             "image/tiff"),
        Case("JPEG sent as text/plain", good_jpeg, 200, None, "notes.txt", "text/plain"),
        Case("filename with ../", good_jpeg, 200, None, f"../../../../../tmp/{ESCAPE_NAME}"),
        Case("1x1 px", png(Image.new("RGB", (1, 1), (200, 10, 10))), 200, None, "q.png", "image/png"),
        # valid but unusual: all accepted
        Case("CMYK JPEG", jpeg(base.convert("CMYK")), 200),
        Case("16-bit PNG", image_bytes(Image.fromarray(np.asarray(shape_image(4, 3, 96).convert("L"), np.uint16) * 257),
                                       "PNG"), 200, None, "q.png", "image/png"),
        Case("RGBA PNG", png(base.convert("RGBA")), 200, None, "q.png", "image/png"),
        Case("palette PNG", png(base.convert("P")), 200, None, "q.png", "image/png"),
        Case("palette GIF", image_bytes(base.convert("P"), "GIF", comment=MARK), 200, None, "q.gif", "image/gif"),
        Case("animated GIF", animated_gif(), 200, None, "q.gif", "image/gif"),
        Case("WebP", image_bytes(base, "WEBP", quality=80), 200, None, "q.webp", "image/webp"),
        Case("EXIF-rotated JPEG", exif_rotated(), 200),
    ]


# --- raw HTTP for the huge uploads (a client that keeps writing would never read the 413) ---

def huge_upload(url: str, total: int, chunked: bool) -> tuple[int, dict[str, str], bytes, int]:
    """Stream a ``total``-byte multipart body, stopping as soon as an answer arrives.

    Returns (status, headers, body, bytes of the body sent before the answer).
    """
    host, port = url.removeprefix("http://").split(":")
    boundary = "hugeboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + b"\xff\xd8\xff\xe0" + MARK
    tail = f"\r\n--{boundary}--\r\n".encode()
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}"
    req = (f"POST /v1/search HTTP/1.1\r\nHost: {host}:{port}\r\n{framing}\r\n"
           f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode()
    block = b"\0" * (256 * 1024)
    sent = 0
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(req)

        def send(b: bytes) -> None:
            s.sendall(f"{len(b):x}\r\n".encode() + b + b"\r\n" if chunked else b)

        try:
            send(head)
            sent = len(head)
            while sent < total - len(tail):
                if select.select([s], [], [], 0)[0]:
                    break  # the answer is there: stop sending
                n = min(len(block), total - len(tail) - sent)
                send(block[:n])
                sent += n
            else:
                send(tail)
                if chunked:
                    s.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed after answering; the answer is in our receive buffer
        raw = b""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                got = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not got:
                break
            raw += got
            if b"\r\n\r\n" in raw:
                hdr, _, body = raw.partition(b"\r\n\r\n")
                headers = dict(ln.decode().split(": ", 1) for ln in hdr.split(b"\r\n")[1:])
                headers = {k.lower(): v for k, v in headers.items()}
                if len(body) >= int(headers.get("content-length", "0")):
                    return int(hdr.split(b" ")[1]), headers, body, sent
    raise AssertionError(f"no complete answer after sending {sent} bytes: {raw[:200]!r}")


# --- checks -------------------------------------------------------------------------------

def assert_error_shape(status: int, ctype: str, body: bytes, code: str | None, what: str) -> None:
    import json

    assert ctype.startswith("application/json"), (what, ctype)
    doc = json.loads(body)
    assert set(doc) == {"error"} and set(doc["error"]) == {"code", "message"}, (what, doc)
    assert isinstance(doc["error"]["message"], str) and doc["error"]["message"], (what, doc)
    if code:
        assert doc["error"]["code"] == code, (what, doc)


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for f in files:
                p = Path(dirpath, f)
                with_stat = p.lstat()
                out[str(p)] = (with_stat.st_size, with_stat.st_mtime_ns)
    return out


def mark_forms() -> list[bytes]:
    """MARK as it could appear in a log: raw, hex, and base64 at each of the 3 alignments."""
    forms = [MARK, MARK.hex().encode(), repr(MARK).encode()[2:-1]]
    for k in range(3):
        whole = MARK[k:k + 3 * ((len(MARK) - k) // 3)]
        forms += [base64.b64encode(whole), base64.urlsafe_b64encode(whole)]
    return forms


def server_errors(metrics_text: str) -> float:
    return sum(metric_sum(metrics_text, "imgsearch_requests_total", status=str(s)) for s in range(500, 600))


# --- the test -----------------------------------------------------------------------------

def test_hostile_corpus_documented_answers_bounded_memory_nothing_stored_nothing_logged(main_gw):
    cases = corpus()
    before_files = snapshot(main_gw.images, main_gw.tmpdir)
    url = main_gw.url
    good = jpeg(shape_image(0, 5, 128))
    with httpx.Client(base_url=url, timeout=60, trust_env=False) as c:
        # warm up (first search allocates model metadata, pools): the baseline is a serving gateway
        for _ in range(3):
            assert c.post("/v1/search", files={"file": ("w.jpg", good, "image/jpeg")}).status_code == 200
        m_before = c.get("/metrics").text
        with RssSampler(main_gw.gw.pid, 0.01) as rss:
            for case in cases:
                r = c.post("/v1/search", params={"top_k": 3}, files={"file": (case.filename, case.data, case.ctype)})
                assert r.status_code == case.status, (case.name, r.status_code, r.text[:300])
                if case.status == 200:
                    assert r.json()["results"], case.name
                else:
                    assert_error_shape(r.status_code, r.headers["content-type"], r.content, case.code, case.name)

            # no `file` field at all, and a body whose declared type is not multipart
            r = c.post("/v1/search", files={"label": (None, "x")})
            assert r.status_code == 422, r.text
            assert_error_shape(422, r.headers["content-type"], r.content, "missing_file", "missing file")
            r = c.post("/v1/search", content=good, headers={"content-type": "text/plain"})
            assert r.status_code == 415, r.text
            assert_error_shape(415, r.headers["content-type"], r.content, None, "text/plain body")

            # 64 MiB, declared up front and chunked without a length: 413 long before the end
            huge = {}
            for chunked in (False, True):
                status, headers, body, sent = huge_upload(url, HUGE, chunked)
                assert status == 413, (chunked, body[:200])
                assert_error_shape(413, headers["content-type"], body, "payload_too_large", f"64 MiB {chunked=}")
                huge["chunked" if chunked else "declared"] = sent
            # a declared length over the limit is refused before the body is read; a chunked one
            # right after the limit (the client saw the answer before it had sent 64 MiB)
            assert huge["chunked"] < HUGE / 2, huge
        m_after = c.get("/metrics").text
        # still serving normally afterwards
        assert c.post("/v1/search", files={"file": ("q.jpg", good, "image/jpeg")}).status_code == 200

    assert server_errors(m_after) - server_errors(m_before) == 0
    assert metric_sum(m_after, "imgsearch_errors_total", code="internal") == 0
    print(f"\nRSS baseline {rss.baseline / 2**20:.1f} MiB, peak {rss.peak / 2**20:.1f} MiB "
          f"(+{rss.growth_mib:.1f} MiB, bound {RSS_BOUND_MIB}), {rss.samples} samples; "
          f"64 MiB bodies sent before the 413: {huge}")
    assert rss.growth_mib < RSS_BOUND_MIB, rss.figures()

    # nothing stored: image root and the gateway's TMPDIR unchanged; the ../ name went nowhere
    assert snapshot(main_gw.images, main_gw.tmpdir) == before_files
    repo_root = Path(__file__).resolve().parents[3]
    for place in (Path("/tmp"), repo_root, main_gw.images, main_gw.images.parent, main_gw.tmpdir):
        assert not (place / ESCAPE_NAME).exists(), place
    assert not list(main_gw.images.parent.rglob(ESCAPE_NAME))

    # the log (stdout + stderr, access log on) never holds upload bytes
    time.sleep(0.3)
    log = main_gw.gw.log_bytes()
    assert b"POST /v1/search" in log  # the access log is on: there is something to search
    for form in mark_forms():
        assert form not in log, form
    for case in cases:
        if len(case.data) >= 64:
            window = case.data[len(case.data) // 2: len(case.data) // 2 + 24]
            for form in (window, window.hex().encode(), base64.b64encode(window)[4:-4]):
                assert form not in log, (case.name, form)
