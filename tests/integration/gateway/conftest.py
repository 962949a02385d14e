"""Gateway fixtures: a generated image root indexed into Milvus Lite, uvicorn subprocesses.

``gw`` is the main gateway (API key set, small upload limit) over the session Triton.
``gw_nokey`` has no API key and an in-flight limit of 1, over an empty collection.
``empty_gateway(**settings)`` starts a gateway of the test's own over an empty collection and
image root (``serve_cli=True``: through ``imgsearch serve``), stopped when the test ends.
Entries that point out of the image root are written straight into Milvus with
``VectorStore.upsert``: the gateway must refuse to serve them whatever the index says.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest

from harness.data import jpeg_bytes, make_dataset, shape_image
from harness.gateway import (
    API_KEY,
    CLASSES,
    EVIL_ABS,
    EVIL_DOTDOT,
    EVIL_SYMLINK,
    INNER_LINK,
    MAX_UPLOAD,
    MISSING,
    NOT_IMAGE,
    PER_CLASS,
    Stack,
    gateway_env,
    index_folder,
    start_gateway,
)
from harness.stack import GatewayProc
from imgsearch.store import Row


def _unit(seed: int, dim: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


@pytest.fixture(scope="session")
def gw_data(tmp_path_factory, triton, repo18):
    base = tmp_path_factory.mktemp("gw")
    root = base / "images"
    make_dataset(root, classes=CLASSES, per_class=PER_CLASS)
    outside = base / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(jpeg_bytes(shape_image(3, 4242)))
    (root / "evil").mkdir()
    (root / "evil" / "link.jpg").symlink_to(outside / "secret.jpg")
    first = sorted((root / "n00000000-class_0").glob("*.jpg"))[0]
    (root / "n00000000-class_0" / "inner_link.jpg").symlink_to(first)
    (root / "notes").mkdir()
    (root / "notes" / "readme.jpg").write_text("this is text named .jpg\n")
    dim = 512
    extra = [
        Row(EVIL_DOTDOT, "../outside/secret.jpg", "evil", _unit(1, dim)),
        Row(EVIL_ABS, str(outside / "secret.jpg"), "evil", _unit(2, dim)),
        Row(EVIL_SYMLINK, "evil/link.jpg", "evil", _unit(3, dim)),
        Row(INNER_LINK, "n00000000-class_0/inner_link.jpg", "class_0", _unit(4, dim)),
        Row(MISSING, "gone/nothing.jpg", "evil", _unit(5, dim)),
        Row(NOT_IMAGE, "notes/readme.jpg", "evil", _unit(6, dim)),
    ]
    db = base / "main.db"
    ids = index_folder(root, db, triton.grpc_url, repo18, extra)
    return root, db, ids, outside


@pytest.fixture(scope="session")
def gw(gw_data, triton, repo18) -> Stack:
    root, db, ids, outside = gw_data
    env = gateway_env(repo18, triton.grpc_url, db, root, api_key=API_KEY, max_upload_bytes=MAX_UPLOAD,
                      max_inflight=16)
    gateway = start_gateway(env)
    yield Stack(gateway, root, ids, outside, env)
    gateway.stop()


@pytest.fixture(scope="session")
def gw_nokey(tmp_path_factory, triton, repo18) -> Stack:
    base = tmp_path_factory.mktemp("gw_nokey")
    root = base / "images"
    root.mkdir()
    env = gateway_env(repo18, triton.grpc_url, base / "empty.db", root, max_inflight=1)
    gateway = start_gateway(env)
    yield Stack(gateway, root, {}, base)
    gateway.stop()


@pytest.fixture
def empty_gateway(tmp_path, triton, repo18) -> Iterator[Callable[..., GatewayProc]]:
    started: list[GatewayProc] = []

    def start(serve_cli: bool = False, **settings: object) -> GatewayProc:
        root = tmp_path / "images"
        root.mkdir(exist_ok=True)
        env = gateway_env(repo18, triton.grpc_url, tmp_path / f"empty-{len(started)}.db", root, **settings)
        started.append(start_gateway(env, serve_cli=serve_cli))
        return started[-1]

    yield start
    for gw in started:
        gw.stop()
