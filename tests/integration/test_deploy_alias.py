"""docs/deploy.md's model roll-out relies on IMGSEARCH_COLLECTION naming a Milvus alias.

On real Milvus Lite: the store opens, guards, searches and upserts through an alias; an
alias swap moves every new reader to the other collection, whose model sha the guard then
enforces; and dropping through the alias (``imgsearch index --recreate``) is refused, so
the live collection survives a wrong command.
"""

from __future__ import annotations

import numpy as np
import pytest

from imgsearch.errors import CollectionMismatch, StoreError
from imgsearch.store import Row, VectorStore


def unit(rows: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def fill(uri: str, name: str, dim: int, sha: str, first_id: int, seed: int) -> np.ndarray:
    vecs = unit(4, dim, seed)
    s = VectorStore(uri, name)
    try:
        s.open(dim, sha, f"model-{sha}")
        s.upsert([Row(first_id + i, f"{name}/{i}.jpg", name, v) for i, v in enumerate(vecs)])
    finally:
        s.close()
    return vecs


def client_op(uri: str, op: str, **kw) -> None:
    from pymilvus import MilvusClient

    c = MilvusClient(uri)
    try:
        getattr(c, op)(**kw)
    finally:
        c.close()


def test_collection_alias_roll_out(tmp_path):
    uri = str(tmp_path / "milvus.db")
    old = fill(uri, "images_aaaa0001", 16, "aaaa0001", 100, seed=1)
    new = fill(uri, "images_bbbb0002", 32, "bbbb0002", 200, seed=2)  # another model: another dim too
    client_op(uri, "create_alias", collection_name="images_aaaa0001", alias="images")

    live = VectorStore(uri, "images")
    live.open(16, "aaaa0001")  # the guard reads the aliased collection's properties
    hits = live.search(old[:1], 2, None, None, None)[0]
    assert hits[0].id == 100 and hits[0].path == "images_aaaa0001/0.jpg"
    assert live.count() == 4
    live.upsert([Row(104, "images_aaaa0001/4.jpg", "images_aaaa0001", unit(1, 16, 9)[0])])
    assert live.count() == 5
    live.close()

    # the old model against the new collection: refused
    with pytest.raises(CollectionMismatch):
        VectorStore(uri, "images_bbbb0002").open(16, "aaaa0001")

    client_op(uri, "alter_alias", collection_name="images_bbbb0002", alias="images")

    swapped = VectorStore(uri, "images")
    swapped.open(32, "bbbb0002")
    hits = swapped.search(new[:1], 1, None, None, None)[0]
    assert hits[0].id == 200 and hits[0].path == "images_bbbb0002/0.jpg"
    assert swapped.count() == 4
    swapped.close()

    # a gateway still configured with the old model cannot open the swapped alias
    stale = VectorStore(uri, "images")
    with pytest.raises(CollectionMismatch):
        stale.open(16, "aaaa0001")
    stale.close()

    # `--recreate` through the alias must not drop the live collection
    guard = VectorStore(uri, "images")
    with pytest.raises(StoreError):
        guard.drop()
    guard.close()
    both = VectorStore(uri, "images_bbbb0002")
    assert both.exists() and both.count() == 4
    both.close()
    assert VectorStore(uri, "images_aaaa0001").count() == 5
