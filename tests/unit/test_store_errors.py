"""The Milvus boundary tells a refused row from a Milvus that did not answer."""

from __future__ import annotations

import numpy as np
import pytest

from harness.fakes import store_with
from imgsearch.errors import EntryRefused, StoreError, StoreUnavailable
from imgsearch.store import BULK_WRITE_TIMEOUT_S, PROP_DIM, PROP_SHA, Row, VectorStore

DEADLINE = ("<_InactiveRpcError of RPC that terminated with:\n\tstatus = StatusCode.DEADLINE_EXCEEDED\n"
            '\tdetails = "Stream removed (Deadline Exceeded)"')
REFUSED = "the length (56) of varchar field exceeds max_length=40"


class Client:
    """Answers has_collection; its upsert fails with the given message, recording its deadline."""

    def __init__(self, upsert_error: str) -> None:
        self.upsert_error = upsert_error
        self.timeouts: list[float] = []

    def has_collection(self, name, timeout=None):
        return True

    def upsert(self, collection, rows, timeout=None):
        self.timeouts.append(timeout)
        raise Exception(self.upsert_error)

    def close(self):
        pass


def row() -> Row:
    return Row(1, "a/b.jpg", "a", np.zeros(4, np.float32))


def test_a_write_milvus_did_not_answer_in_time_is_unavailable_not_refused():
    with pytest.raises(StoreUnavailable, match="failed during upsert"):
        store_with(Client(DEADLINE)).upsert([row()])


def test_a_row_milvus_answered_no_to_is_refused():
    with pytest.raises(EntryRefused, match="max_length"):
        store_with(Client(REFUSED)).upsert([row()])


def test_bulk_writes_get_the_batch_deadline_requests_their_own():
    client = Client(REFUSED)
    store = store_with(client)
    for bulk in (False, True):
        with pytest.raises(EntryRefused):
            store.upsert([row()], bulk=bulk)
    assert client.timeouts == [2.0, BULK_WRITE_TIMEOUT_S]


class Recording:
    """An existing collection of this model; records each call's deadline."""

    def __init__(self) -> None:
        self.timeouts: list[tuple[str, float]] = []

    def __getattr__(self, name):
        def call(*args, timeout=None, **kwargs):
            self.timeouts.append((name, timeout))
            if name == "describe_collection":
                return {"properties": {PROP_SHA: "sha", PROP_DIM: "4"}}
            return True
        return call


def test_loading_waits_as_long_as_it_may_take_a_patient_open_too_requests_do_not():
    client = Recording()
    store = VectorStore("http://127.0.0.1:1", "images", timeout_s=2.0, load_timeout_s=300.0)
    store._client = client
    store.open(4, "sha")  # the gateway's: only the load itself may take long
    assert client.timeouts[-1] == ("load_collection", 300.0)
    assert {t for _, t in client.timeouts[:-1]} == {2.0}, client.timeouts
    client.timeouts.clear()
    store.open(4, "sha", patient=True)  # a batch job's
    assert client.timeouts and {t for _, t in client.timeouts} == {300.0}, client.timeouts
    client.timeouts.clear()
    store.exists()
    assert client.timeouts == [("has_collection", 2.0)]


class Flushing:
    """Its flushes fail with the given messages in turn, then succeed."""

    def __init__(self, *errors: str) -> None:
        self.errors = list(errors)
        self.flushes = 0

    def flush(self, collection, timeout=None):
        self.flushes += 1
        if self.errors:
            raise Exception(self.errors.pop(0))

    def close(self):
        pass


def flushing_store(client: Flushing, monkeypatch, uri: str = "http://127.0.0.1:1") -> VectorStore:
    store = store_with(client, uri)
    monkeypatch.setattr(store, "_connect", lambda: client)  # a failed call drops its client
    monkeypatch.setattr("imgsearch.store.time.sleep", lambda s: None)
    return store


def flush(store: VectorStore) -> None:
    store._call_again("flush", lambda c: c.flush(store.collection, timeout=5.0))  # as build_index does


def test_a_flush_milvus_answered_with_an_error_is_tried_again(monkeypatch):
    # Milvus Lite's server, when two clients' flushes race
    client = Flushing("<MilvusException: (code=1, message=current_seq is monotonic; tried to set 133 < 148)>")
    flush(flushing_store(client, monkeypatch))
    assert client.flushes == 2


