"""``build_index`` against a Milvus server: flush, then wait while the server reports rows not yet
indexed. Milvus Lite reports every row indexed at once, so this branch runs only over a client
that answers as a server does (``describe_index`` of pymilvus' MilvusClient: rows total, indexed,
pending)."""

from __future__ import annotations

import json

import pytest

from harness.fakes import store_with
from imgsearch.errors import StoreUnavailable
from imgsearch.store import PROP_BUILT

TOTAL = 20_000


class Server:
    """A Milvus server's index build: ``pending`` rows at the flush, ``step`` fewer at each describe."""

    def __init__(self, pending: int, step: int) -> None:
        self.pending, self.step = pending, step
        self.calls: list[str] = []
        self.timeouts: dict[str, set] = {}
        self.flushed = False
        self.properties: dict[str, str] = {}

    def _record(self, name: str, timeout) -> None:
        self.calls.append(name)
        self.timeouts.setdefault(name, set()).add(timeout)

    def flush(self, collection, timeout=None):
        self._record("flush", timeout)
        self.flushed = True

    def describe_index(self, collection, field, timeout=None):
        self._record("describe_index", timeout)
        assert self.flushed, "the index is waited for only after the flush sealed the rows"
        state = {"index_type": "HNSW", "metric_type": "COSINE", "M": "16", "efConstruction": "200",
                 "total_rows": TOTAL, "indexed_rows": TOTAL - self.pending, "pending_index_rows": self.pending,
                 "state": "InProgress" if self.pending else "Finished"}
        self.pending = max(0, self.pending - self.step)
        return state

    def describe_collection(self, collection, timeout=None):
        self._record("describe_collection", timeout)
        return {"properties": dict(self.properties)}

    def query(self, collection, filter="", output_fields=(), timeout=None):
        self._record("query", timeout)
        return [{"count(*)": TOTAL}]

    def alter_collection_properties(self, collection, properties, timeout=None):
        self._record("alter_collection_properties", timeout)
        self.properties.update(properties)

    def close(self):
        pass


def test_build_index_on_a_server_waits_until_no_row_is_pending():
    server = Server(pending=TOTAL, step=5_000)
    state = store_with(server).build_index(poll_s=0)

    calls = [c for c in server.calls if c != "describe_collection"]  # the build record's read
    assert calls[0] == "flush"
    # 20k, 15k, 10k, 5k pending, then 0: five polls, then the count and the build record
    assert calls[1:8] == ["describe_index"] * 5 + ["query", "alter_collection_properties"]
    assert state["pending_index_rows"] == 0 and state["indexed_rows"] == TOTAL
    assert state["state"] == "Finished"
    assert state["last_build"]["rows"] == TOTAL
    assert json.loads(server.properties[PROP_BUILT])["rows"] == TOTAL


def test_an_index_already_built_is_not_waited_for(monkeypatch):
    server = Server(pending=0, step=0)

    def no_sleep(s):
        raise AssertionError(f"slept {s} s for an index already built")

    monkeypatch.setattr("imgsearch.store.time.sleep", no_sleep)
    store_with(server).build_index(poll_s=60)
    assert [c for c in server.calls if c != "describe_collection"][:4] == \
        ["flush", "describe_index", "query", "alter_collection_properties"]


def test_every_call_of_a_build_waits_as_long_as_the_build_and_requests_after_it_do_not():
    server = Server(pending=TOTAL, step=TOTAL)
    store = store_with(server)  # a request's deadline: 2 s
    store.build_index(timeout_s=900, poll_s=0)
    assert set(server.timeouts) == {"flush", "describe_index", "describe_collection", "query",
                                    "alter_collection_properties"}
    # the polls get what is left of the build's 900 s, the other calls all of it
    assert all(899 < t <= 900 for ts in server.timeouts.values() for t in ts), server.timeouts
    assert server.timeouts["flush"] == server.timeouts["query"] == {900}
    server.timeouts.clear()
    store.count()
    assert server.timeouts == {"query": {2.0}}


def test_a_server_that_never_finishes_is_unavailable_after_the_deadline_and_says_where_it_stood():
    server = Server(pending=1_000, step=0)
    with pytest.raises(StoreUnavailable, match=r"did not finish the index of 'images' in \d+s.*'pending_index_rows': 1000"):
        store_with(server).build_index(timeout_s=0.5, poll_s=0.01)
    assert "alter_collection_properties" not in server.calls  # no build recorded for an unfinished index
    assert server.calls.count("describe_index") >= 2
