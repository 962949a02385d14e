"""In-process stand-ins for Triton and Milvus: the gateway's routes tested without servers.

:class:`FakeEncoder` has :class:`imgsearch.triton_client.TritonEncoder`'s interface and
:class:`FakeStore` :class:`imgsearch.store.VectorStore`'s, down to the exceptions they raise
(:mod:`imgsearch.errors`), so the gateway's error mapping runs as it does over the real ones.
Their answers are exact and deterministic: the encoder is a fixed random projection of an
image's coarse colour layout, the store a brute-force cosine over the rows it holds, so a
test derives what a route must return from the data it put in.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence

import numpy as np

from imgsearch.errors import (
    CollectionMismatch,
    EntryRefused,
    NotFound,
    StoreUnavailable,
    TritonInvalidInput,
    TritonUnavailable,
)
from imgsearch.imaging import decode_image
from imgsearch.store import Entry, Hit, Row, SearchQuery, VectorStore, check_rows
from imgsearch.triton_client import Encoded

GRID = 7  # an image's features: mean RGB of each cell of a GRID x GRID grid


def store_with(client, uri: str = "http://127.0.0.1:1") -> VectorStore:
    """The real store over a stand-in for pymilvus' client (its boundary: deadlines, errors,
    what it asks Milvus); requests get a 2 s deadline."""
    store = VectorStore(uri, "images", timeout_s=2.0)
    store._client = client
    return store


def unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


class FakeEncoder:
    """TritonEncoder's methods over a seeded projection; ``labels`` adds a classifier head (probs).

    ``ready`` is what :meth:`is_ready` answers (``ready_calls`` counts the questions);
    ``error``, when set, is raised by every encode, as Triton's failures are by the real one.
    ``encoded`` keeps each answer, so a test reads the embedding a request was given.
    """

    def __init__(self, dim: int, labels: Sequence[str] = (), *, seed: int = 0, input_size: int = 224,
                 model_name: str = "resnet152", ensemble_name: str = "image_search", ensemble: bool = False) -> None:
        rng = np.random.default_rng(seed)
        self.dim = dim
        self.labels = list(labels)
        self.input_size = input_size
        self.url = "fake-triton:0"
        self.model_name = model_name
        self.ensemble_name = ensemble_name
        self.ensemble = ensemble
        self.ready = True
        self.ready_calls = 0
        self.error: Exception | None = None
        self.encoded: list[Encoded] = []
        self.closed = False
        self._proj = rng.standard_normal((GRID * GRID * 3, dim)).astype(np.float32)
        self._head = rng.standard_normal((GRID * GRID * 3, len(self.labels))).astype(np.float32) if labels else None

    def embed(self, pixels: np.ndarray) -> Encoded:
        """The answer for uint8 [N, H, W, 3] pixels, without recording it."""
        n, h, w, _ = pixels.shape
        ch, cw = h // GRID, w // GRID
        cells = pixels[:, :ch * GRID, :cw * GRID].astype(np.float32).reshape(n, GRID, ch, GRID, cw, 3)
        feats = cells.mean(axis=(2, 4)).reshape(n, -1) / 255.0 - 0.5
        probs = None
        if self._head is not None:
            logits = 4.0 * feats @ self._head
            e = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
        return Encoded(unit(feats @ self._proj), probs)

    async def close(self) -> None:
        self.closed = True

    async def is_ready(self) -> bool:
        self.ready_calls += 1
        return self.ready

    async def has_probs(self) -> bool:
        return self._head is not None

    async def has_ensemble(self) -> bool:
        return self.ready and self.ensemble

    async def bytes_path_problem(self, max_pixels: int) -> str | None:
        return None if await self.has_ensemble() else f"Triton has no ready ensemble {self.ensemble_name!r}"

    def _answer(self, pixels: np.ndarray) -> Encoded:
        if self.error is not None:
            raise self.error
        if not self.ready:
            raise TritonUnavailable(f"model {self.model_name!r} is not ready at {self.url}")
        out = self.embed(pixels)
        self.encoded.append(out)
        return out

    async def encode(self, pixels: np.ndarray, timeout_s: float | None = None) -> Encoded:
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise TritonInvalidInput(f"expected uint8 [N,H,W,3], got {pixels.dtype} {list(pixels.shape)}")
        return self._answer(pixels)

    async def encode_bytes(self, blobs: Sequence[bytes], timeout_s: float | None = None) -> Encoded:
        if not blobs:
            raise TritonInvalidInput("encode_bytes needs at least one file")
        if not self.ensemble:
            raise TritonUnavailable(f"no ensemble {self.ensemble_name!r} at {self.url}")
        # the ensemble decodes as decode_image does, typed errors included
        return self._answer(np.stack([decode_image(b, self.input_size) for b in blobs]))


class FakeStore:
    """VectorStore's methods over rows in memory: exact cosine, ties in insertion order.

    ``down = True`` makes every call raise :class:`StoreUnavailable`, as a Milvus that went
    away does, and ``failing`` the calls it names (``"upsert"``: Milvus fails mid-write);
    ``loaded`` is what :meth:`is_ready` answers once the collection is open. ``calls`` counts
    the calls by those names.
    """

    def __init__(self, collection: str = "images", uri: str = "fake-milvus.db") -> None:
        self.collection = collection
        self.uri = uri
        self.rows: dict[int, Row] = {}
        self.dim: int | None = None
        self.model_sha: str | None = None
        self.loaded = False
        self.down = False
        self.failing: set[str] = set()
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _call(self, what: str) -> None:
        self.calls[what] += 1
        if self.down or what in self.failing:
            self.loaded = False
            raise StoreUnavailable(f"Milvus ({self.uri}) failed during {what}: connection refused")

    # --- collection lifecycle -------------------------------------------------------
    def close(self) -> None:
        self.calls["close"] += 1

    def exists(self) -> bool:
        with self._lock:
            self._call("has_collection")
            return self.dim is not None

    def open(self, dim: int, model_sha: str, model: str = "", *, recreate: bool = False) -> None:
        with self._lock:
            self._call("open")
            if recreate:
                self.rows.clear()
                self.dim = None
            if self.dim is None:
                self.dim, self.model_sha = dim, model_sha
            elif (self.dim, self.model_sha) != (dim, model_sha):
                raise CollectionMismatch(
                    f"collection {self.collection!r} holds embeddings of another model "
                    f"(dim {self.dim}, model sha {self.model_sha}); this model is dim {dim}, sha {model_sha}.")
            self.loaded = True

    def is_ready(self) -> bool:
        with self._lock:
            self._call("get_load_state")
            return self.dim is not None and self.loaded

    def count(self) -> int:
        with self._lock:
            self._call("count")
            return len(self.rows)

    # --- data -----------------------------------------------------------------------
    def upsert(self, rows: Sequence[Row], bulk: bool = False) -> int:
        if not rows:
            return 0
        check_rows(rows)
        with self._lock:
            self._call("upsert")
            for r in rows:
                if np.shape(r.embedding) != (self.dim,):
                    raise EntryRefused(f"Milvus refused the entry: embedding of shape {np.shape(r.embedding)}, "
                                       f"the collection holds {self.dim}-d vectors")
            for r in rows:
                self.rows[int(r.id)] = Row(int(r.id), r.path, r.label, np.asarray(r.embedding, np.float32).copy())
            return len(rows)

    def existing(self, ids: Sequence[int]) -> dict[int, str]:
        if not ids:
            return {}
        with self._lock:
            self._call("query")
            return {int(i): self.rows[int(i)].path for i in ids if int(i) in self.rows}

    def get(self, id_: int, with_embedding: bool = False) -> Entry:
        entry = self.get_many([id_], with_embedding)[0]
        if entry is None:
            raise NotFound(f"no image with id {id_}")
        return entry

    def get_many(self, ids: Sequence[int], with_embedding: bool = False) -> list[Entry | None]:
        with self._lock:
            self._call("get")
            out: list[Entry | None] = []
            for i in ids:
                r = self.rows.get(int(i))
                out.append(None if r is None else
                           Entry(r.id, r.path, r.label, r.embedding.copy() if with_embedding else None))
            return out

    def delete(self, ids: Sequence[int]) -> int:
        if not ids:
            return 0
        with self._lock:
            self._call("delete")
            return sum(self.rows.pop(int(i), None) is not None for i in ids)

    def search(self, vectors: np.ndarray, top_k: int = 10, min_score: float | None = None,
               label: str | None = None, exclude_id: int | None = None) -> list[list[Hit]]:
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        return self.search_many([SearchQuery(v, top_k, min_score, exclude_id) for v in vectors], label)

    def search_many(self, queries: Sequence[SearchQuery], label: str | None = None) -> list[list[Hit]]:
        if not queries:
            return []
        with self._lock:
            self._call("search")
            rows = [r for r in self.rows.values() if label is None or r.label == label]
        if not rows:
            return [[] for _ in queries]
        matrix = unit(np.stack([r.embedding for r in rows]))
        out: list[list[Hit]] = []
        for q in queries:
            scores = matrix @ unit(q.vector)
            hits: list[Hit] = []
            for i in np.argsort(-scores, kind="stable"):
                r, score = rows[i], float(scores[i])
                if r.id == q.exclude_id or (q.min_score is not None and score < q.min_score):
                    continue
                hits.append(Hit(r.id, r.path, r.label, score))
                if len(hits) == q.top_k:
                    break
            out.append(hits)
        return out