def test_a_flush_that_keeps_failing_or_got_no_answer_is_reported(monkeypatch):
    client = Flushing(*["<MilvusException: (code=1, message=disk full)>"] * 3)
    with pytest.raises(StoreUnavailable, match="disk full"):
        flush(flushing_store(client, monkeypatch))
    assert client.flushes == 3
    hung = Flushing(DEADLINE)
    with pytest.raises(StoreUnavailable, match="failed during flush"):
        flush(flushing_store(hung, monkeypatch))
    assert hung.flushes == 1  # a Milvus that did not answer in time is not waited for again


class LiteBuilding(Flushing):
    """A Milvus Lite whose first loads meet the index file its background build is still writing."""

    def __init__(self, short_reads: int) -> None:
        super().__init__()
        self.short_reads = short_reads
        self.loads = 0
        self.releases = 0

    def release_collection(self, collection, timeout=None):
        self.releases += 1

    def load_collection(self, collection, timeout=None):
        self.loads += 1
        if self.short_reads:
            self.short_reads -= 1
            raise Exception("<MilvusException: (code=1, message=Error in void faiss::read_xb_vector(...): "
                            "'ret == (size)' failed: read error in .../data_000001_000030.embedding.hnsw.idx: "
                            "60894 != 153600 (Resource temporarily unavailable))>")

    def query(self, collection, filter="", output_fields=(), timeout=None):
        return [{"count(*)": 30}]

    def alter_collection_properties(self, collection, properties, timeout=None):
        pass

    def describe_index(self, collection, field, timeout=None):
        return {"index_type": "HNSW", "metric_type": "COSINE", "total_rows": 30, "indexed_rows": 30}

    def describe_collection(self, collection, timeout=None):
        return {"properties": {}}


def test_a_lite_load_that_meets_a_half_written_index_file_is_tried_again(monkeypatch, tmp_path):
    client = LiteBuilding(short_reads=1)
    state = flushing_store(client, monkeypatch, str(tmp_path / "milvus.db")).build_index()
    assert (client.flushes, client.releases, client.loads) == (1, 2, 2)
    assert state["indexed_rows"] == 30


def test_a_lite_load_that_keeps_failing_is_reported(monkeypatch, tmp_path):
    client = LiteBuilding(short_reads=5)
    with pytest.raises(StoreUnavailable, match="failed during load_collection: .*read error"):
        flushing_store(client, monkeypatch, str(tmp_path / "milvus.db")).build_index()
    assert client.loads == 5


class Unindexed(Recording):
    """An existing collection of this model whose creator died before creating its vector index."""

    def __init__(self) -> None:
        super().__init__()
        self.indexes: list[str] = []

    def list_indexes(self, collection, field_name="", timeout=None):
        self.timeouts.append(("list_indexes", timeout))
        return list(self.indexes)

    def describe_index(self, collection, field, timeout=None):
        return {"index_type": "HNSW", "field_name": field} if self.indexes else None

    def create_index(self, collection, index_params, timeout=None):
        self.timeouts.append(("create_index", timeout))
        self.indexes = [p.field_name for p in index_params]

    @staticmethod
    def prepare_index_params():
        from pymilvus import MilvusClient

        return MilvusClient.prepare_index_params()


def test_a_missing_index_is_reported_as_such_and_opening_creates_it():
    client = Unindexed()
    store = store_with(client)
    with pytest.raises(StoreError, match="no vector index .*run `imgsearch index`"):
        store.index_state()
    store.open(4, "sha")
    calls = [name for name, _ in client.timeouts]
    # released first: Milvus refuses an index on a loaded collection; loaded again after
    assert calls.index("release_collection") < calls.index("create_index") < calls.index("load_collection")
    assert client.indexes == ["embedding"] and store.index_state()["index_type"] == "HNSW"
    client.timeouts.clear()
    store.open(4, "sha")  # an index there: nothing created
    assert "create_index" not in [name for name, _ in client.timeouts]


def test_a_create_a_milvus_lite_server_cut_short_says_what_to_remove():
    error = "<MilvusException: (code=1, message=[Errno 17] File exists: '/data/server.db/collections/images')>"

    def create(c):
        raise Exception(error)

    with pytest.raises(StoreUnavailable, match=r"File exists.*remove that folder on the server"):
        store_with(Client(REFUSED))._call("create_collection", create)
