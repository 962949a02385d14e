"""Test harness for the gateway: index a folder directly, run uvicorn as a subprocess.

Used by the gateway integration tests and the browser test. The gateway runs exactly
as in production (``uvicorn gateway.app:app_from_env --factory``), configured through
IMGSEARCH_* variables, on a free loopback port.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgsearch.imaging import decode_image, sniff_format
from imgsearch.model_card import read_card
from imgsearch.store import Row, VectorStore, content_id
from imgsearch.triton_client import TritonEncoder
from imgsearch.triton_server import free_port

REPO_ROOT = Path(__file__).resolve().parents[3]
MODEL = "resnet152"
COLLECTION = "images"

API_KEY = "test-key-0123456789"
MAX_UPLOAD = 256 * 1024
CLASSES, PER_CLASS = 4, 6
# crafted entries written straight into Milvus: each must be refused or answered precisely
EVIL_DOTDOT, EVIL_ABS, EVIL_SYMLINK, INNER_LINK, MISSING, NOT_IMAGE = 101, 102, 103, 104, 105, 106


def label_of(rel: str) -> str:
    """Folder name without the Stanford-Dogs synset prefix, as the indexer does."""
    import re

    return re.sub(r"^n\d{8}-", "", rel.split("/")[0])


def index_folder(root: Path, db: Path, triton_grpc: str, repo: Path, extra: list[Row] = ()) -> dict[str, int]:
    """Encode every .jpg under ``root`` through Triton and upsert it (+ ``extra`` rows); rel path -> id."""
    card = read_card(repo, MODEL)
    files = sorted(p for p in root.rglob("*.jpg")
                   if p.is_file() and not p.is_symlink() and sniff_format(p.read_bytes()[:16]))
    blobs = [p.read_bytes() for p in files]
    pixels = np.stack([decode_image(b) for b in blobs])

    async def encode() -> np.ndarray:
        enc = TritonEncoder(triton_grpc, MODEL)
        try:
            out = [await enc.encode(pixels[i:i + 16]) for i in range(0, len(pixels), 16)]
            return np.concatenate([o.embeddings for o in out])
        finally:
            await enc.close()

    emb = asyncio.run(encode())
    rows = [Row(content_id(b), p.relative_to(root).as_posix(), label_of(p.relative_to(root).as_posix()), e)
            for p, b, e in zip(files, blobs, emb)]
    store = VectorStore(str(db), COLLECTION)
    try:
        store.open(card.embedding_dim, card.model_sha, card.name)
        store.upsert(rows + list(extra))
    finally:
        store.close()
        release_lite(db)
    return {r.path: r.id for r in rows}


def release_lite(db: Path) -> None:
    """Milvus Lite runs in-process and holds the file lock until released: let the gateway open it."""
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_server(str(db))


@dataclass
class Gateway:
    url: str
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Stack:
    gw: Gateway
    root: Path
    ids: dict[str, int]  # rel path -> id of the indexed generated images
    outside: Path

    @property
    def url(self) -> str:
        return self.gw.url

    def image(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()


def start_gateway(env: dict[str, str], startup_timeout_s: float = 90.0) -> Gateway:
    """uvicorn on a free loopback port; returns once /healthz answers (lifespan done)."""
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("IMGSEARCH_")}
    clean.update(env)
    clean.setdefault("PYTHONUNBUFFERED", "1")
    log_path = Path(tempfile.mkstemp(prefix="gateway-", suffix=".log")[1])
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "gateway.app:app_from_env", "--factory",
             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
            cwd=REPO_ROOT, env=clean, stdout=logf, stderr=subprocess.STDOUT)
    gw = Gateway(f"http://127.0.0.1:{port}", proc, log_path)
    deadline = time.monotonic() + startup_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}:\n{gw.log()}")
        try:
            with urllib.request.urlopen(gw.url + "/healthz", timeout=2) as r:
                if r.status == 200:
                    return gw
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    gw.stop()
    raise RuntimeError(f"gateway not up after {startup_timeout_s}s:\n{gw.log()}")


def gateway_env(repo: Path, triton_grpc: str, db: Path, image_root: Path, **extra: object) -> dict[str, str]:
    env = {
        "IMGSEARCH_TRITON_URL": triton_grpc,
        "IMGSEARCH_MODEL_REPOSITORY": str(repo),
        "IMGSEARCH_MODEL_NAME": MODEL,
        "IMGSEARCH_MILVUS_URI": str(db),
        "IMGSEARCH_COLLECTION": COLLECTION,
        "IMGSEARCH_IMAGE_ROOT": str(image_root),
        "IMGSEARCH_DECODE_THREADS": "2",
        "IMGSEARCH_TRITON_TIMEOUT_S": "10",
    }
    env.update({f"IMGSEARCH_{k.upper()}": str(v) for k, v in extra.items()})
    return env
