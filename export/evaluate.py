"""Retrieval quality of the served model, measured through Triton.

Images are decoded with the gateway's decoder and encoded by the served model (the
shared :class:`imgsearch.triton_client.TritonEncoder`), so the figures are what users
get, not what PyTorch says. Everything after encoding is numpy on unit-norm vectors
(cosine = dot product). The gallery is every labelled image that is not a query.

Metrics (a hit = a gallery image with the query's label):

* ``recall@k``: share of queries with at least one hit among the top k;
* ``mAP@k``: mean over queries of AP@k = sum_{i<=k} P(i)*rel(i) / min(k, R), where R is
  the number of hits in the whole gallery (so a perfect ranking scores 1 even when R < k);
* breed top-1 accuracy from ``probs`` (argmax mapped through ``labels.txt``) and from a
  score-weighted vote of the top-k neighbours' labels;
* near-duplicate recall: edited copies (crop, flip, colour, JPEG re-compress, all four)
  of some gallery images must find their original at rank 1.

Queries without any hit in the gallery (a class only in ``--queries DIR``) are left out
of recall and mAP and counted in ``queries_without_gallery_match``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgsearch.errors import ImageError
from imgsearch.imaging import decode_image, jpeg_bytes
from imgsearch.triton_client import TritonEncoder, with_backoff

from .data import LabelledImages, scan_folder, split_per_class

log = logging.getLogger(__name__)

KS = (1, 5, 10)
MAP_K = 10
KNN_K = 10
NEAR_DUP_KINDS = ("crop", "flip", "colour", "jpeg", "all")


# --- metrics (pure numpy) -------------------------------------------------------------


def top_k(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and cosine scores of the k nearest gallery rows, best first (stable on ties)."""
    q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    g = gallery / np.maximum(np.linalg.norm(gallery, axis=1, keepdims=True), 1e-12)
    sims = q @ g.T
    k = min(k, g.shape[0])
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(sims, idx, axis=1)


def average_precision_at_k(relevant: np.ndarray, n_relevant: int, k: int) -> float:
    """AP@k of one ranked list: ``relevant`` is the bool hit vector of the top ranks."""
    rel = np.asarray(relevant[:k], dtype=bool)
    if n_relevant == 0:
        return 0.0
    precision = np.cumsum(rel) / np.arange(1, len(rel) + 1)
    return float((precision * rel).sum() / min(k, n_relevant))


