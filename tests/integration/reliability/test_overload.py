"""Overload: a flood at 10x the measured capacity is shed early and visibly, and Triton's
bounded queue rejects instead of queueing without limit.

Both run the scenario functions of harness/faults.py (``python -m bench.flood`` publishes
figures from the same code) and assert bounds on what they measured.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from harness.configs import assert_bounded_rejecting_queue
from harness.data import jpeg_bytes, make_tiny_queue_repo, shape_image
from harness.faults import flood, scrape, triton_queue
from harness.stack import (
    MODEL,
    REPO_ROOT,
    backend_bound_repo,
    gateway_env,
    index_images,
    start_gateway,
)
from imgsearch.export.triton_config import parse_config
from imgsearch.triton_metrics import metric_sum
from imgsearch.triton_server import LocalTriton

pytestmark = [pytest.mark.integration, pytest.mark.alone]  # bounds in wall-clock time

MAX_INFLIGHT = 4  # IMGSEARCH_MAX_INFLIGHT of main_gw and flood_gw
RSS_BOUND_MIB = 64


def p99_bound_s(single_s: float, max_inflight: int) -> float:
    """Generous: an accepted request waits behind at most max_inflight - 1 others, each about
    one single-request time; x3 and +1 s for a 2-core machine shared with other work."""
    return 3.0 * max_inflight * single_s + 1.0


@pytest.fixture(scope="module")
def flood_gw(rel_data, tmp_path_factory):
    """A gateway whose capacity is set by a slow backend, not by this machine's last free cycle
    (see harness.stack.backend_bound_repo; python -m bench.flood floods the same)."""
    repo = backend_bound_repo(tmp_path_factory.mktemp("slow152"))
    with LocalTriton(repo, "cpu", exit_timeout_s=2) as server:
        db = rel_data.base / "flood152.db"
        index_images(rel_data.images, str(db), server.grpc_url, repo)
        gw = start_gateway(gateway_env(repo, server.grpc_url, db, rel_data.images, max_inflight=MAX_INFLIGHT),
                           log_path=rel_data.base / "flood152.log")
        try:
            yield gw
        finally:
            gw.stop()


def test_flood_at_10x_capacity_sheds_with_retry_after_and_recovers(flood_gw):
    query = jpeg_bytes(shape_image(2, 777))
    before = asyncio.run(scrape(flood_gw.url))
    res = asyncio.run(flood(flood_gw.url, query, flood_gw.pid, factor=10.0, probe_s=2.0, capacity_s=3.0,
                            flood_s=4.0))
    after = asyncio.run(scrape(flood_gw.url))
    shown = {k: v for k, v in res.items() if k != "replies"}
    print("\n" + "\n".join(f"  {k:26s} {v}" for k, v in shown.items()))
    replies = res["replies"]

    assert {r.status for r in replies} <= {200, 503}, res["by_status"]
    assert res["accepted"] > 0 and res["by_status"].get("503", 0) > 0, res["by_status"]
    assert res["503_without_retry_after"] == 0
    assert {r.code for r in replies if r.status == 503} == {"overloaded"}
    # every shed is counted, under its reason
    shed = sum(metric_sum(after, "imgsearch_shed_total", reason=r)
               - metric_sum(before, "imgsearch_shed_total", reason=r) for r in ("inflight", "triton_overloaded"))
    assert shed == res["by_status"]["503"]

    bound = p99_bound_s(res["single_p50_ms"] / 1000.0, MAX_INFLIGHT)
    assert res["accepted_p99_ms"] / 1000.0 <= bound, (res["accepted_p99_ms"], bound)
    assert res["rss_growth_mib"] < RSS_BOUND_MIB, shown
    assert res["recovered_after_s"] is not None and res["recovered_after_s"] <= 5.0, shown


@pytest.fixture(scope="module")
def tiny_queue_triton(tmp_path_factory, repo18):
    """The test model, one request per batch and a queue of 2: easy to overflow."""
    repo = make_tiny_queue_repo(repo18, tmp_path_factory.mktemp("tinyq"), MODEL)
    with LocalTriton(repo, "cpu", exit_timeout_s=2) as server:
        yield server


def test_triton_queue_full_is_503_with_retry_after_and_counted(launch, tiny_queue_triton):
    gw = launch(tiny_queue_triton.grpc_url, max_inflight=64)  # the gateway's own limit stays out of the way
    res = asyncio.run(triton_queue(gw.url, jpeg_bytes(shape_image(3, 888)), n=40))
    print({k: v for k, v in res.items() if k != "replies"})
    assert {r.status for r in res["replies"]} <= {200, 503}, res["by_status"]
    n503 = res["by_status"].get("503", 0)
    assert n503 > 0, "a queue of 2 must reject part of 40 concurrent searches"
    assert res["accepted"] > 0, "the searches that fit must still be served"
    assert res["by_code"] == {"overloaded": n503}
    assert res["503_without_retry_after"] == 0
    assert res["shed_triton_overloaded"] == n503 and res["shed_inflight"] == 0
    assert res["errors_overloaded"] == n503
    assert tiny_queue_triton.is_ready()
    with httpx.Client(base_url=gw.url, timeout=30) as c:  # the burst is over: the next search is served
        r = c.post("/v1/search", files={"file": ("q.jpg", jpeg_bytes(shape_image(3, 888)), "image/jpeg")})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("config", ["config.pbtxt", "configs/cpu.pbtxt", "configs/gpu.pbtxt"])
def test_shipped_model_configs_bound_the_queue_and_reject(config):
    assert_bounded_rejecting_queue(parse_config((REPO_ROOT / "model_repository" / MODEL / config).read_text()))
