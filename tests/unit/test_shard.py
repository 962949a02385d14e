"""``--shard K/N``: a stable partition of the files under a root, and clear errors for bad K/N.

The integration side (three shards at once into a Milvus server equal one run; a killed
shard resumes exactly; --sync stays in its shard) is in
tests/integration/indexer/test_shards.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from imgsearch.cli import main
from imgsearch.indexer.scan import Shard, parse_shard, scan, shard_of


def tree(root, n=240):
    for i in range(n):
        p = root / f"n{i % 7:08d}-class_{i % 7}" / (f"sub/{i}.jpg" if i % 5 == 0 else f"{i}.jpg")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    return root


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_shards_partition_the_scan_in_order(tmp_path, count):
    root = tree(tmp_path / "images")
    whole = [f.rel for f in scan(root).files]
    parts = [scan(root, shard=Shard(k, count)) for k in range(count)]
    seen = [f.rel for part in parts for f in part.files]
    assert sorted(seen) == sorted(whole) and len(seen) == len(set(seen))  # every file once
    for k, part in enumerate(parts):
        rels = [f.rel for f in part.files]
        assert rels == [r for r in whole if shard_of(r, count) == k]  # scan order kept
        assert part.other_shards == len(whole) - len(rels)
        assert all(part.owns(r) == (shard_of(r, count) == k) for r in whole)
    if count > 1:
        assert all(part.files for part in parts), "240 names left a shard empty"


def test_shard_depends_on_the_relative_path_not_the_mount_point(tmp_path):
    a, b = tree(tmp_path / "mnt" / "images"), tree(tmp_path / "other" / "deeper" / "data")
    for k in range(3):
        assert [f.rel for f in scan(a, shard=Shard(k, 3)).files] == [f.rel for f in scan(b, shard=Shard(k, 3)).files]


def test_shard_of_is_the_same_in_every_process():
    """Python's hash() is salted per process; pods must agree, and stored entries keep their shard."""
    rels = ["n02085620-Chihuahua/n02085620_10074.jpg", "flat.jpg", "ünï/cödé.png", "a/b/c/d.webp"]
    here = [shard_of(r, 7) for r in rels]
    code = f"from imgsearch.indexer.scan import shard_of; print([shard_of(r, 7) for r in {rels!r}])"
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        assert out.strip() == str(here)
    # the function itself is a contract: blake2b-64 of the UTF-8 path, big-endian, mod N
    import hashlib
    assert here == [int.from_bytes(hashlib.blake2b(r.encode(), digest_size=8).digest(), "big") % 7 for r in rels]


def test_shards_are_balanced():
    counts = [0] * 4
    for i in range(4000):
        counts[shard_of(f"n{i % 120:08d}-breed/{i:06d}.jpg", 4)] += 1
    assert all(900 <= c <= 1100 for c in counts), counts


def test_limit_counts_the_shards_files(tmp_path):
    root = tree(tmp_path / "images")
    res = scan(root, limit=10, shard=Shard(1, 3))
    assert len(res.files) == 10 and res.limited
    assert [f.rel for f in res.files] == [f.rel for f in scan(root, shard=Shard(1, 3)).files][:10]


@pytest.mark.parametrize("text, shard", [("0/1", Shard(0, 1)), ("3/4", Shard(3, 4)), (" 2 / 8 ", Shard(2, 8))])
def test_parse_shard(text, shard):
    assert parse_shard(text) == shard and str(shard) == f"{shard.index}/{shard.count}"


@pytest.mark.parametrize("text, message", [
    ("4/4", "K must be between 0 and 3"),
    ("-1/4", "K must be between 0 and 3"),
    ("1/0", "N (the number of shards) must be at least 1"),
    ("0/-2", "N (the number of shards) must be at least 1"),
    ("1", "expected K/N"),
    ("1/2/3", "expected K/N"),
    ("a/b", "expected K/N"),
    ("", "expected K/N"),
])
def test_bad_shards_are_refused_with_a_clear_message(tmp_path, capsys, text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_shard(text)
    with pytest.raises(SystemExit) as e:
        main(["index", str(tmp_path), f"--shard={text}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --shard" in err and message in err, err


def test_recreate_with_shard_is_refused_before_anything_starts(tmp_path, capsys):
    assert main(["index", str(tmp_path), "--shard", "0/2", "--recreate"]) == 2
    err = capsys.readouterr().err
    assert "--recreate cannot be combined with --shard" in err and "imgsearch collection drop" in err


class CreatingStore:
    """A store another shard is creating: the first ``opens`` fail as the race makes them fail."""

    def __init__(self, failures: list[Exception], props: dict | None = None, listed: bool = True) -> None:
        self.failures, self.props, self.opened, self.listed = list(failures), props or {}, 0, listed

    def open(self, dim, sha, description, recreate=False, patient=False):
        if self.failures:
            raise self.failures.pop(0)
        self.opened += 1

    def exists(self):
        return self.listed

    def properties(self):
        return self.props


CARD = type("Card", (), {"name": "m", "arch": "resnet18", "weights": "random", "embedding_dim": 4, "model_sha": "s"})


def test_a_shard_waits_out_another_shard_creating_the_collection(monkeypatch):
    from imgsearch.errors import CollectionMismatch, StoreUnavailable
    from imgsearch.indexer import cli

    monkeypatch.setattr(cli.time, "sleep", lambda s: None)
    # created but not yet labelled with the model, then "already exists" from the create call
    store = CreatingStore([CollectionMismatch("no sha yet"), StoreUnavailable("collection already exists")])
    cli.open_store(store, CARD, recreate=False, wait_for_creator=True)
    assert store.opened == 1 and not store.failures


def test_a_real_mismatch_is_not_waited_for(monkeypatch):
    from imgsearch.errors import CollectionMismatch
    from imgsearch.indexer import cli
    from imgsearch.store import PROP_SHA

    monkeypatch.setattr(cli.time, "sleep", lambda s: pytest.fail("waited for a collection of another model"))
    store = CreatingStore([CollectionMismatch("another model")], {PROP_SHA: "other"})
    with pytest.raises(CollectionMismatch):
        cli.open_store(store, CARD, recreate=False, wait_for_creator=True)
    # without --shard nothing is waited for, whatever the error
    store = CreatingStore([CollectionMismatch("no sha yet")])
    with pytest.raises(CollectionMismatch):
        cli.open_store(store, CARD, recreate=False, wait_for_creator=False)


def test_a_shard_waits_out_a_create_that_milvus_has_begun_but_not_listed(monkeypatch):
    from imgsearch.errors import StoreUnavailable
    from imgsearch.indexer import cli

    monkeypatch.setattr(cli.time, "sleep", lambda s: None)
    # Milvus Lite's server: the winner's folder exists, the collection is not listed yet
    store = CreatingStore([StoreUnavailable("[Errno 17] File exists", answered=True)], listed=False)
    cli.open_store(store, CARD, recreate=False, wait_for_creator=True)
    assert store.opened == 1 and not store.failures


def test_a_silent_milvus_is_not_waited_for_when_nothing_was_created(monkeypatch):
    from imgsearch.errors import StoreUnavailable
    from imgsearch.indexer import cli

    monkeypatch.setattr(cli.time, "sleep", lambda s: pytest.fail("waited for a Milvus that did not answer"))
    store = CreatingStore([StoreUnavailable("deadline exceeded", answered=False)], listed=False)
    with pytest.raises(StoreUnavailable):
        cli.open_store(store, CARD, recreate=False, wait_for_creator=True)
