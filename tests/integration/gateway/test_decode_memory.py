"""Four near-limit uploads at once against a real gateway (uvicorn + tritonserver + Milvus Lite):
small files that decode to 49 MP rasters must not add up to gigabytes in the gateway."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import pytest
from PIL import Image

from harness.data import huge_png, png_bytes
from harness.gateway import gateway_env, start_gateway

pytestmark = pytest.mark.integration
BOUND = 800 * 2**20


def peak_rss(pid: int) -> int:
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text()).group(1)) * 1024


def test_four_near_limit_uploads_at_once_stay_under_800_mib(tmp_path, triton, repo18):
    root = tmp_path / "images"
    root.mkdir()
    files = [huge_png("I;16"), huge_png("RGBA"), huge_png("I;16"), huge_png("RGBA")]
    gw = start_gateway(gateway_env(repo18, triton.grpc_url, tmp_path / "empty.db", root,
                                   decode_threads=4, max_inflight=8, decode_wait_s=60))
    try:
        with httpx.Client(base_url=gw.url, timeout=60) as c:  # warm: first search loads what it loads
            small = png_bytes(Image.new("RGB", (640, 480)))
            assert c.post("/v1/search", files={"file": ("s.png", small, "image/png")}).status_code == 200
        before = peak_rss(gw.pid)

        async def all_at_once() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=gw.url, timeout=120) as c:
                return await asyncio.gather(*[c.post("/v1/search", files={"file": (f"{k}.png", d, "image/png")})
                                              for k, d in enumerate(files)])

        answers = asyncio.run(all_at_once())
        rise = peak_rss(gw.pid) - before
        print(f"4 uploads of {[len(d) // 1000 for d in files]} KB: gateway peak RSS +{rise / 2**20:.0f} MiB")
        assert [r.status_code for r in answers] == [200] * 4, [r.text[:200] for r in answers]
        assert rise < BOUND, rise / 2**20
    finally:
        gw.stop()
