"""Reliability stack: generated images indexed once into a template Milvus Lite dir, then
one uvicorn gateway per need, each over its own copy of that dir (Milvus Lite: one process
per file). The harness is the one ``bench/flood.py`` uses (its scenarios are ``harness/faults.py``), so the figures it publishes
and the bounds asserted here come from the same code.

``main_gw``: API key set, IMGSEARCH_MAX_INFLIGHT=4, default 10 MiB upload limit, its own
TMPDIR (so "nothing written to a temp dir" can be checked), log level info (access log on).
``launch``: a factory for the fault tests (own Triton, Milvus server URI, `imgsearch serve`);
what it starts is stopped at the end of the test.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from harness.data import jpeg_bytes, make_dataset, shape_image
from harness.stack import (
    COLLECTION,
    GatewayProc,
    copy_db,
    gateway_env,
    index_images,
    release_lite,
    start_gateway,
)

API_KEY = "rel-key-0123456789abcdef"
_n = itertools.count()


@dataclass
class RelData:
    base: Path
    images: Path
    template: Path  # indexed Milvus Lite dir; copy it, never open it
    ids: dict[str, int]


@dataclass
class MainGateway:
    gw: GatewayProc
    tmpdir: Path  # the gateway process's TMPDIR
    images: Path

    @property
    def url(self) -> str:
        return self.gw.url


@pytest.fixture(scope="session")
def rel_data(tmp_path_factory, triton, repo18) -> RelData:
    base = tmp_path_factory.mktemp("rel")
    images = base / "images"
    make_dataset(images, classes=4, per_class=6)
    template = base / "template.db"
    ids = index_images(images, str(template), triton.grpc_url, repo18)
    return RelData(base, images, template, ids)


def _start(rel_data: RelData, repo: Path, triton_url: str, milvus_uri: str | None = None, *,
           serve_cli: bool = False, extra_env: dict[str, str] | None = None, image_root: Path | None = None,
           **settings: object) -> GatewayProc:
    i = next(_n)
    uri = milvus_uri or str(copy_db(rel_data.template, rel_data.base / f"gw{i}.db"))
    env = gateway_env(repo, triton_url, uri, image_root or rel_data.images, **settings)
    return start_gateway(env, serve_cli=serve_cli, log_path=rel_data.base / f"gw{i}.log", extra_env=extra_env)


@pytest.fixture(scope="session")
def api_key() -> str:
    return API_KEY


@pytest.fixture(scope="session")
def main_gw(rel_data, repo18, triton) -> MainGateway:
    tmpdir = rel_data.base / "main_tmp"
    tmpdir.mkdir()
    gw = _start(rel_data, repo18, triton.grpc_url, api_key=API_KEY, max_inflight=4,
                extra_env={"TMPDIR": str(tmpdir)})
    yield MainGateway(gw, tmpdir, rel_data.images)
    gw.stop()


@dataclass
class SecGateway:
    gw: GatewayProc
    root: Path
    ids: dict[str, int]  # name of the crafted entry -> id
    secret: bytes  # the file outside the root that the crafted entries point at
    inside: bytes  # the one legitimate file

    @property
    def url(self) -> str:
        return self.gw.url


CORS_ORIGIN = "https://ok.example"


@pytest.fixture(scope="session")
def sec_gw(rel_data, repo18, triton) -> SecGateway:
    """No API key (writes disabled), CORS for CORS_ORIGIN only, and its own image root whose
    index holds entries that try to leave it: a symlinked directory, a symlink loop, '..',
    an absolute path, backslashes. Written into the collection before the gateway opens it."""
    from imgsearch.model_card import read_card
    from imgsearch.store import Row, VectorStore

    base = rel_data.base / "sec"
    root, outside = base / "images", base / "outside"
    (root / "ok").mkdir(parents=True)
    outside.mkdir()
    secret, inside = jpeg_bytes(shape_image(5, 1)), jpeg_bytes(shape_image(4, 2))
    (outside / "secret.jpg").write_bytes(secret)
    (root / "ok" / "inside.jpg").write_bytes(inside)
    (root / "linkdir").symlink_to(outside, target_is_directory=True)
    (root / "loop").symlink_to(root / "loop")
    entries = {"inside": "ok/inside.jpg", "dir_symlink": "linkdir/secret.jpg", "loop": "loop/a.jpg",
               "dotdot": "../outside/secret.jpg", "absolute": str(outside / "secret.jpg"),
               "backslash": "..\\outside\\secret.jpg", "encoded": "ok/..%2f..%2foutside/secret.jpg"}
    ids = {name: 900 + i for i, name in enumerate(entries)}
    card = read_card(repo18, "resnet152")
    rng = np.random.default_rng(9)
    rows = []
    for name, rel in entries.items():
        v = rng.standard_normal(card.embedding_dim).astype(np.float32)
        rows.append(Row(ids[name], rel, "sec", v / np.linalg.norm(v)))
    db = copy_db(rel_data.template, base / "sec.db")
    store = VectorStore(str(db), COLLECTION)
    try:
        store.open(card.embedding_dim, card.model_sha, card.name)
        store.upsert(rows)
    finally:
        store.close()
        release_lite(db)
    gw = _start(rel_data, repo18, triton.grpc_url, str(db), image_root=root, cors_origins=f'["{CORS_ORIGIN}"]')
    yield SecGateway(gw, root, ids, secret, inside)
    gw.stop()


@pytest.fixture
def launch(rel_data, repo18, triton):
    """``launch(triton_url=None, milvus_uri=None, serve_cli=False, extra_env=None, **IMGSEARCH_settings)``."""
    started: list[GatewayProc] = []

    def _launch(triton_url: str | None = None, milvus_uri: str | None = None, **kw: object) -> GatewayProc:
        gw = _start(rel_data, repo18, triton_url if triton_url is not None else triton.grpc_url, milvus_uri, **kw)
        started.append(gw)
        return gw

    yield _launch
    for gw in started:
        gw.stop()
