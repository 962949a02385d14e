"""Milvus' search and get as the gRPC messages themselves, packed and read with numpy.

pymilvus packs each query vector float by float (``struct.pack``) and wraps every hit in
objects the caller then reads back field by field: for a batch of 16 queries of 2048 floats
that is about four times the CPU of the call itself (``docs/deploy.md``, Gateway CPU). The
two calls on the serving path, search and get-by-id, are built here from Milvus' own protobuf
classes (shipped with pymilvus) and sent through pymilvus' connection, which carries the
token and identifier headers; every other call goes through pymilvus as usual. The requests
hold the fields pymilvus' ``Prepare`` sets for the same call (a unit test compares them).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np


class RpcFailed(Exception):
    """A search or get that failed: Milvus' error status, a reply that does not add up, or the
    gRPC status of a call it did not answer (whose name the message carries)."""


def search_request(collection: str, vectors: np.ndarray, limit: int, params: dict[str, Any], expr: str,
                   output_fields: Sequence[str], anns_field: str = "embedding") -> Any:
    """One SearchRequest for every row of ``vectors`` (float32), ``limit`` hits each."""
    from pymilvus.grpc_gen import common_pb2, milvus_pb2

    rows = np.ascontiguousarray(np.atleast_2d(vectors), dtype="<f4")
    group = common_pb2.PlaceholderGroup(placeholders=[common_pb2.PlaceholderValue(
        tag="$0", type=common_pb2.PlaceholderType.FloatVector, values=[r.tobytes() for r in rows])])
    search_params = {"topk": str(limit), "round_decimal": "-1", "ignore_growing": "False",
                     "metric_type": params["metric_type"], "anns_field": anns_field,
                     "params": json.dumps({**params.get("params", {}), "metric_type": params["metric_type"]})}
    return milvus_pb2.SearchRequest(
        collection_name=collection, dsl=expr, dsl_type=common_pb2.DslType.BoolExprV1,
        placeholder_group=group.SerializeToString(), output_fields=list(output_fields), nq=len(rows),
        search_params=[common_pb2.KeyValuePair(key=k, value=v) for k, v in search_params.items()],
        use_default_consistency=True)


def query_request(collection: str, expr: str, output_fields: Sequence[str]) -> Any:
    """One QueryRequest: the rows ``expr`` selects, with ``output_fields``."""
    from pymilvus.grpc_gen import common_pb2, milvus_pb2

    return milvus_pb2.QueryRequest(
        collection_name=collection, expr=expr, output_fields=list(output_fields), use_default_consistency=True,
        query_params=[common_pb2.KeyValuePair(key="ignore_growing", value="False"),
                      common_pb2.KeyValuePair(key="reduce_stop_for_best", value="False")])


def check(reply: Any) -> Any:
    """The reply, or RpcFailed with Milvus' reason when its status is an error."""
    status = reply.status
    if status.code or status.error_code:
        raise RpcFailed(f"{status.reason or 'error'} (code {status.code or status.error_code})")
    return reply


def floats(array: Any) -> np.ndarray:
    """A FloatArray's values, without a Python float per value.

    proto3 packs a repeated float: its one field's tag, the byte length as a varint, then the
    floats, little-endian, to the end. So the floats are the last 4 bytes per value; anything
    else is read the slow way.
    """
    raw = array.SerializeToString()
    start = len(raw) - 4 * len(array.data)
    if raw[:1] == b"\x0a" and 1 < start <= 11:  # the tag, then a varint of 1 to 10 bytes
        return np.frombuffer(raw, dtype="<f4", offset=start).astype(np.float32)
    return np.asarray(array.data, dtype=np.float32)


def _strings(fields: Any) -> dict[str, Any]:
    return {f.field_name: f.scalars.string_data.data for f in fields if f.scalars.HasField("string_data")}


def read_hits(reply: Any, nq: int) -> list[list[tuple[int, str, str, float]]]:
    """Per query (``nq`` of them), its hits best first: (id, path, label, score)."""
    res = check(reply).results
    ids = list(res.ids.int_id.data)
    scores = list(res.scores)
    text = _strings(res.fields_data)
    paths = list(text.get("path", ()))
    labels = list(text.get("label", ()))
    # Milvus leaves topks empty when no query found anything
    topks = list(res.topks) or [0] * nq
    if not len(scores) == len(paths) == len(labels) == len(ids) == sum(topks) or len(topks) != nq:
        raise RpcFailed(f"Milvus' search reply does not add up: {nq} queries, {len(topks)} hit counts summing to "
                        f"{sum(topks)}, {len(ids)} ids, {len(scores)} scores, {len(paths)} paths, {len(labels)} labels")
    out, start = [], 0
    for n in topks:
        out.append(list(zip(ids[start:start + n], paths[start:start + n], labels[start:start + n],
                            scores[start:start + n])))
        start += n
    return out


def read_rows(reply: Any) -> tuple[list[int], list[str], list[str], np.ndarray | None]:
    """A get's rows: ids, paths, labels and, when asked for, the embeddings (one row each)."""
    fields = {f.field_name: f for f in check(reply).fields_data}
    ids = list(fields["id"].scalars.long_data.data) if "id" in fields else []
    text = _strings(fields.values())
    paths, labels = list(text.get("path", ())), list(text.get("label", ()))
    embeddings = None
    if "embedding" in fields:
        vec = fields["embedding"].vectors
        values = floats(vec.float_vector)
        if vec.dim <= 0 or values.size != len(ids) * vec.dim:
            raise RpcFailed(f"Milvus' get reply does not add up: {len(ids)} ids, {values.size} floats of dim {vec.dim}")
        embeddings = values.reshape(len(ids), vec.dim)
    if len(paths) != len(ids) or len(labels) != len(ids):
        raise RpcFailed(f"Milvus' get reply does not add up: {len(ids)} ids, {len(paths)} paths, {len(labels)} labels")
    return ids, paths, labels, embeddings
