"""Synthetic embedding collections for the search benchmarks: fill, index, measure recall.

The vectors imitate pooled CNN features rather than white noise: non-negative (after a
ReLU), clustered around a few hundred "classes", unit length. Uniform random vectors in
2048-d are all nearly orthogonal, which is the worst case for an ANN graph and not what
an image index holds; clusters give neighbours that mean something and a recall that
depends on the index settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from harness.drive import drive_threads
from imgsearch.model_card import CARD_FILE, ModelCard, model_dir
from imgsearch.store import Row, SearchQuery, VectorStore, is_lite

SHA = "synthetic-vectors"


def clustered_vectors(n: int, dim: int, seed: int = 0, clusters: int = 200, spread: float = 0.6) -> np.ndarray:
    """``n`` unit vectors of ``dim``, non-negative, around ``clusters`` centres (float32)."""
    rng = np.random.default_rng(seed)
    centres = np.abs(rng.standard_normal((clusters, dim))).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for i in range(0, n, 8192):  # chunks: a 250k x 2048 float64 temporary would be 4 GB
        m = min(8192, n - i)
        pick = rng.integers(0, clusters, m)
        x = centres[pick] + spread * rng.standard_normal((m, dim)).astype(np.float32)
        np.maximum(x, 0, out=x)
        out[i:i + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def vectors_card_repo(dest: Path, model: str, dim: int) -> Path:
    """A model repository holding only a model card of ``dim``: enough for the gateway to open a
    synthetic collection and serve ``similar`` (which never calls the model)."""
    card = ModelCard(name=model, arch="synthetic", embedding="pool", embedding_dim=dim, num_classes=0,
                     weights="random:0", checkpoint_sha256="", model_sha=f"{SHA}-{dim}")
    d = model_dir(dest, model)
    d.mkdir(parents=True, exist_ok=True)
    (d / CARD_FILE).write_text(card.to_json())
    return dest


def fill(store: VectorStore, vectors: np.ndarray, model_sha: str, first_id: int = 1, batch: int = 1000,
         progress: bool = True) -> list[int]:
    """Create the collection (recreated) and upsert ``vectors`` with ids from ``first_id``; the ids."""
    from tqdm import tqdm

    n, dim = vectors.shape
    store.open(dim, model_sha, "synthetic", recreate=True, patient=True)
    ids = list(range(first_id, first_id + n))
    with tqdm(total=n, unit="vec", desc=f"insert {n}x{dim}", disable=not progress) as bar:
        for i in range(0, n, batch):
            store.upsert([Row(ids[j], f"synthetic/{ids[j]}.jpg", f"c{ids[j] % 7}", vectors[j])
                          for j in range(i, min(n, i + batch))], bulk=True)
            bar.update(min(batch, n - i))
    return ids


def time_searches(store: VectorStore, queries: np.ndarray, top_k: int = 10) -> list[float]:
    """Seconds per single-vector search, one after another."""
    load = drive_threads(lambda i: store.search_many([SearchQuery(queries[i], top_k)]), concurrency=1,
                         requests=len(queries), raise_errors=True, keep_results=False)
    return load.latencies_s


def exact_top_k(vectors: np.ndarray, ids: Sequence[int], queries: np.ndarray, k: int = 10) -> list[list[int]]:
    """Exact cosine top-k (what a FLAT index returns): the vectors are unit length, so dot products."""
    ids_arr = np.asarray(ids)
    out = []
    for i in range(0, len(queries), 64):
        scores = queries[i:i + 64] @ vectors.T
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.take_along_axis(scores, top, 1).argsort(axis=1)[:, ::-1]
        out += [list(ids_arr[np.take_along_axis(top, order, 1)[r]]) for r in range(len(top))]
    return out


def recall_at_k(store: VectorStore, vectors: np.ndarray, ids: Sequence[int], queries: np.ndarray,
                k: int = 10) -> float:
    """Mean share of the exact top-k that the store's search returns in its top-k."""
    truth = exact_top_k(vectors, ids, queries, k)
    got = []
    for i in range(0, len(queries), 64):
        got += store.search_many([SearchQuery(q, k) for q in queries[i:i + 64]])
    return float(np.mean([len({h.id for h in g} & set(t)) / k for g, t in zip(got, truth)]))


def release(store: VectorStore) -> None:
    store.close()
    if is_lite(store.uri):
        from harness.stack import release_lite

        release_lite(store.uri)
