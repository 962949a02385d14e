"""The in-flight limit sheds at once with 503 + Retry-After (IMGSEARCH_MAX_INFLIGHT=1)."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import pytest
from helpers import jpeg_bytes, shape_image

pytestmark = pytest.mark.integration


def shed_count(c: httpx.Client) -> float:
    for line in c.get("/metrics").text.splitlines():
        if line.startswith('imgsearch_shed_total{reason="inflight"}'):
            return float(line.split()[-1])
    return 0.0


def slow_upload(url: str) -> socket.socket:
    """Start a search whose body never finishes: it holds the only in-flight slot."""
    u = urlsplit(url)
    s = socket.create_connection((u.hostname, u.port), timeout=10)
    s.sendall((f"POST /v1/search HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Length: 100000\r\n"
               "Content-Type: multipart/form-data; boundary=zz\r\n\r\n--zz\r\n"
               'Content-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n\xff').encode("latin-1"))
    return s


def test_requests_over_the_limit_are_shed_immediately_and_service_recovers(gw_nokey):
    data = jpeg_bytes(shape_image(2, 5))
    files = {"file": ("q.jpg", data, "image/jpeg")}
    with httpx.Client(base_url=gw_nokey.url, timeout=30) as c:
        assert c.post("/v1/search", files=files).status_code == 200
        before = shed_count(c)
        hold = slow_upload(gw_nokey.url)
        try:
            time.sleep(0.5)  # let the gateway accept it
            t0 = time.monotonic()
            r = c.post("/v1/search", files=files)
            assert r.status_code == 503, r.text
            assert time.monotonic() - t0 < 2.0  # shed, not queued
            assert r.json()["error"]["code"] == "overloaded" and int(r.headers["retry-after"]) >= 1
            assert r.headers["x-content-type-options"] == "nosniff"
            assert c.get("/v1/images/1/similar").status_code == 503
            assert c.get("/healthz").status_code == 200  # cheap routes are not limited
            assert shed_count(c) >= before + 2
            m = c.get("/metrics").text
            assert "imgsearch_inflight_requests 1.0" in m
            assert 'imgsearch_requests_total{route="/v1/search",status="503"}' in m
        finally:
            hold.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the slot is released once the server sees the disconnect
            r = c.post("/v1/search", files=files)
            if r.status_code == 200:
                break
            time.sleep(0.1)
        assert r.status_code == 200


def test_concurrent_requests_get_200_or_503_with_retry_after(gw_nokey):
    data = jpeg_bytes(shape_image(3, 6))

    def one(_):
        with httpx.Client(base_url=gw_nokey.url, timeout=30) as c:
            r = c.post("/v1/search", files={"file": ("q.jpg", data, "image/jpeg")})
            return r.status_code, r.headers.get("retry-after")

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(16)))
    statuses = [s for s, _ in results]
    assert set(statuses) <= {200, 503}, statuses
    assert 200 in statuses
    assert all(ra and int(ra) >= 1 for s, ra in results if s == 503)
