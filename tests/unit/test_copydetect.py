"""The copy-detection set and its scoring (the benchmark's arithmetic)."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from imgsearch.export.copydetect import (
    DISTRACTOR_LABEL,
    EDITS,
    MANIFEST,
    CopySet,
    build,
    load_originals,
    metrics,
    phash_scores,
    ranks_from_lists,
    ranks_from_scores,
)


def test_originals_are_real_photos_from_the_packages():
    photos = load_originals()
    assert len(photos) >= 20
    assert {"chelsea", "coffee", "china", "grace_hopper", "motorcycle_left", "motorcycle_right"} <= set(photos)
    assert all(im.mode == "RGB" and max(im.size) <= 640 for im in photos.values())


def test_build_is_deterministic_and_every_query_has_one_original(tmp_path):
    a = build(tmp_path / "a", variants=1, distractors=5, originals=3, seed=7)
    b = build(tmp_path / "b", variants=1, distractors=5, originals=3, seed=7)
    assert len(a.gallery) == 3 + 5 and len(a.queries) == 3 * len(EDITS)
    assert sum(r.startswith(DISTRACTOR_LABEL + "/") for r in a.gallery) == 5
    for q, t, k in zip(a.queries, a.truth, a.kinds):
        assert q.startswith(k + "/") and q.split("/")[1].startswith(a.gallery[t].split("/")[0])
        assert (tmp_path / "a" / "queries" / q).read_bytes() == (tmp_path / "b" / "queries" / q).read_bytes()
    assert CopySet.load(tmp_path / "a").truth == a.truth == b.truth
    assert json.loads((tmp_path / "a" / MANIFEST).read_text())["seed"] == 7
    # every edit changes the pixels (a no-op edit would inflate the scores)
    orig = np.asarray(Image.open(tmp_path / "a" / "gallery" / a.gallery[0]).convert("RGB"))
    for kind in EDITS:
        edited = np.asarray(Image.open(tmp_path / "a" / "queries" / kind / f"{a.gallery[0].split('/')[0]}_0.png"))
        assert edited.shape != orig.shape or np.abs(edited.astype(int) - orig).mean() > 1.0, kind


def test_ties_rank_the_original_last():
    scores = np.array([[0.5, 0.5, 0.5], [0.1, 0.9, 0.2], [0.3, 0.2, 0.1]])
    assert ranks_from_scores(scores, [0, 1, 2]).tolist() == [2, 0, 2]


def test_metrics_overall_and_per_edit():
    ranks = np.array([0, 0, 3, 20, 1, 0])
    kinds = ["crop", "crop", "crop", "flip", "flip", "flip"]
    m = metrics(ranks, kinds, k=10)
    assert m["recall@1"] == round(3 / 6, 4) and m["recall@10"] == round(5 / 6, 4)
    assert m["mAP@10"] == round((1 + 1 + 1 / 4 + 0 + 1 / 2 + 1) / 6, 4)
    assert m["per_edit"]["crop"]["recall@1"] == round(2 / 3, 4) and m["per_edit"]["flip"]["recall@10"] == round(2 / 3, 4)
    assert set(m["per_edit"]) == {"crop", "flip"}


def test_ranks_from_result_lists(tmp_path):
    cs = CopySet(tmp_path, ["a/a.png", "b/b.png"], ["crop/a_0.png", "crop/b_0.png"], [0, 1], ["crop", "crop"])
    assert ranks_from_lists([["a/a.png", "b/b.png"], ["a/a.png"]], cs).tolist() == [0, 10 ** 6]


def test_phash_finds_grey_copies_and_misses_mirrors(tmp_path):
    cs = build(tmp_path, variants=1, distractors=10, originals=6, seed=0)
    ranks = ranks_from_scores(phash_scores(cs), cs.truth)
    kinds = np.asarray(cs.kinds)
    # what a perceptual hash is known for: robust to colour, blind to mirroring
    assert (ranks[kinds == "grey"] == 0).all()
    assert (ranks[kinds == "flip"] > 0).mean() >= 0.5
