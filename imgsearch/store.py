"""The one Milvus store: schema, guard, upsert, search, delete.

``MilvusClient(uri)`` is Milvus Lite for a path ending in ``.db`` (embedded, one process
per file) and Milvus standalone/distributed for ``http://host:19530``; the code is the
same. pymilvus errors become :mod:`imgsearch.errors` here and nowhere else. A failed call
drops the client, so the next call reconnects: a Milvus that comes back needs no restart.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from imgsearch.settings import Settings

from . import milvus_rpc
from .errors import (
    CollectionMismatch,
    EntryRefused,
    NotFound,
    StoreError,
    StoreUnavailable,
)

log = logging.getLogger(__name__)

PROP_SHA = "imgsearch.model_sha"
PROP_DIM = "imgsearch.dim"
PROP_MODEL = "imgsearch.model"
PROP_BUILT = "imgsearch.index_built"  # JSON: rows and seconds of the last build_index()
PATH_MAX = 1024
LABEL_MAX = 256
HNSW = {"index_type": "HNSW", "metric_type": "COSINE", "params": {"M": 16, "efConstruction": 200}}
# A batch write can wait behind Milvus sealing and flushing segments: Milvus Lite took over 10 s
# for one 1000-row 2048-d upsert while filling 250k rows on 2 busy cores.
BULK_WRITE_TIMEOUT_S = 120.0
# gRPC codes of a Milvus that did not answer in time or at all (not one that refused the data)
_NO_ANSWER = ("DEADLINE_EXCEEDED", "Deadline Exceeded", "UNAVAILABLE", "RESOURCE_EXHAUSTED")


def content_id(data: bytes) -> int:
    """Deterministic 63-bit id from the file's bytes: a re-run upserts, never duplicates."""
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big") & ((1 << 63) - 1)


def label_filter(label: str) -> str:
    # json.dumps quotes and escapes: a label can never break out of the expression. Non-ASCII
    # stays as is: Milvus' expression parser refuses \uXXXX escapes ("unknown escape sequence").
    return f"label == {json.dumps(label, ensure_ascii=False)}"


