"""Triton stopped: searches and /readyz answer 503 + Retry-After; restarted on the same ports,
the same gateway process serves again (no restart)."""

from __future__ import annotations

import time

import httpx
import pytest

from harness.data import jpeg_bytes, shape_image
from harness.gateway import gateway_env, start_gateway
from imgsearch.triton_server import LocalTriton, free_port

pytestmark = pytest.mark.integration


def test_triton_down_gives_503_and_recovers_without_gateway_restart(tmp_path, repo18):
    ports = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}
    triton = LocalTriton(repo18, "cpu", exit_timeout_s=2, **ports).start()
    gw = None
    try:
        root = tmp_path / "images"
        root.mkdir()
        gw = start_gateway(gateway_env(repo18, triton.grpc_url, tmp_path / "r.db", root))
        files = {"file": ("q.jpg", jpeg_bytes(shape_image(4, 9)), "image/jpeg")}
        with httpx.Client(base_url=gw.url, timeout=30) as c:
            assert c.post("/v1/search", files=files).status_code == 200
            assert c.get("/readyz").status_code == 200

            triton.stop()
            t0 = time.monotonic()
            r = c.post("/v1/search", files=files)
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "triton_unavailable" and int(r.headers["retry-after"]) >= 1
            ready = c.get("/readyz")
            assert ready.status_code == 503 and int(ready.headers["retry-after"]) >= 1
            body = ready.json()
            assert body["checks"] == {"triton": False, "milvus": True} and body["error"]["code"] == "not_ready"
            assert time.monotonic() - t0 < 5  # refused connections fail fast, no 30 s timeouts
            assert c.get("/healthz").status_code == 200  # the process itself is alive
            assert 'imgsearch_shed_total{reason="triton_unavailable"}' in c.get("/metrics").text

            triton = LocalTriton(repo18, "cpu", exit_timeout_s=2, **ports).start()
            back = time.monotonic()
            while time.monotonic() - back < 60:
                r = c.post("/v1/search", files=files)
                if r.status_code == 200:
                    break
                assert r.status_code == 503
                time.sleep(0.25)
            assert r.status_code == 200, r.text
            print(f"recovered {time.monotonic() - back:.1f}s after Triton was ready again")
            assert c.get("/readyz").status_code == 200
    finally:
        if gw is not None:
            gw.stop()
        triton.stop()
        triton.cleanup()
