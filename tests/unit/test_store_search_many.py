"""VectorStore.search_many's split of one Milvus call into per-query answers (a recording stand-in client)."""

from __future__ import annotations

import numpy as np

from imgsearch.store import SearchQuery, VectorStore, search_ef


class Client:
    """Answers each vector with ids 1..limit, scores falling from 0.95 by 0.1, and records the call."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def search(self, collection, data, limit, filter, output_fields, search_params, timeout=None):
        self.calls.append({"n": len(data), "limit": limit, "filter": filter, "params": search_params})
        return [[{"id": i, "distance": 0.95 - 0.1 * (i - 1), "entity": {"path": f"p{i}", "label": "x"}}
                 for i in range(1, limit + 1)] for _ in data]


def store_with(client: Client) -> VectorStore:
    s = VectorStore("unused.db", "c")
    s._client = client  # the boundary's connection, already made
    return s


def test_one_call_for_all_queries_each_cut_to_its_own_top_k_min_score_and_exclusion():
    client = Client()
    v = np.ones(4, dtype=np.float32)
    queries = [SearchQuery(v, top_k=2), SearchQuery(v, top_k=5, exclude_id=2),
               SearchQuery(v, top_k=5, min_score=0.7), SearchQuery(v, top_k=3, exclude_id=9)]
    out = store_with(client).search_many(queries, label="a b")
    assert client.calls == [{"n": 4, "limit": 6, "filter": 'label == "a b"',
                             "params": {"metric_type": "COSINE", "params": {"ef": search_ef(5)}}}]
    assert [[h.id for h in hits] for hits in out] == [[1, 2], [1, 3, 4, 5, 6], [1, 2, 3], [1, 2, 3]]
    assert all(h.score >= 0.7 for h in out[2])


def test_ef_is_never_below_the_limit():
    client = Client()
    store_with(client).search_many([SearchQuery(np.ones(4, dtype=np.float32), top_k=100, exclude_id=1)])
    assert client.calls[0]["limit"] == 101 and client.calls[0]["params"]["params"]["ef"] >= 101
