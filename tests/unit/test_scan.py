"""Folder scanning: labels, hidden files, symlinks, order, --limit; and the index report text."""

from __future__ import annotations

import os

import pytest

from imgsearch.indexer.report import IndexReport
from imgsearch.indexer.scan import label_for, scan, strip_synset


@pytest.mark.parametrize("name, label", [
    ("n02085620-Chihuahua", "Chihuahua"),
    ("n02096294-Australian_terrier", "Australian_terrier"),
    ("Chihuahua", "Chihuahua"),
    ("n0208562-short", "n0208562-short"),  # not 8 digits: not a synset
    ("n02085620-", "n02085620-"),  # nothing after the prefix: keep the name
    ("x-n02085620-dog", "x-n02085620-dog"),
])
def test_strip_synset(name, label):
    assert strip_synset(name) == label


def test_label_is_the_top_folder():
    assert label_for("n02085620-Chihuahua/a.jpg") == "Chihuahua"
    assert label_for("cats/indoor/a.jpg") == "cats"
    assert label_for("a.jpg") == ""


def touch(p, data=b"x"):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def test_scan_sorted_labels_hidden_and_non_images(tmp_path):
    root = tmp_path / "imgs"
    touch(root / "n00000002-b" / "2.jpg")
    touch(root / "n00000002-b" / "1.JPG")
    touch(root / "n00000001-a" / "sub" / "x.png")
    touch(root / "flat.webp")
    touch(root / ".hidden.jpg")
    touch(root / ".cache" / "y.jpg")
    touch(root / "n00000001-a" / "notes.txt")
    touch(root / "n00000001-a" / "noext")
    res = scan(root)
    assert [(f.rel, f.label) for f in res.files] == [
        ("flat.webp", ""), ("n00000001-a/sub/x.png", "a"), ("n00000002-b/1.JPG", "b"), ("n00000002-b/2.jpg", "b")]
    assert all(f.path.is_absolute() and f.path.exists() for f in res.files)
    assert res.ignored["hidden"] == 2
    assert res.ignored["not an image name (.txt)"] == 1
    assert res.ignored["not an image name (no extension)"] == 1


def test_scan_limit_is_the_first_n_in_order(tmp_path):
    for c in "abc":
        for i in range(3):
            touch(tmp_path / c / f"{i}.jpg")
    res = scan(tmp_path, limit=4)
    assert [f.rel for f in res.files] == ["a/0.jpg", "a/1.jpg", "a/2.jpg", "b/0.jpg"] and res.limited


def test_symlinks_never_lead_out_of_the_root(tmp_path):
    root = tmp_path / "root"
    outside = tmp_path / "secret"
    touch(outside / "s.jpg")
    touch(root / "a" / "real.jpg")
    os.symlink(outside / "s.jpg", root / "a" / "out.jpg")  # file link out of the root
    os.symlink(outside, root / "linked")  # folder link out of the root
    os.symlink(root / "a", root / "loop")  # folder link inside: not followed either (no loops)
    os.symlink(root / "a" / "real.jpg", root / "a" / "alias.jpg")  # file link inside: fine
    res = scan(root)
    assert [f.rel for f in res.files] == ["a/alias.jpg", "a/real.jpg"]
    assert res.ignored["symlink out of the image root"] == 1
    assert res.ignored["symlinked folder (not followed)"] == 2


def test_scan_of_a_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(NotADirectoryError, match="not a folder"):
        scan(tmp_path / "nope")


def test_report_summary_groups_failures_and_counts():
    r = IndexReport(root="/x", collection="images", scanned=10, indexed=5, unchanged=2, duplicates=1,
                    elapsed_s=2.0, ignored={"hidden": 1})
    r.add_failure("undecodable_image", "a/t.jpg", "truncated")
    r.add_failure("unsupported_media_type", "a/x.jpg", "text")
    r.stages_s.update(decode=1.0, infer=3.0, upsert=0.0)
    text = r.summary()
    assert "indexed 5, unchanged 2, duplicates 1, failed 2 of 10 files in 2.0s (2.5 images/s)" in text
    assert "failed, undecodable_image (1):\n  a/t.jpg: truncated" in text
    assert "share: decode 25%, infer 75%, upsert 0%" in text
    assert r.done == 10 and "STOPPED" not in text
    r.aborted = "Triton unavailable"
    assert "STOPPED: Triton unavailable" in r.summary() and r.to_dict()["not_processed"] == 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any folder")
def test_unreadable_folder_is_recorded(tmp_path):
    touch(tmp_path / "a" / "1.jpg")
    locked = tmp_path / "b"
    touch(locked / "2.jpg")
    locked.chmod(0)
    try:
        res = scan(tmp_path)
    finally:
        locked.chmod(0o755)
    assert [f.rel for f in res.files] == ["a/1.jpg"] and res.errors and res.ignored["unreadable folder"] == 1


def test_walk_errors_are_recorded(tmp_path, monkeypatch):
    # root may read anything, so simulate a folder that cannot be listed
    import imgsearch.indexer.scan as mod

    touch(tmp_path / "a" / "1.jpg")
    real_walk = os.walk

    def walk(top, onerror=None, followlinks=False):
        onerror(PermissionError(13, "Permission denied", str(tmp_path / "b")))
        yield from real_walk(top, followlinks=followlinks)

    monkeypatch.setattr(mod.os, "walk", walk)
    res = scan(tmp_path)
    assert res.errors == [f"{tmp_path / 'b'}: Permission denied"] and [f.rel for f in res.files] == ["a/1.jpg"]
