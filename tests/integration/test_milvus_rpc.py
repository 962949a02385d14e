"""The store's own search and get messages against real Milvus Lite, embedded and as a server:
the same answers as pymilvus' client gives for the same calls, errors mapped at the boundary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from harness.stack import MilvusServer
from imgsearch.errors import StoreUnavailable
from imgsearch.store import Row, SearchQuery, VectorStore, search_ef

DIM = 64
N = 300


@pytest.fixture(params=["embedded", "server"])
def store(request, tmp_path: Path):
    server = MilvusServer(tmp_path / "milvus", log_path=tmp_path / "milvus.log").start() \
        if request.param == "server" else None
    s = VectorStore(server.uri if server else str(tmp_path / "m.db"), "images")
    try:
        s.open(DIM, "sha", patient=True)
        vectors = np.random.default_rng(3).standard_normal((N, DIM)).astype(np.float32)
        s.upsert([Row(i + 1, f"dir/ü{i}.jpg", f"l{i % 3}", vectors[i]) for i in range(N)], bulk=True)
        s.build_index()
        s.vectors = vectors
        yield s
    finally:
        s.close()
        if server:
            server.stop()


def test_search_many_answers_as_pymilvus_does(store):
    client = store._connect()
    queries = [SearchQuery(store.vectors[i], top_k=k, exclude_id=i + 1 if i % 2 else None)
               for i, k in ((0, 5), (7, 10), (42, 3))]
    for label in (None, "l1"):
        ours = store.search_many(queries, label)
        theirs = client.search("images", data=[q.vector for q in queries], limit=11,
                               filter=f'label == "{label}"' if label else "", output_fields=["path", "label"],
                               search_params={"metric_type": "COSINE", "params": {"ef": search_ef(10)}})
        for q, hits, ref in zip(queries, ours, theirs):
            ref = [h for h in ref if h["id"] != q.exclude_id][:q.top_k]
            assert [(h.id, h.path, h.label) for h in hits] == \
                   [(h["id"], h["entity"]["path"], h["entity"]["label"]) for h in ref]
            assert [h.score for h in hits] == pytest.approx([h["distance"] for h in ref], abs=1e-6)
            assert hits and all(h.label == label for h in hits if label)


def test_get_many_returns_the_stored_rows_and_none_for_the_missing(store):
    got = store.get_many([5, 10_000, 1], with_embedding=True)
    assert got[1] is None
    assert (got[0].id, got[0].path, got[0].label) == (5, "dir/ü4.jpg", "l1")
    assert np.array_equal(got[0].embedding, store.vectors[4]) and np.array_equal(got[2].embedding, store.vectors[0])
    assert store.get_many([2])[0].embedding is None


def test_a_refused_call_is_the_store_s_error_naming_milvus_reason(store):
    other = VectorStore(store.uri, "no_such_collection")
    try:
        with pytest.raises(StoreUnavailable, match="during search") as e:
            other.search_many([SearchQuery(store.vectors[0])])
        assert e.value.answered and "no_such_collection" in str(e.value)
        with pytest.raises(StoreUnavailable, match="during get"):
            other.get_many([1])
    finally:
        other.close()
    assert store.get_many([1])[0].id == 1  # the store itself still answers
