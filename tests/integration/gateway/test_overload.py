"""The in-flight limit sheds at once with 503 + Retry-After (IMGSEARCH_MAX_INFLIGHT=1)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from harness.data import huge_png, jpeg_bytes, shape_image
from imgsearch.triton_metrics import metric_sum

pytestmark = [pytest.mark.integration, pytest.mark.alone]  # bounds in wall-clock time


def shed_count(c: httpx.Client) -> float:
    for line in c.get("/metrics").text.splitlines():
        if line.startswith('imgsearch_shed_total{reason="inflight"}'):
            return float(line.split()[-1])
    return 0.0


def hold_the_slot(url: str) -> ThreadPoolExecutor:
    """Start a search that does real work for a while (decoding a 49 MP RGBA PNG, about a second
    here): it holds the only in-flight slot. (A slow body holds none: test_slow_uploads.py.)"""
    pool = ThreadPoolExecutor(1)
    data = huge_png("RGBA")
    pool.submit(lambda: httpx.post(url + "/v1/search", files={"file": ("big.png", data, "image/png")}, timeout=60))
    return pool


def inflight(c: httpx.Client) -> float:
    return metric_sum(c.get("/metrics").text, "imgsearch_inflight_requests")


def test_requests_over_the_limit_are_shed_immediately_and_service_recovers(gw_nokey):
    data = jpeg_bytes(shape_image(2, 5))
    files = {"file": ("q.jpg", data, "image/jpeg")}
    with httpx.Client(base_url=gw_nokey.url, timeout=30) as c:
        assert c.post("/v1/search", files=files).status_code == 200
        before = shed_count(c)
        hold = hold_the_slot(gw_nokey.url)
        try:
            deadline = time.monotonic() + 30
            while inflight(c) < 1 and time.monotonic() < deadline:
                time.sleep(0.005)
            assert inflight(c) == 1  # the held search is being worked on ...
            t0 = time.monotonic()
            r = c.post("/v1/search", files=files)  # ... so this one is over the limit
            assert r.status_code == 503, r.text
            assert time.monotonic() - t0 < 2.0  # shed, not queued
            assert r.json()["error"]["code"] == "overloaded" and int(r.headers["retry-after"]) >= 1
            assert r.headers["x-content-type-options"] == "nosniff"
            assert c.get("/v1/images/1/similar").status_code == 503
            assert c.get("/healthz").status_code == 200  # cheap routes are not limited
            assert shed_count(c) >= before + 2
            m = c.get("/metrics").text
            assert 'imgsearch_requests_total{route="/v1/search",status="503"}' in m
        finally:
            hold.shutdown(wait=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the slot is released once the held search is done
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
