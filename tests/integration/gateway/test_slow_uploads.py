"""Slow uploads against the real gateway (uvicorn + tritonserver + Milvus Lite): 40 clients that
each send a byte every half second must neither lock searches out nor stay connected for ever.
"""

from __future__ import annotations

import select
import socket
import statistics
import threading
import time

import httpx
import pytest

from harness.data import jpeg_bytes, shape_image
from harness.stack import drip

pytestmark = [pytest.mark.integration, pytest.mark.alone]  # bounds in wall-clock time
SLOW_CLIENTS = 40
INFLIGHT = 8
BODY_TIMEOUT_S = 4.0
BOUNDARY = "slowb0undary"


def _search_latencies(url: str, n: int, data: bytes) -> list[tuple[int, float]]:
    out = []
    with httpx.Client(base_url=url, timeout=60) as c:
        for _ in range(n):
            t0 = time.perf_counter()
            r = c.post("/v1/search", files={"file": ("q.jpg", data, "image/jpeg")})
            out.append((r.status_code, time.perf_counter() - t0))
    return out


def test_slow_uploads_neither_lock_searches_out_nor_stay(empty_gateway):
    gw = empty_gateway(max_inflight=INFLIGHT, body_timeout_s=BODY_TIMEOUT_S, lingering_close_s=1)
    data = jpeg_bytes(shape_image(1, 31))
    socks: list[socket.socket] = []
    stop = threading.Event()
    try:
        _search_latencies(gw.url, 3, data)  # warm-up
        before = _search_latencies(gw.url, 10, data)
        assert all(s == 200 for s, _ in before)
        p50 = statistics.median(t for _, t in before)

        host, port = gw.url.removeprefix("http://").split(":")
        started = []
        for _ in range(SLOW_CLIENTS):
            s = socket.create_connection((host, int(port)), timeout=30)
            s.sendall((f"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                       f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n"
                       f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"s.jpg\"\r\n"
                       "Content-Type: image/jpeg\r\n\r\n").encode() + b"\xff\xd8\xff\xe0")
            socks.append(s)
            started.append(time.monotonic())

        drip(socks, b"\0", 0.5, stop)
        during = _search_latencies(gw.url, 20, data)
        p50_during = statistics.median(t for _, t in during)
        print(f"\nsearch p50 {p50 * 1e3:.0f} ms before, {p50_during * 1e3:.0f} ms with {SLOW_CLIENTS} slow uploads "
              f"connected; statuses during: {sorted({st for st, _ in during})}")
        assert [st for st, _ in during] == [200] * len(during)  # nobody locked out
        assert p50_during <= max(2 * p50, p50 + 0.25), (p50, p50_during)  # at their usual latency

        # each slow client gets its 408 (readable) once its deadline has passed, and no later
        # than the deadline plus what this machine needs for a search (calibrated above)
        slack = 1.0 + 10 * p50
        answers = []
        for s, t0 in zip(socks, started):
            deadline = t0 + BODY_TIMEOUT_S + slack
            raw = b""
            while b"\r\n\r\n" not in raw and time.monotonic() < deadline:
                if select.select([s], [], [], max(0.0, deadline - time.monotonic()))[0]:
                    got = s.recv(65536)
                    if not got:
                        break
                    raw += got
            answers.append((raw.split(b" ")[1] if raw else b"none", time.monotonic() - t0))
        print(f"slow clients answered {sorted({a for a, _ in answers})} after "
              f"{min(t for _, t in answers):.1f}-{max(t for _, t in answers):.1f} s (deadline {BODY_TIMEOUT_S} s)")
        assert all(a == b"408" for a, _ in answers), answers
        assert all(t >= BODY_TIMEOUT_S - 0.1 for _, t in answers), answers  # not cut before the deadline
    finally:
        stop.set()
        for s in socks:
            s.close()