def printable(text: str) -> str:
    """A name that may hold undecodable bytes (kept by Python as surrogates), safe to print."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def entry_problem(path: str, label: str) -> str | None:
    """Why Milvus would refuse (or mangle) an entry with this path and label, or None.

    Milvus servers count VARCHAR limits in UTF-8 bytes (Milvus Lite counts characters), and a
    name that is not valid UTF-8 cannot be sent at all; checked here so that every Milvus
    refuses the same entries, and nothing is ever cut short to fit.
    """
    for what, text, limit in (("path", path, PATH_MAX), ("label", label, LABEL_MAX)):
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            return f"the {what} is not valid UTF-8 ({printable(text)!r}): rename it"
        if size > limit:
            return f"the {what} is {size} bytes in UTF-8, over Milvus' limit of {limit}: shorten it"
    return None


@dataclass
class Row:
    id: int
    path: str
    label: str
    embedding: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        return {"id": int(self.id), "path": self.path, "label": self.label,
                "embedding": np.asarray(self.embedding, dtype=np.float32).tolist()}


@dataclass
class Hit:
    id: int
    path: str
    label: str
    score: float


@dataclass(frozen=True)
class SearchQuery:
    """One query vector and what its caller wants back from it."""

    vector: np.ndarray
    top_k: int = 10
    min_score: float | None = None
    exclude_id: int | None = None


def search_ef(top_k: int) -> int:
    """HNSW's candidate list for a top_k: 128 at least.

    At 128, recall@10 against exact search is >= 0.999 on clustered vectors up to 250k
    (docs/deploy.md, Capacity); 64 missed the true nearest neighbour of an out-of-distribution
    query (a heavily degraded copy whose best match scores 0.51) in the copy-detection
    benchmark, which 128 found (docs/quality.md).
    """
    return max(128, 2 * top_k)


@dataclass
class Entry:
    id: int
    path: str
    label: str
    embedding: np.ndarray | None = None


def collection_schema(client: Any, dim: int, path_max: int = PATH_MAX, label_max: int = LABEL_MAX) -> tuple[Any, Any]:
    """(schema, index params) of an image collection: id, path, label, embedding (HNSW, cosine)."""
    from pymilvus import DataType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("path", DataType.VARCHAR, max_length=path_max)
    schema.add_field("label", DataType.VARCHAR, max_length=label_max)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=dim)
    index = client.prepare_index_params()
    index.add_index("embedding", **HNSW)
    return schema, index


# Milvus Lite's on-disk layout (milvus_lite.db.COLLECTIONS_DIRNAME, SCHEMA_FILENAME), written
# out rather than imported: the core does not depend on milvus-lite. A test holds them to
# Lite's own; under another layout the folder is simply not found and nothing is removed.
LITE_COLLECTIONS_DIR = "collections"
LITE_SCHEMA_FILE = "schema.json"


def is_lite(uri: str) -> bool:
    return uri.endswith(".db")


def check_rows(rows: Sequence[Row]) -> None:
    """Refuse (EntryRefused) a row whose path or label Milvus would refuse, before sending any."""
    for r in rows:
        problem = entry_problem(r.path, r.label)
        if problem:
            raise EntryRefused(f"{printable(r.path)}: {problem}")


class _WithDeadline:
    """The client, with ``timeout=`` on every call that goes to Milvus: pymilvus' constructor
    timeout covers connecting only, so a hung Milvus (paused, cut off) would block for ever."""

    LOCAL = frozenset({"prepare_index_params", "create_schema", "close"})

    def __init__(self, client: Any, timeout_s: float) -> None:
        self._client = client
        self._timeout_s = timeout_s

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name in self.LOCAL or not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("timeout", self._timeout_s)
            return attr(*args, **kwargs)

        return call

    def rpc(self, method: str, request: Any) -> Any:
        """Send one of Milvus' own gRPC requests (:mod:`imgsearch.milvus_rpc`, reads only) on
        pymilvus' connection, with the database and request headers pymilvus sends with its own.

        A read that meets UNAVAILABLE is sent once more, within the same deadline: a server may
        close an idle connection at any time (Milvus Lite's does, with GOAWAY "too_many_pings",
        after two of pymilvus' 10-second keepalive pings), and a call in flight then fails
        without having been served; the channel connects again for the next one. pymilvus
        retries its own calls so; a Milvus that is down fails the second try as fast as the first.
        """
        import grpc

        call = getattr(self._client._get_connection()._stub, method)
        metadata = self._client._generate_call_context().to_grpc_metadata()
        deadline = time.monotonic() + self._timeout_s
        for attempt in (1, 2):
            try:
                return call(request, timeout=max(deadline - time.monotonic(), 0.001), metadata=metadata)
            except grpc.RpcError as e:
                code, details = e.code(), e.details()
                if attempt == 2 or code != grpc.StatusCode.UNAVAILABLE or time.monotonic() >= deadline:
                    # the status name (UNAVAILABLE, DEADLINE_EXCEEDED) tells _call it was not answered
                    raise milvus_rpc.RpcFailed(f"{code.name}: {details}") from None
                log.info("Milvus %s: %s; trying once more", method, details)


class VectorStore:
    """One collection of image embeddings bound to one model (dim + model card sha)."""

    def __init__(self, uri: str, collection: str, token: str | None = None, timeout_s: float = 10.0,
                 load_timeout_s: float = 300.0) -> None:
        self.uri = uri
        self.collection = collection
        self.token = token
        self.timeout_s = timeout_s
        # loading reads every segment into memory (and may finish an index): minutes for a large
        # collection, so not the deadline of one request's search
        self.load_timeout_s = max(timeout_s, load_timeout_s)
        self._client = None
        self._lock = threading.Lock()
        self._patience = threading.local()  # .deadline: a batch operation's, for the calls made inside it

    @classmethod
    def from_settings(cls, settings: Settings, collection: str | None = None) -> VectorStore:
        """The store ``IMGSEARCH_MILVUS_URI`` / ``_TOKEN`` / ``_COLLECTION`` name."""
        token = settings.milvus_token.get_secret_value() if settings.milvus_token else None
        return cls(settings.milvus_uri, collection or settings.collection, token=token,
                   timeout_s=settings.milvus_timeout_s, load_timeout_s=settings.milvus_load_timeout_s)

    # --- the boundary ---------------------------------------------------------------
    def _connect(self):
        from pymilvus import MilvusClient

        if self._client is None:
            with self._lock:
                if self._client is None:
                    if is_lite(self.uri):
                        Path(self.uri).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
                    kwargs: dict[str, Any] = {"uri": self.uri}
                    if self.token:
                        kwargs["token"] = self.token
                    if not is_lite(self.uri):
                        kwargs["timeout"] = self.timeout_s
                    self._client = MilvusClient(**kwargs)
        return self._client

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            client = self._connect()
            deadline = getattr(self._patience, "deadline", None) or self.timeout_s
            return fn(_WithDeadline(client, deadline), *args, **kwargs)
        except (StoreError, ValueError):
            raise
        except Exception as e:  # noqa: BLE001 - pymilvus, grpc and milvus-lite all raise their own types
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            no_answer = any(code in str(e) for code in _NO_ANSWER)
            if what == "upsert" and not no_answer and self._still_answers():
                raise EntryRefused(f"Milvus refused the entry: {msg}") from None
            self._reset()
            if is_lite(self.uri) and "open local milvus failed" in msg.lower():
                # milvus-lite only logs why; the usual reason is its one-process-per-file lock
                msg += (" (Milvus Lite could not open the .db: another process probably holds it; one process "
                        "per file: stop `imgsearch index` or the other server using it, or use a Milvus server URI)")
            if what == "create_collection" and "File exists" in msg and not is_lite(self.uri):
                # a Milvus Lite server killed while creating leaves the folder (the local .db case
                # is mended on open: _clear_interrupted_lite_create)
                msg += (" (a create cut short on the Milvus Lite server leaves the collection's folder without its "
                        "schema.json: if nothing else is creating it, remove that folder on the server)")
            raise StoreUnavailable(f"Milvus ({self.uri}) failed during {what}: {msg}", answered=not no_answer) from None

    def _still_answers(self) -> bool:
        """After a failed write: does Milvus answer otherwise? Then it refused the data itself."""
        client = self._client
        if client is None:
            return False
        try:
            client.has_collection(self.collection, timeout=self.timeout_s)
            return True
        except Exception:  # noqa: BLE001 - any failure here means it is Milvus that is in trouble
            return False

    def _reset(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing a broken client may fail too
                pass

    def close(self) -> None:
        self._reset()

    # --- collection lifecycle -------------------------------------------------------
    def exists(self) -> bool:
        return bool(self._call("has_collection", lambda c: c.has_collection(self.collection)))

    def properties(self) -> dict[str, str]:
        desc = self._call("describe_collection", lambda c: c.describe_collection(self.collection))
        return dict(desc.get("properties") or {})

    def open(self, dim: int, model_sha: str, model: str = "", *, recreate: bool = False,
             patient: bool = False) -> None:
        """Create the collection if needed, or check it was built by this model.

        Loading it has the load deadline. ``patient`` (batch jobs: the indexer, benchmarks): so
        does every other call made here, as the first call on a Milvus Lite file waits for the
        engine to read the whole file (over 10 s for 250k 2048-d vectors on 2 busy cores). The
        gateway opens impatiently: a hung Milvus must still be reported within a request's
        deadline.
        """
        with self._patient(self.load_timeout_s if patient else None):
            if recreate and self.exists():
                self.drop()
            if not self.exists():
                self._clear_interrupted_lite_create()
                self._create(dim, model_sha, model)
            else:
                self._finish_half_created(dim, model_sha, model)
                self.check(dim, model_sha)
                self._finish_index(dim)
            self._load()

    @contextlib.contextmanager
    def _patient(self, deadline_s: float | None) -> Iterator[None]:
        """Every call this thread makes inside gets ``deadline_s`` (None: the request deadline)."""
        outer = getattr(self._patience, "deadline", None)
        self._patience.deadline = deadline_s
        try:
            yield
        finally:
            self._patience.deadline = outer

    def _load(self) -> None:
        self._call("load_collection", lambda c: c.load_collection(self.collection, timeout=self.load_timeout_s))

    def check(self, dim: int, model_sha: str) -> None:
        props = self.properties()
        have_sha, have_dim = props.get(PROP_SHA), props.get(PROP_DIM)
        if have_sha != model_sha or str(have_dim) != str(dim):
            raise CollectionMismatch(
                f"collection {self.collection!r} holds embeddings of another model "
                f"(dim {have_dim}, model sha {have_sha}); this model is dim {dim}, sha {model_sha}. "
                "Re-index with --recreate (or use another --collection)."
            )

    def _create(self, dim: int, model_sha: str, model: str) -> None:
        def create(c):
            schema, index = collection_schema(c, dim)
            # the model properties travel in the create request itself: a process killed at any
            # point leaves either no collection or one that says which model it belongs to
            c.create_collection(self.collection, schema=schema, index_params=index, consistency_level="Strong",
                                properties=self._model_properties(dim, model_sha, model))

        self._call("create_collection", create)
        log.info("created collection %s (dim %d, model sha %s) at %s", self.collection, dim, model_sha, self.uri)

    def _clear_interrupted_lite_create(self) -> None:
        """Milvus Lite makes a collection's folder, then writes its schema file (through
        ``schema.json.tmp``); a process killed between the two leaves a folder that Lite neither
        lists as a collection nor creates over ("File exists"), on every later run. Such a folder
        holds no rows (they come after the schema) and, a local .db being locked to one process,
        no one else is creating it: it is removed. Anything else in it is left for the create to
        report."""
        if not is_lite(self.uri):
            return
        folder = Path(self.uri).expanduser().resolve() / LITE_COLLECTIONS_DIR / self.collection
        if not folder.is_dir() or (folder / LITE_SCHEMA_FILE).exists():
            return
        if {p.name for p in folder.iterdir()} <= {LITE_SCHEMA_FILE + ".tmp"}:
            log.warning("collection %s: removing %s, left by a create that was cut short before its schema "
                        "was written", self.collection, folder)
            shutil.rmtree(folder)

    @staticmethod
    def _model_properties(dim: int, model_sha: str, model: str) -> dict[str, str]:
        return {PROP_SHA: model_sha, PROP_DIM: str(dim), PROP_MODEL: model}

    def _finish_half_created(self, dim: int, model_sha: str, model: str) -> None:
        """An empty collection without model properties is one whose creator died before setting
        them (versions that set them in a second call): nothing in it belongs to another model,
        so it is finished for this one. A non-empty one without them stays a mismatch."""
        if PROP_SHA in self.properties():
            return
        self._load()  # count(*) needs it
        if self.count() > 0:
            return
        log.warning("collection %s has no model properties and no entries (its creation was cut short): "
                    "finishing it for this model", self.collection)
        self._call("alter_collection_properties", lambda c: c.alter_collection_properties(
            self.collection, properties=self._model_properties(dim, model_sha, model)))

    def _finish_index(self, dim: int) -> None:
        """pymilvus creates a collection, then its vector index, in two calls: a process killed
        between them leaves a collection without the index. It is created here."""
        if self._call("list_indexes", lambda c: c.list_indexes(self.collection, field_name="embedding")):
            return
        log.warning("collection %s has no vector index (its creation was cut short): creating it", self.collection)

        def create_index(c) -> None:
            c.release_collection(self.collection)
            c.create_index(self.collection, collection_schema(c, dim)[1])

        self._call("create_index", create_index)

    def drop(self) -> None:
        def drop(c) -> None:
            # IMGSEARCH_COLLECTION may name an alias (docs/deploy.md). Dropping through it
            # removes the collection live traffic reads (Milvus Lite does), so refuse.
            if c.has_collection(self.collection):
                target = c.describe_collection(self.collection).get("collection_name", self.collection)
                if target != self.collection:
                    raise StoreError(f"{self.collection!r} is an alias of collection {target!r}: drop "
                                     f"{target!r} by its own name, after pointing the alias elsewhere")
            c.drop_collection(self.collection)

        self._call("drop_collection", drop)

    def is_ready(self) -> bool:
        def ready(c) -> bool:
            if not c.has_collection(self.collection):
                return False
            state = c.get_load_state(self.collection).get("state")
            return getattr(state, "name", str(state)) == "Loaded"

        return bool(self._call("get_load_state", ready))

    # --- data -----------------------------------------------------------------------
    def upsert(self, rows: Sequence[Row], bulk: bool = False) -> int:
        """Insert or replace rows. ``bulk``: a batch job's write (the indexer's batches), whose
        deadline is BULK_WRITE_TIMEOUT_S rather than one request's."""
        if not rows:
            return 0
        check_rows(rows)
        timeout = max(self.timeout_s, BULK_WRITE_TIMEOUT_S) if bulk else self.timeout_s
        res = self._call("upsert", lambda c: c.upsert(self.collection, [r.to_dict() for r in rows], timeout=timeout))
        return int(res.get("upsert_count", len(rows)))

    def existing(self, ids: Sequence[int]) -> dict[int, str]:
        """id -> stored path, for those of ``ids`` already in the collection."""
        if not ids:
            return {}
        got = self._call("query", lambda c: c.query(
            self.collection, filter=f"id in {[int(i) for i in ids]}", output_fields=["id", "path"]))
        return {int(r["id"]): r["path"] for r in got}

    def get(self, id_: int, with_embedding: bool = False) -> Entry:
        entry = self.get_many([id_], with_embedding)[0]
        if entry is None:
            raise NotFound(f"no image with id {id_}")
        return entry

    def delete(self, ids: Sequence[int]) -> int:
        if not ids:
            return 0
        res = self._call("delete", lambda c: c.delete(self.collection, ids=[int(i) for i in ids]))
        if isinstance(res, dict):
            return int(res.get("delete_count", len(ids)))
        return len(res) if res is not None else 0

    def search(
        self,
        vectors: np.ndarray,
        top_k: int = 10,
        min_score: float | None = None,
        label: str | None = None,
        exclude_id: int | None = None,
    ) -> list[list[Hit]]:
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        return self.search_many([SearchQuery(v, top_k, min_score, exclude_id) for v in vectors], label)

    def search_many(self, queries: Sequence[SearchQuery], label: str | None = None) -> list[list[Hit]]:
        """One Milvus call for many queries that share a label filter; one hit list per query.

        Milvus takes one limit, one filter and one set of search parameters per call, so what
        differs per query is applied here: the call asks for the largest top_k (+1 where an id
        is excluded), then each list drops its excluded id, keeps the hits >= its min_score and
        is cut to its top_k. Hits come best first, so that is the answer the query would get
        with its own limit and filter; a range search (radius) would not let queries share a
        call, and is only a hint on some index types anyway. Queries of one call should share
        :func:`search_ef` (the gateway groups them so): a larger ef is another ANN search.
        """
        if not queries:
            return []
        limit = max(q.top_k + (q.exclude_id is not None) for q in queries)
        ef = max(search_ef(q.top_k) for q in queries)
        request = milvus_rpc.search_request(
            self.collection, np.stack([np.asarray(q.vector, dtype=np.float32) for q in queries]), limit,
            {"metric_type": "COSINE", "params": {"ef": max(ef, limit)}}, label_filter(label) if label else "",
            ["path", "label"])
        res = self._call("search", lambda c: milvus_rpc.read_hits(c.rpc("Search", request), len(queries)))
        out: list[list[Hit]] = []
        for q, hits in zip(queries, res):
            row: list[Hit] = []
            for id_, path, lab, score in hits:
                if id_ == q.exclude_id or (q.min_score is not None and score < q.min_score):
                    continue
                row.append(Hit(id_, path, lab, score))
                if len(row) == q.top_k:
                    break
            out.append(row)
        return out

    def get_many(self, ids: Sequence[int], with_embedding: bool = False) -> list[Entry | None]:
        """One Milvus call for many ids; None where an id is not in the collection."""
        if not ids:
            return []
        fields = ["id", "path", "label"] + (["embedding"] if with_embedding else [])
        request = milvus_rpc.query_request(self.collection, f"id in {sorted({int(i) for i in ids})}", fields)
        got, paths, labels, vectors = self._call("get", lambda c: milvus_rpc.read_rows(c.rpc("Query", request)))
        found = {id_: Entry(id_, paths[n], labels[n], vectors[n] if vectors is not None else None)
                 for n, id_ in enumerate(got)}
        return [found.get(int(i)) for i in ids]

    # --- the vector index -------------------------------------------------------------
    def index_state(self) -> dict[str, Any]:
        """Milvus' own account of the vector index (type, state, rows indexed / pending) and the
        last :meth:`build_index` recorded on the collection (Milvus Lite reports every row as
        indexed even while unsealed rows are still scanned brute force)."""
        d = self._call("describe_index", lambda c: c.describe_index(self.collection, "embedding"))
        if not d:
            raise StoreError(f"collection {self.collection!r} has no vector index (its creation was cut short); "
                             "opening it creates the index: run `imgsearch index` or `imgsearch collection stats` "
                             "on it")
        state = {k: d.get(k) for k in ("index_type", "metric_type", "state", "total_rows", "indexed_rows",
                                       "pending_index_rows")}
        state["params"] = {k: d[k] for k in ("M", "efConstruction", "nlist") if k in d}
        built = self.properties().get(PROP_BUILT)
        state["last_build"] = json.loads(built) if built else None
        return state

    def build_index(self, timeout_s: float = 3600.0, poll_s: float = 0.5) -> dict[str, Any]:
        """Seal what was written and wait until the vector index covers it; the state after.

        Rows still in a growing segment are searched brute force and, in Milvus Lite, per
        query: right after 20k 2048-d inserts a search costs ~40x what it costs once indexed.
        A Milvus server builds the index of sealed segments by itself (wait for it); Milvus
        Lite builds it when the collection loads (release, load).
        """
        # every call in here may wait as long as the build: Milvus Lite, still writing the index
        # its flush started, answered the count after the reload of 250k 2048-d rows in over 10 s
        with self._patient(timeout_s):
            t0 = time.perf_counter()
            self._call_again("flush", lambda c: c.flush(self.collection))
            if is_lite(self.uri):
                def reload(c) -> None:
                    c.release_collection(self.collection)
                    c.load_collection(self.collection)  # Lite builds the index here

                # The flush also starts Milvus Lite's background index build, which writes its index
                # file in place and outside the lock a load takes: a load meeting a half-written file
                # fails with a short read, and the next one reads it whole.
                self._call_again("load_collection", reload, attempts=5)
            else:
                deadline = time.monotonic() + timeout_s
                while True:
                    # a poll gets what is left of the build's time (a request's deadline at least)
                    with self._patient(max(deadline - time.monotonic(), self.timeout_s)):
                        st = self.index_state()
                    if not st["pending_index_rows"] and (st["indexed_rows"] or 0) >= (st["total_rows"] or 0):
                        break
                    if time.monotonic() > deadline:
                        raise StoreUnavailable(f"Milvus ({self.uri}) did not finish the index of {self.collection!r} "
                                               f"in {timeout_s:.0f}s: {st}")
                    time.sleep(poll_s)
            built = {"rows": self.count(), "seconds": round(time.perf_counter() - t0, 3)}
            # Shards of one run finish at once and each records its build; Milvus Lite's server
            # writes the collection's schema file through one fixed temporary name, so concurrent
            # property writes can collide. The record is informational: tried again, then only warned of.
            try:
                self._call_again("alter_collection_properties", lambda c: c.alter_collection_properties(
                    self.collection, properties={PROP_BUILT: json.dumps(built)}))
            except StoreError as e:
                log.warning("index of %s built, but its build record was not saved: %s", self.collection, e)
            return self.index_state()

    def _call_again(self, what: str, fn, attempts: int = 3):
        """``_call`` for a call that may be repeated: again while Milvus answers it with an error.

        A Milvus that did not answer in time is not waited for again. Milvus Lite's server, for
        one, freezes its in-memory segment outside its flush lock, so a flush racing one that
        another client's write triggered can fail ("current_seq is monotonic") after the data
        were written: the next flush succeeds.
        """
        for attempt in range(attempts):
            try:
                return self._call(what, fn)
            except StoreUnavailable as e:
                if attempt == attempts - 1 or not e.answered:
                    raise
                log.warning("%s on %s failed, trying again: %s", what, self.collection, e)
                time.sleep(0.2 * (attempt + 1))

    def count(self) -> int:
        res = self._call("count", lambda c: c.query(self.collection, filter="", output_fields=["count(*)"]))
        return int(res[0]["count(*)"]) if res else 0

    def iter_entries(self, batch_size: int = 1000) -> Iterator[Entry]:
        it = self._call("query_iterator", lambda c: c.query_iterator(
            self.collection, batch_size=batch_size, output_fields=["id", "path", "label"]))
        try:
            while True:
                batch = self._call("query_iterator.next", lambda _c: it.next())
                if not batch:
                    break
                for r in batch:
                    yield Entry(int(r["id"]), r["path"], r["label"])
        finally:
            try:
                it.close()
            except Exception:  # noqa: BLE001
                pass

    def stats(self) -> dict[str, Any]:
        props = self.properties()
        labels: dict[str, int] = {}
        for e in self.iter_entries():
            labels[e.label] = labels.get(e.label, 0) + 1
        return {
            "uri": self.uri, "collection": self.collection, "count": sum(labels.values()),
            "dim": int(props.get(PROP_DIM, 0) or 0), "model_sha": props.get(PROP_SHA),
            "model": props.get(PROP_MODEL), "index": self.index_state(),
            "labels": dict(sorted(labels.items(), key=lambda kv: -kv[1])),
        }
