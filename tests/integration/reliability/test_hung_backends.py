"""Hung backends (paused with SIGSTOP, as a frozen VM or a cut network looks), not killed ones:
the real gateway, its own tritonserver and a Milvus server (milvus-lite's server mode).

Searches must answer 503 + Retry-After within the configured deadline, /readyz must say
which backend it is, and after SIGCONT both must serve again without a restart.
"""

from __future__ import annotations

import os
import signal
import statistics
import time

import httpx
import pytest

from harness.data import jpeg_bytes, make_dataset, shape_image
from harness.stack import MilvusServer, gateway_env, index_images, start_gateway
from imgsearch.gateway.routes import READY_TTL_S
from imgsearch.triton_server import LocalTriton

pytestmark = [pytest.mark.integration, pytest.mark.alone]  # bounds in wall-clock time
DEADLINE_S = 2.0


def _search(c: httpx.Client, data: bytes) -> tuple[httpx.Response, float]:
    t0 = time.monotonic()
    r = c.post("/v1/search", files={"file": ("q.jpg", data, "image/jpeg")})
    return r, time.monotonic() - t0


def test_paused_triton_and_milvus_answer_503_within_the_deadline_and_recover(tmp_path, repo18):
    root = tmp_path / "images"
    make_dataset(root, classes=2, per_class=3, seed=41)
    triton = LocalTriton(repo18, "cpu", exit_timeout_s=5)
    milvus = MilvusServer(tmp_path / "milvus-data", log_path=tmp_path / "milvus.log").start()
    data = jpeg_bytes(shape_image(1, 4100))
    gw = None
    with triton:
        try:
            index_images(root, milvus.uri, triton.grpc_url, repo18)
            gw = start_gateway(gateway_env(repo18, triton.grpc_url, milvus.uri, root,
                                           milvus_timeout_s=DEADLINE_S, triton_timeout_s=DEADLINE_S),
                               log_path=tmp_path / "gw.log")
            with httpx.Client(base_url=gw.url, timeout=60) as c:
                normal = [_search(c, data) for _ in range(8)]
                assert all(r.status_code == 200 for r, _ in normal)
                p50 = statistics.median(t for _, t in normal)
                bound = DEADLINE_S + 1.0 + 10 * p50  # the deadline, plus this machine's own search time
                for name, pid, code in (("milvus", milvus.proc.pid, "milvus_unavailable"),
                                        ("triton", triton.proc.pid, "triton_unavailable")):
                    os.kill(pid, signal.SIGSTOP)
                    try:
                        r, took = _search(c, data)
                        print(f"\n{name} paused: search {r.status_code} {r.json()['error']['code']} in {took:.2f}s "
                              f"(deadline {DEADLINE_S}s, bound {bound:.2f}s)")
                        assert r.status_code == 503 and r.json()["error"]["code"] == code, r.text
                        assert int(r.headers["retry-after"]) >= 1 and took <= bound
                        # /readyz answers from a check up to READY_TTL_S old: one taken since the pause
                        t0 = time.monotonic()
                        while True:
                            ready = c.get("/readyz")
                            if ready.status_code == 503 or time.monotonic() - t0 > bound + READY_TTL_S:
                                break
                        took = time.monotonic() - t0
                        print(f"{name} paused: /readyz {ready.status_code} {ready.json().get('checks')} in {took:.2f}s")
                        assert ready.status_code == 503 and ready.json()["checks"][name] is False, ready.text
                        assert took <= bound + READY_TTL_S
                    finally:
                        os.kill(pid, signal.SIGCONT)
                    t0 = time.monotonic()
                    while time.monotonic() - t0 < 60:
                        r, _ = _search(c, data)
                        if r.status_code == 200:
                            break
                        time.sleep(0.2)
                    print(f"{name} resumed: searches 200 again after {time.monotonic() - t0:.2f}s")
                    assert r.status_code == 200, r.text
                    while c.get("/readyz").status_code != 200 and time.monotonic() - t0 < 60:
                        time.sleep(0.2)
                    assert c.get("/readyz").status_code == 200
        finally:
            if gw is not None:
                gw.stop()
            milvus.stop()
