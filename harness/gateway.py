"""Test harness for the gateway: index a folder directly, run uvicorn as a subprocess.

Used by the gateway integration tests and the browser test. The gateway runs exactly
as in production (``uvicorn imgsearch.gateway.app:app_from_env --factory``), configured through
IMGSEARCH_* variables, on a free loopback port.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from harness.stack import (  # noqa: F401
    COLLECTION,
    MODEL,
    GatewayProc,
    gateway_env,
    index_images,
    release_lite,
)
from harness.stack import start_gateway as _start_gateway
from imgsearch.labels import folder_label
from imgsearch.store import Row

API_KEY = "test-key-0123456789"
MAX_UPLOAD = 256 * 1024
CLASSES, PER_CLASS = 4, 6
# crafted entries written straight into Milvus: each must be refused or answered precisely
EVIL_DOTDOT, EVIL_ABS, EVIL_SYMLINK, INNER_LINK, MISSING, NOT_IMAGE = 101, 102, 103, 104, 105, 106


def label_of(rel: str) -> str:
    """Folder name without the Stanford-Dogs synset prefix, as the indexer does."""
    return folder_label(rel.split("/")[0])


def index_folder(root: Path, db: Path, triton_grpc: str, repo: Path, extra: list[Row] = ()) -> dict[str, int]:
    """Encode every .jpg under ``root`` through Triton and upsert it (+ ``extra`` rows); rel path -> id."""
    return index_images(root, str(db), triton_grpc, repo, MODEL, COLLECTION, extra=extra)


@dataclass
class Stack:
    gw: GatewayProc
    root: Path
    ids: dict[str, int]  # rel path -> id of the indexed generated images
    outside: Path
    env: dict[str, str] = field(default_factory=dict)  # the gateway's IMGSEARCH_* settings

    @property
    def url(self) -> str:
        return self.gw.url

    def image(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()


def start_gateway(env: dict[str, str], startup_timeout_s: float = 90.0, **options) -> GatewayProc:
    """uvicorn on a free loopback port; returns once /healthz answers (lifespan done)."""
    return _start_gateway(env, log_level="warning", startup_timeout_s=startup_timeout_s, **options)
