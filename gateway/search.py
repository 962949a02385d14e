"""The search pipeline: decode (thread pool) -> Triton -> Milvus top-k -> breed guess.

Each stage is timed for the response (``timings_ms``) and for Prometheus
(``imgsearch_stage_duration_seconds``). The search stage includes the time a query
waits for its batch (``IMGSEARCH_SEARCH_BATCH_MS``, :mod:`imgsearch.gateway.batching`). In bytes mode (IMGSEARCH_TRITON_INPUT=bytes and
the ``image_search`` ensemble in Triton) there is no decode here: the file goes to Triton
as it came, ``decode`` is 0 and ``infer`` includes Triton's decoding.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import numpy as np

from imgsearch.errors import ModelRepositoryError
from imgsearch.imaging import check_format, decode_image
from imgsearch.store import Hit, SearchQuery
from imgsearch.triton_client import Encoded

from .state import Runtime


def hit_json(h: Hit) -> dict[str, Any]:
    return {"id": str(h.id), "label": h.label, "score": round(float(h.score), 6), "path": h.path,
            "url": f"/v1/images/{h.id}", "thumb_url": f"/v1/images/{h.id}/thumb"}


def breed_guess(hits: list[Hit], probs: np.ndarray | None, labels: list[str]) -> dict[str, Any] | None:
    """The model's own answer when it has a classifier head; else a score-weighted vote of the neighbours.

    The vote is what the original project did: each of the top-k neighbours votes for its
    label with its similarity (negative similarities do not vote); confidence is the
    winner's share of the votes.
    """
    if probs is not None and labels and len(probs) == len(labels):
        i = int(np.argmax(probs))
        return {"label": labels[i], "confidence": float(np.clip(probs[i], 0.0, 1.0)), "source": "probs"}
    votes: dict[str, float] = defaultdict(float)
    for h in hits:
        if h.score > 0:
            votes[h.label] += float(h.score)
    total = sum(votes.values())
    if not votes or total <= 0:
        return None
    label, weight = max(votes.items(), key=lambda kv: kv[1])
    return {"label": label, "confidence": float(min(1.0, weight / total)), "source": "knn"}


async def encode_upload(rt: Runtime, data: bytes) -> tuple[Encoded, float, float]:
    """Decode + embed one image; returns (encoded, decode seconds, infer seconds).

    Bytes mode: only the format is checked here (a quick 415 / 422 without a Triton round
    trip); Triton's ``preprocess`` decodes and raises the same typed errors as decode_image.
    The decode time is then 0 and no decode stage is observed.
    """
    t0 = time.perf_counter()
    if await rt.decide_input():
        check_format(data)
        t1 = t0  # no decode here: the format check (microseconds) counts as infer
        encoded = await rt.encoder.encode_bytes([data])
    else:
        pixels = await rt.in_decode_pool(decode_image, data, rt.settings.image_size, rt.settings.max_pixels,
                                         rt.decode_budget)
        t1 = time.perf_counter()
        rt.metrics.observe_stage("decode", t1 - t0)
        encoded = await rt.encoder.encode(pixels[None])
    if encoded.embeddings.shape[1] != rt.card.embedding_dim:
        # another model behind that URL (another repository, another Triton on the port)
        raise ModelRepositoryError(
            f"Triton at {rt.encoder.url} returns {encoded.embeddings.shape[1]}-d embeddings for "
            f"{rt.encoder.model_name!r}, the model card says {rt.card.embedding_dim}: the gateway and Triton "
            "do not use the same model repository")
    t2 = time.perf_counter()
    rt.metrics.observe_stage("infer", t2 - t1)
    return encoded, t1 - t0, t2 - t1


async def search_vector(rt: Runtime, vector: np.ndarray, top_k: int, min_score: float | None,
                        label: str | None, exclude_id: int | None = None) -> tuple[list[Hit], float]:
    t0 = time.perf_counter()
    hits = await rt.search(SearchQuery(vector, top_k, min_score, exclude_id), label or None)
    dt = time.perf_counter() - t0
    rt.metrics.observe_stage("search", dt)
    return hits, dt


def response(rt: Runtime, hits: list[Hit], probs: np.ndarray | None, decode_s: float, infer_s: float,
             search_s: float, start: float) -> dict[str, Any]:
    ms = lambda s: round(s * 1000.0, 3)  # noqa: E731
    return {
        "results": [hit_json(h) for h in hits],
        "breed_guess": breed_guess(hits, probs, rt.labels),
        "timings_ms": {"decode": ms(decode_s), "infer": ms(infer_s), "search": ms(search_s),
                       "total": ms(time.perf_counter() - start)},
        "model": rt.model_info,
    }


async def search_image(rt: Runtime, data: bytes, top_k: int, min_score: float | None,
                       label: str | None) -> dict[str, Any]:
    start = time.perf_counter()
    encoded, decode_s, infer_s = await encode_upload(rt, data)
    hits, search_s = await search_vector(rt, encoded.embeddings[0], top_k, min_score, label)
    probs = encoded.probs[0] if encoded.probs is not None else None
    return response(rt, hits, probs, decode_s, infer_s, search_s, start)


async def similar_to(rt: Runtime, id_: int, top_k: int, min_score: float | None,
                     label: str | None) -> dict[str, Any]:
    start = time.perf_counter()
    entry = await rt.lookup(id_, with_embedding=True)
    hits, search_s = await search_vector(rt, entry.embedding, top_k, min_score, label, exclude_id=id_)
    return response(rt, hits, None, 0.0, 0.0, search_s, start)
