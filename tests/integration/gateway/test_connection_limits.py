"""Connection-level bounds against the real gateway (uvicorn + tritonserver + Milvus Lite).

- ``IMGSEARCH_MAX_READING``: uploads past it are shed with 503 before their bodies are read,
  the ones being received hold their bytes in memory (what the memory limit counts: docs/deploy.md)
  and are answered normally once they arrive.
- ``imgsearch serve`` sets uvicorn's connection limit (``IMGSEARCH_MAX_CONNECTIONS``) and
  keep-alive timeout (``IMGSEARCH_KEEP_ALIVE_S``).
"""

from __future__ import annotations

import socket
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from harness.data import jpeg_bytes, shape_image
from harness.stack import ConnectionWatcher, rss_bytes
from imgsearch.triton_metrics import metric_sum

pytestmark = pytest.mark.integration
MAX_READING = 4
MAX_UPLOAD = 8 * 2**20
BOUNDARY = "heldb0undary"
HELD_TAIL = 64  # bytes of each held body sent only at the end (its closing boundary among them)


def multipart(data: bytes) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"q.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def read_response(s: socket.socket, timeout_s: float = 60) -> bytes:
    s.settimeout(timeout_s)
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def test_uploads_past_max_reading_are_shed_and_the_held_ones_finish(empty_gateway):
    gw = empty_gateway(max_reading=MAX_READING, max_upload_bytes=MAX_UPLOAD, body_timeout_s=120)
    noise = np.random.default_rng(7).integers(0, 256, (2400, 2400, 3), dtype=np.uint8)
    body = multipart(jpeg_bytes(Image.fromarray(noise), quality=95))
    assert MAX_UPLOAD * 3 // 4 < len(body) < MAX_UPLOAD
    small = {"file": ("q.jpg", jpeg_bytes(shape_image(1, 31)), "image/jpeg")}
    host, port = gw.url.removeprefix("http://").split(":")
    held: list[socket.socket] = []
    try:
        with httpx.Client(base_url=gw.url, timeout=60) as c:
            assert c.post("/v1/search", files=small).status_code == 200
            rss0 = rss_bytes(gw.pid)
            for _ in range(MAX_READING):
                s = socket.create_connection((host, int(port)), timeout=30)
                s.sendall(f"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                          f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n".encode()
                          + body[:-HELD_TAIL])
                held.append(s)
            # the gateway reads each held body up to its missing tail, and keeps it in memory
            held_bytes = MAX_READING * (len(body) - HELD_TAIL)
            deadline = time.monotonic() + 30
            while rss_bytes(gw.pid) - rss0 < 0.9 * held_bytes and time.monotonic() < deadline:
                time.sleep(0.1)
            rise = rss_bytes(gw.pid) - rss0
            m = c.get("/metrics").text
            assert metric_sum(m, "imgsearch_receiving_requests") == MAX_READING
            assert metric_sum(m, "imgsearch_inflight_requests") == 0  # reading takes no in-flight slot
            print(f"\n{MAX_READING} uploads of {len(body) / 2**20:.1f} MiB held just short of their end: "
                  f"gateway RSS +{rise / 2**20:.1f} MiB")
            # what the memory budget counts for them (MAX_UPLOAD_BYTES each), and not much less
            assert 0.9 * held_bytes <= rise <= MAX_READING * MAX_UPLOAD + 16 * 2**20, rise

            r = c.post("/v1/search", files=small)  # one more upload while MAX_READING are arriving
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "overloaded" and int(r.headers["retry-after"]) >= 1
            assert f"{MAX_READING} uploads are being received" in r.json()["error"]["message"]
            assert metric_sum(c.get("/metrics").text, "imgsearch_shed_total", reason="reading") == 1

            # nothing lost: the held uploads, once complete, are searched as any other
            for s in held:
                s.sendall(body[-HELD_TAIL:])
            answers = [read_response(s) for s in held]
            assert all(a.startswith(b"HTTP/1.1 200 ") for a in answers), [a[:40] for a in answers]
            m = c.get("/metrics").text
            assert metric_sum(m, "imgsearch_receiving_requests") == 0
            assert c.post("/v1/search", files=small).status_code == 200
    finally:
        for s in held:
            s.close()


MAX_CONNECTIONS = 6
KEEP_ALIVE_S = 3


@pytest.mark.alone  # bounds a close time in wall-clock time
def test_serve_limits_open_connections_and_closes_idle_keep_alive_ones(empty_gateway):
    gw = empty_gateway(max_connections=MAX_CONNECTIONS, keep_alive_s=KEEP_ALIVE_S, header_timeout_s=60, serve_cli=True)
    host, port = gw.url.removeprefix("http://").split(":")
    kept: list[socket.socket] = []
    sent: dict[socket.socket, float] = {}  # uvicorn's keep-alive timer starts between these two
    answered: dict[socket.socket, float] = {}
    try:
        def keep_alive_request() -> tuple[socket.socket, bytes]:
            s = socket.create_connection((host, int(port)), timeout=30)
            sent[s] = time.monotonic()
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            got = read_response(s)
            answered[s] = time.monotonic()
            return s, got

        # uvicorn counts the connection asking among the open ones: MAX_CONNECTIONS - 1 are served
        for _ in range(MAX_CONNECTIONS - 1):
            s, got = keep_alive_request()
            kept.append(s)
            assert got.startswith(b"HTTP/1.1 200 "), got[:200]
        s, got = keep_alive_request()
        kept.append(s)
        assert got.startswith(b"HTTP/1.1 503 "), got[:200]

        # each idle kept-alive connection is closed KEEP_ALIVE_S after its answer
        watcher = ConnectionWatcher(kept[:-1], KEEP_ALIVE_S + 5)
        watcher.start()
        watcher.join()
        served = kept[:-1]
        assert all(s in watcher.closed for s in served), "a kept-alive connection stayed open past its timeout"
        idle = sorted(watcher.closed[s] - answered[s] for s in served)
        print(f"\n{MAX_CONNECTIONS - 1} kept-alive connections served, one more answered 503; "
              f"idle ones closed {idle[0]:.2f}-{idle[-1]:.2f} s after their answer (keep-alive {KEEP_ALIVE_S} s)")
        # not before the timeout (counted from the request, which comes before the answer) ...
        assert min(watcher.closed[s] - sent[s] for s in served) >= KEEP_ALIVE_S - 0.05
        assert idle[-1] <= KEEP_ALIVE_S + 1.5, idle  # ... and not long after it
        for s in kept:
            s.close()
        kept.clear()
        with httpx.Client(base_url=gw.url, timeout=30) as c:  # the places are free again
            assert c.get("/healthz").status_code == 200
    finally:
        for s in kept:
            s.close()
