"""Retrieval metrics on hand-made embeddings whose rankings are fixed by construction.

Gallery item j is the basis vector e_j; a query is sum_j w_j e_j with distinct weights
decreasing along a chosen permutation, so the ranking is exactly that permutation and the
expected recall / AP follow from where the relevant items were placed.
"""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from harness.data import jpeg_bytes, make_dataset, shape_image
from imgsearch.errors import CorruptImage
from imgsearch.export.data import class_name, scan_folder, split_per_class
from imgsearch.export.evaluate import (
    NEAR_DUP_KINDS,
    average_precision_at_k,
    build_eval_set,
    encode_blobs,
    format_table,
    knn_vote,
    near_duplicate_variants,
    probs_accuracy,
    recommend,
    retrieval_metrics,
    top_k,
)
from imgsearch.imaging import decode_image
from imgsearch.triton_client import Encoded


def query_for_ranking(order: list[int], n: int) -> np.ndarray:
    """A query whose cosine ranking over the basis gallery is ``order`` (best first)."""
    q = np.zeros(n)
    q[order] = np.linspace(1.0, 0.1, len(order))
    return q / np.linalg.norm(q)


def ranked_case(rng: np.random.Generator, n: int, relevant_ranks: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(query, gallery labels) such that the query's label sits exactly at ``relevant_ranks`` (1-based)."""
    order = rng.permutation(n)
    labels = np.array(["other"] * n, dtype=object)
    for r in relevant_ranks:
        labels[order[r - 1]] = "target"
    return query_for_ranking(list(order), n), labels


def expected_ap(ranks: list[int], k: int) -> float:
    """AP@k written from the positions: the m-th relevant item at rank p contributes m/p."""
    inside = sorted(r for r in ranks if r <= k)
    return sum((m + 1) / p for m, p in enumerate(inside)) / min(k, len(ranks)) if ranks else 0.0


def test_top_k_returns_the_constructed_ranking():
    rng = np.random.default_rng(0)
    n = 12
    gallery = np.eye(n)
    for _ in range(5):
        order = list(rng.permutation(n))
        idx, scores = top_k(query_for_ranking(order, n)[None], gallery, 6)
        assert idx[0].tolist() == order[:6]
        assert np.all(np.diff(scores[0]) < 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_and_map_follow_from_where_the_hits_are(seed):
    rng = np.random.default_rng(seed)
    n = 30
    gallery = np.eye(n)
    cases = []
    for _ in range(8):
        count = int(rng.integers(1, 6))
        ranks = sorted(rng.choice(np.arange(1, n + 1), size=count, replace=False).tolist())
        cases.append(ranks)
    # every query needs its own gallery labels; run them one by one and average
    got = {f"recall@{k}": [] for k in (1, 5, 10)} | {"mAP@10": []}
    for ranks in cases:
        q, labels = ranked_case(rng, n, ranks)
        m = retrieval_metrics(q[None], ["target"], gallery, labels).metrics
        for key in got:
            got[key].append(m[key])
    for k in (1, 5, 10):
        want = np.mean([min(r) <= k for r in cases])
        assert np.mean(got[f"recall@{k}"]) == pytest.approx(want)
    assert np.mean(got["mAP@10"]) == pytest.approx(np.mean([expected_ap(r, 10) for r in cases]))


def test_batch_of_queries_equals_per_query_average():
    rng = np.random.default_rng(5)
    n = 20
    # one shared labelling; queries rank the gallery differently
    labels = np.array(["a"] * 5 + ["b"] * 7 + ["c"] * 8, dtype=object)
    q_labels = ["a", "b", "c", "a", "c", "b"]
    qs = np.stack([query_for_ranking(list(rng.permutation(n)), n) for _ in q_labels])
    together = retrieval_metrics(qs, q_labels, np.eye(n), labels).metrics
    alone = [retrieval_metrics(qs[i : i + 1], [q_labels[i]], np.eye(n), labels).metrics for i in range(len(q_labels))]
    for key in ("recall@1", "recall@5", "recall@10", "mAP@10"):
        assert together[key] == pytest.approx(np.mean([a[key] for a in alone]))


def test_perfect_and_worst_rankings():
    n = 15
    gallery = np.eye(n)
    labels = np.array(["t"] * 3 + ["o"] * 12, dtype=object)
    best = query_for_ranking(list(range(n)), n)  # the 3 hits first
    m = retrieval_metrics(best[None], ["t"], gallery, labels).metrics
    assert (m["recall@1"], m["mAP@10"]) == (1.0, pytest.approx(1.0))  # R=3 < k=10 still scores 1
    worst = query_for_ranking(list(range(n))[::-1], n)  # the 3 hits last (ranks 13..15)
    m = retrieval_metrics(worst[None], ["t"], gallery, labels).metrics
    assert (m["recall@1"], m["recall@10"], m["mAP@10"]) == (0.0, 0.0, 0.0)


def test_average_precision_by_definition():
    assert average_precision_at_k(np.array([1, 0, 1, 0]), 2, 4) == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert average_precision_at_k(np.array([0, 1]), 5, 2) == pytest.approx((1 / 2) / 2)
    assert average_precision_at_k(np.array([0, 0]), 0, 2) == 0.0


def test_queries_without_a_gallery_match_are_not_scored():
    n = 6
    labels = np.array(list("aabbcc"), dtype=object)
    qs = np.stack([query_for_ranking([0, 1, 2, 3, 4, 5], n), query_for_ranking([5, 4, 3, 2, 1, 0], n)])
    m = retrieval_metrics(qs, ["a", "zebra"], np.eye(n), labels).metrics
    assert m["queries_scored"] == 1 and m["queries_without_gallery_match"] == 1
    assert m["recall@1"] == 1.0  # the one scored query hits at rank 1


def test_knn_vote_weighs_scores_not_counts():
    labels = np.array([["a", "b", "b"], ["a", "b", "b"], ["x", "y", "z"]], dtype=object)
    scores = np.array([[0.9, 0.3, 0.3], [0.5, 0.3, 0.3], [0.4, 0.4, 0.4]])
    # row 0: a=0.9 > b=0.6; row 1: b=0.6 > a=0.5 (the majority wins only by weight); row 2: tie -> rank 1
    assert knn_vote(labels, scores).tolist() == ["a", "b", "x"]


def test_probs_accuracy_maps_index_through_labels():
    labels = ["cat", "dog", "fox"]
    truth = ["dog", "fox", "cat", "dog", "wolf"]
    pred_idx = [1, 2, 1, 0, 2]  # right, right, wrong, wrong, (wolf unknown: not counted)
    probs = np.full((5, 3), 0.1)
    probs[np.arange(5), pred_idx] = 0.8
    acc, n = probs_accuracy(probs, truth, labels)
    assert n == 4 and acc == pytest.approx(2 / 4)
    assert probs_accuracy(None, truth, labels) == (None, 0)
    assert probs_accuracy(probs, truth, ["a", "b"]) == (None, 0)  # labels.txt of another model


def test_recommend_and_table():
    rows = [{"embedding": "pool", "dim": 512, "recall@1": 0.9, "mAP@10": 0.7, "near_dup@1": 0.9},
            {"embedding": "head", "dim": 256, "recall@1": 0.8, "mAP@10": 0.8, "near_dup@1": None},
            {"embedding": "logits", "dim": 8, "recall@1": 0.95, "mAP@10": 0.7, "near_dup@1": 1.0}]
    assert recommend(rows)["embedding"] == "head"
    rows[1]["mAP@10"] = 0.7
    assert recommend(rows)["embedding"] == "logits"  # tie on mAP, recall@1 decides
    rows[1].update({"mAP@10": 0.705, "recall@1": 0.95})  # within noise of logits on both
    assert recommend(rows)["embedding"] == "logits"  # near-duplicate recall decides (1.0 > None)
    rows[2]["near_dup@1"] = None
    assert recommend(rows)["embedding"] == "head"  # a full tie keeps the earlier row
    table = format_table(rows)
    assert table.splitlines()[0].split(" | ")[0].strip() == "embedding" and "-" in table.splitlines()[3]


def test_near_duplicate_variants_are_edits_of_the_original():
    src = shape_image(3, seed=11, size=200)
    data = jpeg_bytes(src, 95)
    v = near_duplicate_variants(data, seed=4)
    assert set(v) == set(NEAR_DUP_KINDS)
    assert len({bytes(b) for b in v.values()}) == len(v)
    base = decode_image(data).astype(np.float32)
    flip = decode_image(v["flip"]).astype(np.float32)
    # a mirror image: close to the mirrored original, far from the original itself
    assert np.abs(flip - base[:, ::-1]).mean() < 4 < np.abs(flip - base).mean()
    assert Image.open(io.BytesIO(v["jpeg"])).format == "JPEG"
    assert near_duplicate_variants(data, seed=4) == v  # deterministic


def test_class_names_and_split(tmp_path):
    assert class_name("n02085620-Chihuahua") == "Chihuahua"
    assert class_name("n02096051-Airedale") == "Airedale"
    assert class_name("my-cats") == "my-cats"
    make_dataset(tmp_path / "d", classes=3, per_class=10)
    data = scan_folder(tmp_path / "d")
    assert data.class_names == ["class_0", "class_1", "class_2"] and len(data) == 30
    kept, held = split_per_class(data, 0.2, seed=0)
    assert sorted(kept + held) == list(range(30)) and not set(kept) & set(held)
    assert [sum(data.labels[i] == c for i in held) for c in range(3)] == [2, 2, 2]
    assert split_per_class(data, 0.2, seed=0) == (kept, held)
    assert split_per_class(data, 0.2, seed=1) != (kept, held)
    # adding a class leaves the other classes' split alone
    make_dataset(tmp_path / "e", classes=4, per_class=10)
    bigger = scan_folder(tmp_path / "e")
    held_names = {(data.paths[i].parent.name, data.paths[i].name) for i in held}
    held_big = {(bigger.paths[i].parent.name, bigger.paths[i].name) for i in split_per_class(bigger, 0.2, 0)[1]
                if bigger.labels[i] < 3}
    assert held_names == held_big


def test_query_folder_against_the_whole_data_folder(tmp_path):
    make_dataset(tmp_path / "data", classes=3, per_class=4)
    make_dataset(tmp_path / "queries", classes=2, per_class=2, seed=7)
    es = build_eval_set(tmp_path / "data", queries=str(tmp_path / "queries"))
    assert len(es.gallery) == 12 and len(es.queries) == 4
    assert es.queries.label_names() == ["class_0"] * 2 + ["class_1"] * 2
    assert es.spec == {"query_source": str(tmp_path / "queries")}
    split = build_eval_set(tmp_path / "data")
    assert len(split.queries) == 3 and len(split.gallery) == 9  # round(0.2 * 4) = 1 per class


def test_an_undecodable_image_stops_the_evaluation_with_its_name():
    class FakeEncoder:  # never reached for the bad batch: decoding fails first
        async def encode(self, pixels):
            return Encoded(np.ones((len(pixels), 2), np.float32), None)

    blobs = [jpeg_bytes(shape_image(0, 1)), b"\xff\xd8\xff\xe0 truncated"]
    with pytest.raises(CorruptImage, match="photos/broken.jpg"):
        asyncio.run(encode_blobs(FakeEncoder(), blobs.__getitem__, 2, batch_size=2,
                                 name=lambda i: ["photos/ok.jpg", "photos/broken.jpg"][i]))
    emb, probs = asyncio.run(encode_blobs(FakeEncoder(), blobs.__getitem__, 1))
    assert emb.shape == (1, 2) and probs is None