def knn_vote(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Score-weighted label vote per row; a tie goes to the label ranked higher."""
    out = np.empty(labels.shape[0], dtype=labels.dtype)
    for r in range(labels.shape[0]):
        totals: dict = {}
        for lab, s in zip(labels[r], scores[r]):
            totals[lab] = totals.get(lab, 0.0) + max(float(s), 0.0)
        best = max(totals.values())
        # dicts keep insertion order = rank order, so the first label reaching best wins ties
        out[r] = next(lab for lab, t in totals.items() if t == best)
    return out


@dataclass
class RetrievalResult:
    metrics: dict[str, float]
    per_class_recall1: dict[str, float]
    per_class_queries: dict[str, int]
    neighbours: np.ndarray  # [Nq, k] gallery indices
    scores: np.ndarray  # [Nq, k]
    scored: np.ndarray  # [Nq] bool: the query has a match in the gallery
    knn_pred: np.ndarray  # [Nq] label predicted by the vote


def retrieval_metrics(q_emb: np.ndarray, q_lab: Sequence, g_emb: np.ndarray, g_lab: Sequence,
                      ks: Sequence[int] = KS, map_k: int = MAP_K, knn_k: int = KNN_K) -> RetrievalResult:
    """recall@k, mAP@k and the kNN vote for labelled queries against a labelled gallery."""
    q_lab = np.asarray(q_lab)
    g_lab = np.asarray(g_lab)
    kmax = max(*ks, map_k, knn_k)
    idx, scores = top_k(q_emb, g_emb, kmax)
    hits = g_lab[idx] == q_lab[:, None]
    n_rel = (g_lab[None, :] == q_lab[:, None]).sum(1)
    scored = n_rel > 0
    m: dict[str, float] = {}
    denom = max(int(scored.sum()), 1)
    for k in ks:
        m[f"recall@{k}"] = float(hits[:, :k].any(1)[scored].sum() / denom)
    aps = [average_precision_at_k(hits[i], int(n_rel[i]), map_k) for i in np.flatnonzero(scored)]
    m[f"mAP@{map_k}"] = float(np.mean(aps)) if aps else 0.0
    knn = knn_vote(g_lab[idx[:, :knn_k]], scores[:, :knn_k])
    m[f"knn@{knn_k}_top1"] = float((knn == q_lab).mean()) if len(q_lab) else 0.0
    per_class: dict[str, float] = {}
    per_count: dict[str, int] = {}
    for lab in sorted(set(q_lab[scored].tolist())):
        sel = scored & (q_lab == lab)
        per_class[str(lab)] = float(hits[sel, 0].mean())
        per_count[str(lab)] = int(sel.sum())
    m["queries_scored"] = int(scored.sum())
    m["queries_without_gallery_match"] = int((~scored).sum())
    return RetrievalResult(m, per_class, per_count, idx, scores, scored, knn)


def probs_accuracy(probs: np.ndarray | None, q_names: Sequence[str], labels: Sequence[str]) -> tuple[float | None, int]:
    """Top-1 accuracy of argmax(probs) mapped through labels.txt, over queries whose class it knows."""
    if probs is None or not len(labels) or probs.shape[1] != len(labels):
        return None, 0
    names = np.asarray(labels)[probs.argmax(1)]
    known = np.isin(np.asarray(q_names), np.asarray(labels))
    if not known.any():
        return None, 0
    return float((names[known] == np.asarray(q_names)[known]).mean()), int(known.sum())


# --- near duplicates ------------------------------------------------------------------


def near_duplicate_variants(data: bytes, seed: int, size: int = 320) -> dict[str, bytes]:
    """Edited copies of one image as JPEG bytes: crop, flip, colour, jpeg (q=30), all four."""
    from PIL import Image, ImageEnhance

    rng = random.Random(seed)
    # decoded with the serving decoder (a bit larger than 224, so a crop keeps detail)
    im = Image.fromarray(decode_image(data, size=size))

    def crop(x: Image.Image) -> Image.Image:
        side = int(size * rng.uniform(0.75, 0.85))
        left, top = rng.randint(0, size - side), rng.randint(0, size - side)
        return x.crop((left, top, left + side, top + side))

    def colour(x: Image.Image) -> Image.Image:
        x = ImageEnhance.Brightness(x).enhance(rng.choice([rng.uniform(0.75, 0.9), rng.uniform(1.1, 1.25)]))
        x = ImageEnhance.Contrast(x).enhance(rng.uniform(0.75, 1.25))
        return ImageEnhance.Color(x).enhance(rng.uniform(0.7, 1.3))

    def flip(x: Image.Image) -> Image.Image:
        return x.transpose(Image.Transpose.FLIP_LEFT_RIGHT)

    return {
        "crop": jpeg_bytes(crop(im), 95),
        "flip": jpeg_bytes(flip(im), 95),
        "colour": jpeg_bytes(colour(im), 95),
        "jpeg": jpeg_bytes(im, 30),
        "all": jpeg_bytes(colour(flip(crop(im))), 50),
    }


# --- encoding through Triton -----------------------------------------------------------


async def encode_blobs(encoder: TritonEncoder, load: Callable[[int], bytes], n: int, batch_size: int = 32,
                       retries: int = 5, name: Callable[[int], str] = str) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode ``load(i)`` for i < n with the serving decoder and encode through Triton.

    An undecodable image stops the evaluation with its ``name(i)``: skipping it would
    silently change the figures.
    """
    loop = asyncio.get_running_loop()
    embs: list[np.ndarray] = []
    probs: list[np.ndarray] = []

    def decode_one(i: int) -> np.ndarray:
        try:
            return decode_image(load(i))
        except ImageError as e:
            raise type(e)(f"{name(i)}: {e}") from None

    def decode_batch(lo: int, hi: int) -> np.ndarray:
        return np.stack([decode_one(i) for i in range(lo, hi)])

    starts = list(range(0, n, batch_size))
    pending = loop.run_in_executor(None, decode_batch, 0, min(batch_size, n)) if n else None
    for j, lo in enumerate(starts):
        pixels = await pending
        if j + 1 < len(starts):  # decode the next batch while Triton encodes this one
            nlo = starts[j + 1]
            pending = loop.run_in_executor(None, decode_batch, nlo, min(nlo + batch_size, n))
        enc = await with_backoff(lambda: encoder.encode(pixels), retries)
        embs.append(enc.embeddings)
        if enc.probs is not None:
            probs.append(enc.probs)
    if not embs:
        return np.zeros((0, 0), np.float32), None
    return np.concatenate(embs), (np.concatenate(probs) if probs else None)


# --- the evaluation --------------------------------------------------------------------


@dataclass
class EvalSet:
    gallery: LabelledImages
    queries: LabelledImages
    spec: dict


def build_eval_set(data_dir: str | Path, queries: str = "split", fraction: float = 0.2, seed: int = 0) -> EvalSet:
    """Gallery + queries: a per-class split of ``data_dir``, or all of it against a query folder."""
    data = scan_folder(data_dir)
    if queries == "split":
        kept, held = split_per_class(data, fraction, seed)
        if not held:
            raise ValueError(f"the {fraction:.0%} split of {data_dir} gives no queries (classes need 2+ images)")
        return EvalSet(data.subset(kept), data.subset(held),
                       {"query_source": "split", "fraction": fraction, "seed": seed})
    return EvalSet(data, scan_folder(queries), {"query_source": str(queries)})


def evaluate_served(url: str, model_name: str, evalset: EvalSet, labels: Sequence[str] = (),
                    model_info: dict | None = None, protocol: str = "grpc", near_dup: int = 50,
                    batch_size: int = 32, seed: int = 0, examples: int = 4) -> dict:
    """Encode gallery, queries and near-duplicates with the model Triton serves at ``url``.

    ``labels`` (labels.txt) maps the ``probs`` index to a class name. Returns the report dict.
    """
    g, q = evalset.gallery, evalset.queries
    t0 = time.monotonic()
    dup_src = sorted(random.Random(seed).sample(range(len(g)), min(near_dup, len(g))))
    variants = [near_duplicate_variants(g.paths[i].read_bytes(), seed * 100_003 + i) for i in dup_src]
    dup_blobs = [(j, kind, v[kind]) for j, v in enumerate(variants) for kind in NEAR_DUP_KINDS]

    async def run() -> tuple:
        encoder = TritonEncoder(url, model_name, protocol)
        try:
            ge, _ = await encode_blobs(encoder, lambda i: g.paths[i].read_bytes(), len(g), batch_size,
                                       name=lambda i: str(g.paths[i]))
            qe, qp = await encode_blobs(encoder, lambda i: q.paths[i].read_bytes(), len(q), batch_size,
                                        name=lambda i: str(q.paths[i]))
            de, _ = await encode_blobs(encoder, lambda i: dup_blobs[i][2], len(dup_blobs), batch_size)
            return ge, qe, qp, de
        finally:
            await encoder.close()

    ge, qe, qp, de = asyncio.run(run())
    t_enc = time.monotonic() - t0
    g_names, q_names = g.label_names(), q.label_names()
    res = retrieval_metrics(qe, q_names, ge, g_names)
    p_acc, p_n = probs_accuracy(qp, q_names, labels)

    dup: dict = {"originals": len(dup_src), "by_kind": {}}
    if dup_blobs:
        idx, _ = top_k(de, ge, 1)
        want = np.array([dup_src[j] for j, _, _ in dup_blobs])
        ok = idx[:, 0] == want
        kinds = np.array([k for _, k, _ in dup_blobs])
        dup["by_kind"] = {k: float(ok[kinds == k].mean()) for k in NEAR_DUP_KINDS}
        dup["recall@1"] = float(ok.mean())
    else:
        dup["recall@1"] = None

    ex = []
    for qi in random.Random(seed + 1).sample(range(len(q)), min(examples, len(q))):
        ex.append({"query": str(q.paths[qi]), "label": q_names[qi],
                   "results": [{"path": str(g.paths[gi]), "label": g_names[gi], "score": round(float(s), 4)}
                               for gi, s in zip(res.neighbours[qi, :5], res.scores[qi, :5])]})
    m = res.metrics
    return {
        "model": model_info or {},
        "data": {"root": str(g.root), "classes": len(set(g_names) | set(q_names)), "gallery": len(g),
                 "queries": len(q), **evalset.spec},
        "retrieval": {k: m[k] for k in (*[f"recall@{k}" for k in KS], f"mAP@{MAP_K}",
                                         "queries_scored", "queries_without_gallery_match")},
        "breed": {"probs_top1": p_acc, "probs_queries": p_n, f"knn@{KNN_K}_top1": m[f"knn@{KNN_K}_top1"],
                  "knn_k": KNN_K},
        "near_duplicate": dup,
        "per_class": {c: {"queries": res.per_class_queries[c], "recall@1": r} for c, r in res.per_class_recall1.items()},
        "examples": ex,
        "timings_s": {"encode": round(t_enc, 2), "images_encoded": len(g) + len(q) + len(dup_blobs)},
    }


def summary_row(report: dict) -> dict:
    r, b, d = report["retrieval"], report["breed"], report["near_duplicate"]
    mdl = report.get("model", {})
    return {"embedding": mdl.get("embedding", "?"), "dim": mdl.get("embedding_dim"),
            "recall@1": r["recall@1"], "recall@5": r["recall@5"], "recall@10": r["recall@10"],
            f"mAP@{MAP_K}": r[f"mAP@{MAP_K}"], "probs_top1": b["probs_top1"],
            f"knn@{KNN_K}_top1": b[f"knn@{KNN_K}_top1"], "near_dup@1": d.get("recall@1")}


TIE = 0.01  # differences below this are noise on evaluation sets of a few hundred queries


def recommend(rows: Sequence[dict], tie: float = TIE) -> dict:
    """The embedding to serve, by measurement.

    Highest mAP@10; rows within ``tie`` of the best count as equal and go on to recall@1,
    then near-duplicate recall. A full tie keeps the earliest row (pool comes first: it
    does not depend on the training classes).
    """
    left = list(rows)
    for key in (f"mAP@{MAP_K}", "recall@1", "near_dup@1"):
        best = max(r[key] or 0.0 for r in left)
        left = [r for r in left if (r[key] or 0.0) >= best - tie]
    return left[0]


def format_table(rows: Sequence[dict]) -> str:
    cols = list(rows[0]) if rows else []
    def fmt(v) -> str:
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
    widths = [max(len(c), *(len(fmt(r[c])) for r in rows)) for c in cols]
    lines = [" | ".join(c.ljust(w) for c, w in zip(cols, widths)),
             "-|-".join("-" * w for w in widths)]
    lines += [" | ".join(fmt(r[c]).ljust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(lines)


def plot_report(report: dict, png: Path, thumb: int = 96) -> Path:
    """Per-class recall@1 bars on top, query -> top-5 strips below (green = same label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = report["per_class"]
    ex = report["examples"]
    names = list(per)
    rows = 1 + len(ex)
    fig = plt.figure(figsize=(max(8, 0.35 * len(names) + 2), 3 + 1.6 * len(ex)))
    gs = fig.add_gridspec(rows, 6, height_ratios=[2.2] + [1] * len(ex), hspace=0.45)
    ax = fig.add_subplot(gs[0, :])
    ax.bar(range(len(names)), [per[n]["recall@1"] for n in names], color="#4C72B0")
    ax.set_xticks(range(len(names)), names, rotation=90 if len(names) > 12 else 0, fontsize=7)
    ax.set_ylim(0, 1.05)
    mdl = report.get("model", {})
    ax.set_title(f"per-class recall@1 — {mdl.get('name', '')} {mdl.get('embedding', '')} "
                 f"(overall {report['retrieval']['recall@1']:.3f})", fontsize=10)
    for r, e in enumerate(ex, start=1):
        cells = [(e["query"], e["label"], None)] + [(x["path"], x["label"], x["score"]) for x in e["results"]]
        for c, (path, label, score) in enumerate(cells[:6]):
            a = fig.add_subplot(gs[r, c])
            try:
                a.imshow(decode_image(Path(path).read_bytes(), size=thumb))
            except Exception:  # noqa: BLE001 - a missing thumbnail must not lose the report
                a.text(0.5, 0.5, "?", ha="center")
            a.set_xticks([])
            a.set_yticks([])
            if score is None:
                a.set_title(f"query: {label}", fontsize=7)
            else:
                colour = "#2ca02c" if label == e["label"] else "#d62728"
                for s in a.spines.values():
                    s.set_edgecolor(colour)
                    s.set_linewidth(3)
                a.set_title(f"{label} {score:.2f}", fontsize=7, color=colour)
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return png
