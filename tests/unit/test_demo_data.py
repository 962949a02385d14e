"""``imgsearch demo-data``: label folders of decodable JPEGs, deterministic and idempotent."""

from __future__ import annotations

import hashlib

import numpy as np

from imgsearch.imaging import decode_image
from imgsearch.indexer.demo_data import PHOTOS, build, load_photos


def digest(root) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_set_is_deterministic_idempotent_and_decodable(tmp_path):
    photos = load_photos()
    assert {"astronaut", "chelsea", "coffee", "rocket"} <= set(photos) <= set(PHOTOS)
    n_labels = len(photos)
    count = 2 * n_labels + 3
    written, kept, labels = build(tmp_path / "a", count)
    assert (written, kept) == (count, 0) and labels == list(photos)
    files = digest(tmp_path / "a")
    assert len(files) == count and len(set(files.values())) == count  # every copy differs
    per_label = {lab: sum(1 for f in files if f.startswith(lab + "/")) for lab in labels}
    assert set(per_label.values()) == {2, 3}  # spread evenly
    assert not any(p.name.startswith(".") for p in (tmp_path / "a").rglob("*"))  # no temp files left

    assert build(tmp_path / "a", count)[:2] == (0, count)  # re-run: nothing new
    assert digest(tmp_path / "a") == files
    build(tmp_path / "b", count)
    assert digest(tmp_path / "b") == files  # same seed, same bytes

    # copies are real variants of their photo: decodable, and closer to it than to other photos
    a = tmp_path / "a"
    orig = {lab: decode_image((a / lab / f"{lab}_000.jpg").read_bytes()).astype(float) for lab in labels}
    for lab in ("chelsea", "coffee"):
        copy = decode_image((a / lab / f"{lab}_001.jpg").read_bytes()).astype(float)
        hist = lambda x: np.histogram(x, bins=16, range=(0, 255))[0] / x.size  # noqa: E731
        dist = {other: np.abs(hist(copy) - hist(orig[other])).sum() for other in labels}
        assert min(dist, key=dist.get) == lab, dist


def test_small_count_uses_the_first_photos(tmp_path):
    written, _, labels = build(tmp_path, 3)
    assert written == 3 and len(labels) == 3
    assert sorted(p.parent.name for p in tmp_path.rglob("*.jpg")) == sorted(labels)
