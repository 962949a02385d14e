"""A real stack for the load tests: the local tritonserver (session fixture ``triton``, resnet18
exported as "resnet152"), Milvus Lite filled through the core APIs, and the gateway under
uvicorn on a free loopback port, configured by IMGSEARCH_* variables as in production."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.data import make_dataset
from harness.stack import gateway_env, index_images, start_gateway

MAX_INFLIGHT = 3  # low on purpose: the runs below go past it, so the gateway sheds for real


@dataclass
class Stack:
    url: str
    triton_metrics: str
    images: Path  # indexed
    queries: Path  # query images (not indexed: other seeds)
    indexed: int
    log_path: Path


def wait_ready(url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as e:
            last = f"/readyz {e.code}"
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        time.sleep(0.3)
    raise RuntimeError(f"gateway not ready after {timeout_s}s ({last}):\n{log_path.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def stack(repo18, triton, tmp_path_factory):
    root = tmp_path_factory.mktemp("loadstack")
    images, queries = root / "images", root / "queries"
    make_dataset(images, classes=6, per_class=6, seed=0)
    make_dataset(queries, classes=6, per_class=2, seed=1)
    db = root / "milvus.db"
    n = len(index_images(images, str(db), triton.grpc_url, repo18))  # the harness the reliability tests use too

    env = gateway_env(repo18, triton.grpc_url, db, images, max_inflight=MAX_INFLIGHT)
    gw = start_gateway(env, log_level="warning", log_path=root / "gateway.log", startup_timeout_s=90.0)
    try:
        wait_ready(gw.url, gw.proc, gw.log_path)  # /readyz: Triton and Milvus answered, not only the process
        yield Stack(gw.url, triton.metrics_url, images, queries, n, gw.log_path)
    finally:
        gw.stop(20)
