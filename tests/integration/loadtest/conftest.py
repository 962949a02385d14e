"""A real stack for the load tests: the local tritonserver (session fixture ``triton``, resnet18
exported as "resnet152"), Milvus Lite filled through the core APIs, and the gateway under
uvicorn on a free loopback port, configured by IMGSEARCH_* variables as in production."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import make_dataset

from imgsearch.triton_server import free_port
from loadtest.flood import index_images

REPO_ROOT = Path(__file__).resolve().parents[3]
MODEL = "resnet152"
COLLECTION = "images"
MAX_INFLIGHT = 3  # low on purpose: the runs below go past it, so the gateway sheds for real


@dataclass
class Stack:
    url: str
    triton_metrics: str
    images: Path  # indexed
    queries: Path  # query images (not indexed: other seeds)
    indexed: int
    log_path: Path


def index(root: Path, db: Path, triton_grpc: str, repo: Path) -> int:
    """Fill the Milvus Lite dir through Triton (the harness the reliability tests use too)."""
    return len(index_images(root, str(db), triton_grpc, repo, MODEL, COLLECTION))


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
    n = index(images, db, triton.grpc_url, repo18)

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGSEARCH_")}
    env.update({
        "IMGSEARCH_TRITON_URL": triton.grpc_url, "IMGSEARCH_MODEL_REPOSITORY": str(repo18),
        "IMGSEARCH_MODEL_NAME": MODEL, "IMGSEARCH_MILVUS_URI": str(db), "IMGSEARCH_COLLECTION": COLLECTION,
        "IMGSEARCH_IMAGE_ROOT": str(images), "IMGSEARCH_MAX_INFLIGHT": str(MAX_INFLIGHT),
        "IMGSEARCH_DECODE_THREADS": "2", "PYTHONUNBUFFERED": "1",
    })
    log_path = root / "gateway.log"
    with log_path.open("wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "gateway.app:app_from_env", "--factory", "--host", "127.0.0.1",
             "--port", str(port), "--log-level", "warning"],
            cwd=REPO_ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log_path)
        yield Stack(url, triton.metrics_url, images, queries, n, log_path)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
