"""The store's index settings (HNSW M / efConstruction, the search's ef) keep recall@10 >= 0.95.

A small clustered set in a real Milvus Lite, indexed as ``imgsearch index`` leaves it
(flush + wait for the index), searched through :meth:`VectorStore.search_many` and compared
with exact cosine search. docs/deploy.md (Capacity) has the recall at 20k-250k vectors.
"""

from __future__ import annotations

import pytest

from harness.vectors import clustered_vectors, fill, recall_at_k, release
from imgsearch.store import VectorStore

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("dim", [256, 2048])
def test_recall_at_10_of_the_chosen_index_settings(tmp_path, dim):
    n, q = 5000, 100
    everything = clustered_vectors(n + q, dim, seed=7, clusters=50)
    vectors, queries = everything[:n], everything[n:]  # held-out queries from the same clusters
    store = VectorStore(str(tmp_path / "recall.db"), "recall")
    try:
        ids = fill(store, vectors, "recall-test", progress=False)
        state = store.build_index()
        assert state["index_type"] == "HNSW" and state["last_build"]["rows"] == n
        recall = recall_at_k(store, vectors, ids, queries, 10)
    finally:
        release(store)
    assert recall >= 0.95, f"recall@10 {recall:.3f} at {n} x {dim}"
