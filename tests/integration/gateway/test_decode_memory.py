"""Near-limit uploads at once against a real gateway (uvicorn + tritonserver + Milvus Lite):
small files that decode to 49 MP rasters must not add up to gigabytes in the gateway, and
concurrent decodes share one memory budget (they wait for it, or are shed with 503)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from PIL import Image

from harness.data import huge_png, png_bytes
from harness.stack import peak_rss_bytes
from imgsearch.triton_metrics import metric_sum

pytestmark = pytest.mark.integration
BOUND = 800 * 10**6  # bytes: the target is 800 MB


def at_once(url: str, files: list[bytes]) -> list[httpx.Response]:
    async def send() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            return await asyncio.gather(*[c.post("/v1/search", files={"file": (f"{k}.png", d, "image/png")})
                                          for k, d in enumerate(files)])

    return asyncio.run(send())


def warm(url: str) -> None:
    with httpx.Client(base_url=url, timeout=60) as c:  # the first search loads what it loads
        small = png_bytes(Image.new("RGB", (640, 480)))
        assert c.post("/v1/search", files={"file": ("s.png", small, "image/png")}).status_code == 200


def test_four_near_limit_uploads_at_once_stay_under_800_mb(empty_gateway):
    files = [huge_png("I;16"), huge_png("RGBA"), huge_png("I;16"), huge_png("RGBA")]
    gw = empty_gateway(decode_threads=4, max_inflight=8, decode_wait_s=60)
    warm(gw.url)
    before = peak_rss_bytes(gw.pid)
    answers = at_once(gw.url, files)
    rise = peak_rss_bytes(gw.pid) - before
    print(f"4 uploads of {[len(d) // 1000 for d in files]} KB: gateway peak RSS +{rise / 2**20:.0f} MiB")
    assert [r.status_code for r in answers] == [200] * 4, [r.text[:200] for r in answers]
    assert rise < BOUND, rise / 2**20


RGBA_RASTER = 7000 * 7000 * 4  # what one of these decodes reserves: its raster as loaded


@pytest.mark.parametrize("wait_s", [60.0, 0.1], ids=["wait", "shed"])
def test_concurrent_decodes_share_one_budget_and_wait_for_it_or_are_shed(empty_gateway, wait_s):
    """Four decode threads, a budget that fits one 49 MP RGBA raster and not two: the four
    uploads decode one at a time. Waiting long enough, all four are served; waiting 0.1 s (a
    decode here takes about a second), those that find the budget taken get 503."""
    budget = RGBA_RASTER * 3 // 2
    gw = empty_gateway(decode_threads=4, max_inflight=8, decode_memory_bytes=budget, decode_wait_s=wait_s)
    warm(gw.url)
    before = peak_rss_bytes(gw.pid)
    answers = at_once(gw.url, [huge_png("RGBA")] * 4)
    rise = peak_rss_bytes(gw.pid) - before
    statuses = [r.status_code for r in answers]
    shed = metric_sum(httpx.get(gw.url + "/metrics").text, "imgsearch_shed_total", reason="decode_memory")
    print(f"\n4 RGBA uploads at once, decode budget {budget / 2**20:.0f} MiB, wait {wait_s:g} s: "
          f"{statuses}, gateway peak RSS +{rise / 2**20:.0f} MiB")
    if wait_s > 1:
        assert statuses == [200] * 4, [r.text[:200] for r in answers]
    else:
        assert statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
        assert set(statuses) == {200, 503}
        for r in answers:
            if r.status_code == 503:
                assert r.json()["error"]["code"] == "overloaded" and int(r.headers["retry-after"]) >= 1
        assert shed == statuses.count(503)
    assert rise < 2 * RGBA_RASTER, rise / 2**20  # never two of these rasters at once
    warm(gw.url)  # the budget is free again
