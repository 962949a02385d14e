"""VectorStore.search_many and get_many over Milvus' own messages: one call for many queries, split
back per query; the requests are the ones pymilvus builds for the same call (a recording stub)."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
from pymilvus.client.prepare import Prepare
from pymilvus.grpc_gen import common_pb2, milvus_pb2, schema_pb2

from imgsearch import milvus_rpc
from imgsearch.errors import StoreUnavailable
from imgsearch.store import SearchQuery, VectorStore, search_ef


def strings(name: str, values: list[str]) -> schema_pb2.FieldData:
    return schema_pb2.FieldData(field_name=name, type=schema_pb2.DataType.VarChar,
                                scalars=schema_pb2.ScalarField(string_data=schema_pb2.StringArray(data=values)))


class Stub:
    """Answers each query vector with ids 1..limit, scores falling from 0.95 by 0.1; a get with the
    ids asked for that are <= 100, with embeddings [id, id+1, ...]; records the requests."""

    def __init__(self, dim: int = 4, status: common_pb2.Status | None = None) -> None:
        self.dim = dim
        self.status = status or common_pb2.Status()
        self.requests: list = []

    def Search(self, request, timeout=None, metadata=None):
        self.requests.append(request)
        limit = int(dict((p.key, p.value) for p in request.search_params)["topk"])
        n = request.nq
        ids = list(range(1, limit + 1)) * n
        return milvus_pb2.SearchResults(status=self.status, results=schema_pb2.SearchResultData(
            num_queries=n, top_k=limit, topks=[limit] * n, scores=[0.95 - 0.1 * (i - 1) for i in ids],
            ids=schema_pb2.IDs(int_id=schema_pb2.LongArray(data=ids)),
            fields_data=[strings("path", [f"p{i}" for i in ids]), strings("label", ["x"] * len(ids))]))

    def Query(self, request, timeout=None, metadata=None):
        self.requests.append(request)
        ids = [i for i in eval(request.expr.removeprefix("id in ")) if i <= 100]  # noqa: S307 - our own list
        fields = [schema_pb2.FieldData(field_name="id", type=schema_pb2.DataType.Int64, scalars=schema_pb2.ScalarField(
            long_data=schema_pb2.LongArray(data=ids))), strings("path", [f"p{i}" for i in ids]),
            strings("label", ["x"] * len(ids))]
        if "embedding" in request.output_fields:
            data = [float(i + k) for i in ids for k in range(self.dim)]
            fields.append(schema_pb2.FieldData(field_name="embedding", type=schema_pb2.DataType.FloatVector,
                                               vectors=schema_pb2.VectorField(
                                                   dim=self.dim, float_vector=schema_pb2.FloatArray(data=data))))
        return milvus_pb2.QueryResults(status=self.status, fields_data=fields)


class Client:
    """pymilvus' client as the store reaches it: its connection's stub and its call context."""

    def __init__(self, stub: Stub) -> None:
        self._stub = stub

    def _get_connection(self):
        return self

    def _generate_call_context(self):
        class Context:
            def to_grpc_metadata(self):
                return [("dbname", "")]

        return Context()

    def close(self):
        pass


def store_with(stub: Stub) -> VectorStore:
    s = VectorStore("unused.db", "c")
    s._client = Client(stub)  # the boundary's connection, already made
    return s


def test_one_call_for_all_queries_each_cut_to_its_own_top_k_min_score_and_exclusion():
    stub = Stub()
    v = np.ones(4, dtype=np.float32)
    queries = [SearchQuery(v, top_k=2), SearchQuery(v, top_k=5, exclude_id=2),
               SearchQuery(v, top_k=5, min_score=0.7), SearchQuery(v, top_k=3, exclude_id=9)]
    out = store_with(stub).search_many(queries, label="a b")
    [request] = stub.requests
    params = dict((p.key, p.value) for p in request.search_params)
    assert (request.nq, params["topk"], request.dsl) == (4, "6", 'label == "a b"')
    assert params["params"] == f'{{"ef": {search_ef(5)}, "metric_type": "COSINE"}}'
    assert [[h.id for h in hits] for hits in out] == [[1, 2], [1, 3, 4, 5, 6], [1, 2, 3], [1, 2, 3]]
    assert all(h.score >= 0.7 for h in out[2])
    assert out[0][1].path == "p2" and out[0][1].score == pytest.approx(0.85)


def test_ef_is_never_below_the_limit():
    stub = Stub()
    store_with(stub).search_many([SearchQuery(np.ones(4, dtype=np.float32), top_k=100, exclude_id=1)])
    params = dict((p.key, p.value) for p in stub.requests[0].search_params)
    assert params["topk"] == "101" and json.loads(params["params"])["ef"] >= 101


def test_the_search_request_is_the_one_pymilvus_builds():
    vectors = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    param = {"metric_type": "COSINE", "params": {"ef": 128}}
    ours = milvus_rpc.search_request("c", vectors, 11, param, 'label == "x"', ["path", "label"])
    theirs = Prepare.search_requests_with_expr("c", "embedding", param, 11, data=list(vectors), expr='label == "x"',
                                               output_fields=["path", "label"])
    assert ours.placeholder_group == theirs.placeholder_group  # the vectors, byte for byte
    for request in (ours, theirs):  # the same parameters; JSON spacing aside
        request.search_params.sort(key=lambda p: p.key)
        for p in request.search_params:
            if p.key == "params":
                p.value = p.value.replace(" ", "")
    assert ours == theirs


def test_the_get_request_is_the_one_pymilvus_builds():
    theirs = Prepare.query_request("c", "id in [1, 2]", ["id", "path"], None)
    assert milvus_rpc.query_request("c", "id in [1, 2]", ["id", "path"]) == theirs


def test_get_many_reads_rows_and_embeddings_and_marks_the_missing():
    stub = Stub(dim=3)
    got = store_with(stub).get_many([7, 500, 2], with_embedding=True)
    assert stub.requests[0].expr == "id in [2, 7, 500]"
    assert got[1] is None
    assert (got[0].id, got[0].path, got[2].label) == (7, "p7", "x")
    assert got[0].embedding.tolist() == [7.0, 8.0, 9.0] and got[0].embedding.dtype == np.float32
    assert store_with(Stub()).get_many([]) == []
    assert store_with(Stub()).get_many([3])[0].embedding is None


def test_packed_floats_are_read_without_a_python_float_each():
    for values in ([], [1.5], list(np.linspace(-1, 1, 2048, dtype=np.float32))):
        arr = schema_pb2.FloatArray(data=values)
        assert milvus_rpc.floats(arr).tolist() == np.asarray(values, dtype=np.float32).tolist()


def test_an_error_status_is_the_store_s_error_and_names_milvus_reason():
    stub = Stub(status=common_pb2.Status(code=100, reason="collection not loaded"))
    with pytest.raises(StoreUnavailable, match="during search: collection not loaded") as e:
        store_with(stub).search_many([SearchQuery(np.ones(4, dtype=np.float32))])
    assert e.value.answered
    with pytest.raises(StoreUnavailable, match="during get: collection not loaded"):
        store_with(stub).get_many([1])


class Dropped(grpc.RpcError):
    """What a call in flight on a connection the server closes raises (or one past its deadline)."""

    def __init__(self, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "GOAWAY received; Debug Text: too_many_pings" if self._code == grpc.StatusCode.UNAVAILABLE else "late"


class Flaky(Stub):
    """Fails its first ``failures`` calls with ``code``, then answers."""

    def __init__(self, failures: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        super().__init__()
        self.failures, self.code, self.calls = failures, code, 0

    def Search(self, request, timeout=None, metadata=None):
        self.calls += 1
        if self.calls <= self.failures:
            raise Dropped(self.code)
        return super().Search(request, timeout, metadata)


def test_a_read_dropped_with_its_connection_is_sent_once_more():
    stub = Flaky(failures=1)
    hits = store_with(stub).search_many([SearchQuery(np.ones(4, dtype=np.float32), top_k=3)])
    assert stub.calls == 2 and [h.id for h in hits[0]] == [1, 2, 3]


def test_a_milvus_that_stays_unavailable_fails_after_the_second_try():
    stub = Flaky(failures=5)
    with pytest.raises(StoreUnavailable, match="during search: UNAVAILABLE: GOAWAY received") as e:
        store_with(stub).search_many([SearchQuery(np.ones(4, dtype=np.float32))])
    assert stub.calls == 2 and not e.value.answered


def test_a_call_past_its_deadline_is_not_sent_again():
    stub = Flaky(failures=1, code=grpc.StatusCode.DEADLINE_EXCEEDED)
    with pytest.raises(StoreUnavailable, match="during search: DEADLINE_EXCEEDED: late") as e:
        store_with(stub).search_many([SearchQuery(np.ones(4, dtype=np.float32))])
    assert stub.calls == 1 and not e.value.answered


def test_replies_that_do_not_add_up_are_the_store_s_error_not_a_crash():
    v = np.ones(4, dtype=np.float32)

    class ShortPaths(Stub):
        def Search(self, request, timeout=None, metadata=None):
            reply = super().Search(request, timeout, metadata)
            del reply.results.fields_data[0].scalars.string_data.data[-1]
            return reply

        def Query(self, request, timeout=None, metadata=None):
            reply = super().Query(request, timeout, metadata)
            del reply.fields_data[1].scalars.string_data.data[-1]
            return reply

    class FewerLists(Stub):
        def Search(self, request, timeout=None, metadata=None):
            reply = super().Search(request, timeout, metadata)
            del reply.results.topks[-1]
            return reply

    class ShortVectors(Stub):
        def Query(self, request, timeout=None, metadata=None):
            reply = super().Query(request, timeout, metadata)
            del reply.fields_data[-1].vectors.float_vector.data[-1]
            return reply

    for stub in (ShortPaths(), FewerLists()):
        with pytest.raises(StoreUnavailable, match="search reply does not add up"):
            store_with(stub).search_many([SearchQuery(v), SearchQuery(v)])
    for stub in (ShortPaths(), ShortVectors()):
        with pytest.raises(StoreUnavailable, match="get reply does not add up"):
            store_with(stub).get_many([1, 2], with_embedding=True)
