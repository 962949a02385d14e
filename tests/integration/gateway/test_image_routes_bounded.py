"""Image, thumbnail and readiness routes are bounded too, against the real gateway (uvicorn +
tritonserver + Milvus Lite): a flood of them neither fills the gateway's memory with whole
files nor queues searches behind it."""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx
import numpy as np
import pytest

from harness.data import jpeg_bytes, make_dataset, shape_image
from harness.gateway import gateway_env, index_folder, start_gateway
from harness.stack import peak_rss_bytes
from imgsearch.gateway.routes import READY_TTL_S
from imgsearch.store import Row
from imgsearch.triton_metrics import metric_sum

pytestmark = pytest.mark.integration
BIG = 8 * 2**20  # bytes per served file
FLOOD = 48  # image requests at once
PROBES = 64  # readiness probes at once


def test_a_flood_of_image_and_readiness_requests_is_bounded(tmp_path, triton, repo18):
    root = tmp_path / "images"
    make_dataset(root, classes=2, per_class=3, seed=51)
    (root / "big").mkdir()
    rows = []
    for k in range(4):  # JPEG magic + 8 MiB: served as image/jpeg, never decoded by these routes
        (root / "big" / f"{k}.jpeg").write_bytes(b"\xff\xd8\xff\xe0" + bytes([k]) * (BIG - 4))
        rows.append(Row(9000 + k, f"big/{k}.jpeg", "big", np.eye(1, 512, k, dtype=np.float32)[0]))
    ids = index_folder(root, tmp_path / "db.db", triton.grpc_url, repo18, rows)
    thumbs = sorted(ids.values())  # the dataset's .jpg files: decodable
    gw = start_gateway(gateway_env(repo18, triton.grpc_url, tmp_path / "db.db", root, max_light=8))
    data = jpeg_bytes(shape_image(1, 5100))
    try:
        with httpx.Client(base_url=gw.url, timeout=60) as c:
            assert len(c.get("/v1/images/9000").content) == BIG  # streamed whole, byte for byte
            assert c.get("/v1/images/9001").content[:5] == b"\xff\xd8\xff\xe0\x01"
            before = [c.post("/v1/search", files={"file": ("q.jpg", data, "image/jpeg")}) for _ in range(8)]
            assert all(r.status_code == 200 for r in before)
            p50 = statistics.median(r.elapsed.total_seconds() for r in before)
        rss0 = peak_rss_bytes(gw.pid)
        shed0 = metric_sum(httpx.get(gw.url + "/metrics").text, "imgsearch_shed_total", reason="light")

        async def flood() -> tuple[list[int], list[tuple[int, float]]]:
            async with httpx.AsyncClient(base_url=gw.url, timeout=120,
                                         limits=httpx.Limits(max_connections=FLOOD + 8)) as c:
                def path_of(k: int) -> str:
                    if k % 4 == 3:
                        return "/readyz"
                    if k % 4 == 2:  # decoded, in the decode memory searches use
                        return f"/v1/images/{thumbs[k // 4 % len(thumbs)]}/thumb"
                    return f"/v1/images/{9000 + k % 4}"

                async def image(k: int) -> int:
                    path = path_of(k)
                    async with c.stream("GET", path) as r:
                        async for _ in r.aiter_bytes():
                            await asyncio.sleep(0.001)  # a slow reader: the server must not buffer it all
                        return r.status_code

                async def searches() -> list[tuple[int, float]]:
                    out = []
                    for _ in range(10):
                        t0 = time.perf_counter()
                        r = await c.post("/v1/search", files={"file": ("q.jpg", data, "image/jpeg")})
                        out.append((r.status_code, time.perf_counter() - t0))
                    return out

                flooded = asyncio.gather(*[image(k) for k in range(FLOOD)])
                await asyncio.sleep(0.05)
                found = await searches()
                return list(await flooded), found

        statuses, found = asyncio.run(flood())
        rise = peak_rss_bytes(gw.pid) - rss0
        p50_during = statistics.median(t for _, t in found)
        print(f"\n{FLOOD} image/thumbnail/readiness requests at once: {statuses.count(200)} x 200, {statuses.count(503)} x 503; "
              f"gateway peak RSS +{rise / 2**20:.0f} MiB ({BIG // 2**20} MiB files); search p50 "
              f"{p50 * 1e3:.0f} ms before, {p50_during * 1e3:.0f} ms during")
        assert set(statuses) <= {200, 503} and statuses.count(200) >= 8
        # the limit sheds (how many depends on how the flood's requests overlap), and each shed is counted
        shed = metric_sum(httpx.get(gw.url + "/metrics").text, "imgsearch_shed_total", reason="light") - shed0
        assert statuses.count(503) >= 1 and shed == statuses.count(503), (statuses.count(503), shed)
        assert rise < 4 * BIG, rise  # at most a few files' worth, not one per request
        assert [s for s, _ in found] == [200] * len(found)
        assert p50_during <= max(2 * p50, p50 + 0.25), (p50, p50_during)
    finally:
        gw.stop()


def test_a_flood_of_readiness_probes_costs_one_backend_check_a_second(tmp_path, triton, repo18):
    root = tmp_path / "images"
    make_dataset(root, classes=2, per_class=2, seed=52)
    index_folder(root, tmp_path / "db.db", triton.grpc_url, repo18)
    gw = start_gateway(gateway_env(repo18, triton.grpc_url, tmp_path / "db.db", root, max_light=PROBES))
    try:
        def checks() -> float:
            return metric_sum(httpx.get(gw.url + "/metrics").text, "imgsearch_readiness_checks_total")

        before = checks()
        time.sleep(READY_TTL_S)  # whatever check came before has expired: the flood makes a new one

        async def flood() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=gw.url, timeout=30,
                                         limits=httpx.Limits(max_connections=PROBES)) as c:
                return list(await asyncio.gather(*[c.get("/readyz") for _ in range(PROBES)]))

        t0 = time.monotonic()
        answers = asyncio.run(flood())
        took = time.monotonic() - t0
        made = checks() - before
        print(f"\n{PROBES} /readyz at once, answered in {took * 1e3:.0f} ms: {made:.0f} backend check(s)")
        assert [r.status_code for r in answers] == [200] * PROBES
        assert all(r.json()["checks"] == {"triton": True, "milvus": True} for r in answers)
        # one check per READY_TTL_S the flood lasted, however many probes came
        assert 1 <= made <= 1 + took // READY_TTL_S, (made, took)
    finally:
        gw.stop()
