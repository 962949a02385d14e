"""Slow request heads against the real gateway (``imgsearch serve``: uvicorn + tritonserver +
Milvus Lite): a connection that sends nothing, or its headers a byte at a time, is cut off at
``IMGSEARCH_HEADER_TIMEOUT_S``; one that started a request reads a 408 first. Searches keep
being served meanwhile. Without the deadline the drippers stay connected for as long as they
keep sending, which the bound below catches.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from harness.data import jpeg_bytes, shape_image
from harness.stack import ConnectionWatcher, drip

pytestmark = [pytest.mark.integration, pytest.mark.alone]  # bounds in wall-clock time
HEADER_TIMEOUT_S = 2.0
DRIPPERS = 8
SILENT = 8


def _read_until_closed(s: socket.socket, limit_s: float) -> tuple[bytes, float | None]:
    """Everything the server sends, and when it closed the connection (None: still open at limit_s)."""
    got, t_end = b"", time.monotonic() + limit_s
    while time.monotonic() < t_end:
        s.settimeout(max(0.01, t_end - time.monotonic()))
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return got, time.monotonic()
        if not chunk:
            return got, time.monotonic()
        got += chunk
    return got, None


def test_slow_heads_are_cut_off_at_the_deadline_and_searches_go_on(empty_gateway):
    gw = empty_gateway(header_timeout_s=HEADER_TIMEOUT_S, serve_cli=True)
    data = jpeg_bytes(shape_image(1, 31))
    host, port = gw.url.removeprefix("http://").split(":")
    stop = threading.Event()
    try:
        with httpx.Client(base_url=gw.url, timeout=30) as c:
            assert c.post("/v1/search", files={"file": ("q.jpg", data, "image/jpeg")}).status_code == 200

        opened: dict[socket.socket, float] = {}
        drippers, silent = [], []
        for _ in range(SILENT):
            s = socket.create_connection((host, int(port)), timeout=10)
            opened[s] = time.monotonic()
            silent.append(s)
        for _ in range(DRIPPERS):
            s = socket.create_connection((host, int(port)), timeout=10)
            opened[s] = time.monotonic()
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            drippers.append(s)

        slack = 1.5  # scheduling on a loaded 2-core machine; the dripping itself would go on for ever
        watcher = ConnectionWatcher(silent + drippers, HEADER_TIMEOUT_S + slack + 1)
        watcher.start()
        drip(drippers, b"a", 0.25, stop)
        # searches on fresh connections are served while the slow ones hold theirs
        with httpx.Client(base_url=gw.url, timeout=30) as c:
            during = [c.post("/v1/search", files={"file": ("q.jpg", data, "image/jpeg")}).status_code
                      for _ in range(5)]
        assert during == [200] * 5
        watcher.join()

        for s in silent:
            assert s in watcher.closed, "a silent connection was still open past the deadline"
            assert watcher.got[s] == b""
        for s in drippers:
            got = watcher.got[s]
            assert s in watcher.closed, f"a dripping head was still being read past the deadline: {got[:80]!r}"
            head, _, body = got.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408 "), got[:200]
            assert json.loads(body)["error"]["code"] == "header_timeout"
        cut = sorted(watcher.closed[s] - opened[s] for s in silent + drippers)
        assert HEADER_TIMEOUT_S - 0.2 <= cut[0] and cut[-1] <= HEADER_TIMEOUT_S + slack, cut
        print(f"\n{SILENT} silent + {DRIPPERS} dripping connections cut off {cut[0]:.2f}-{cut[-1]:.2f} s after "
              f"opening (deadline {HEADER_TIMEOUT_S} s); searches meanwhile: {during}")

        # a kept-alive connection: the deadline of its second request counts from that request's first byte
        s = socket.create_connection((host, int(port)), timeout=10)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        first, _ = b"", None
        while b"\r\n\r\n" not in first:
            first += s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 ")
        time.sleep(HEADER_TIMEOUT_S / 2)  # idle, under uvicorn's keep-alive timeout (5 s)
        started = time.monotonic()
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # the head never ends
        rest, closed = _read_until_closed(s, HEADER_TIMEOUT_S + slack + 1)
        first_len = len(first)  # anything after the first response's head is its body, then the 408
        assert closed is not None and HEADER_TIMEOUT_S - 0.2 <= closed - started <= HEADER_TIMEOUT_S + slack, \
            (closed and closed - started)
        assert b"HTTP/1.1 408 " in rest, (first_len, rest[:300])
        s.close()
    finally:
        stop.set()
        for s in list(opened):
            s.close()
