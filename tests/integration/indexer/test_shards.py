"""``imgsearch index --shard K/N`` into a Milvus server (milvus-lite's server mode).

What an Indexed Job does on a cluster, on loopback: three shard processes start at once
against one server and an empty collection, and their union must be the collection a
single run builds (ids, paths, labels, vectors); a shard SIGKILLed mid-run and run again
ends exact; ``--sync`` in a shard deletes only that shard's entries.

Content that sits at two paths in two shards is stored once (ids are content hashes);
which of its paths the entry names depends on which shard wrote last, so for such an id
the test checks that the path holds the content and the label is that path's label.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from harness.indexer import index_in_process, open_store
from harness.stack import MilvusServer
from imgsearch.indexer.scan import label_for, scan, shard_of
from imgsearch.store import content_id

pytestmark = pytest.mark.integration
SHARDS = 3


@pytest.fixture(scope="module")
def milvus(tmp_path_factory):
    base = tmp_path_factory.mktemp("milvus_shards")
    server = MilvusServer(base / "server.db", log_path=base / "milvus.log").start()
    try:
        yield server
    finally:
        server.stop()


def with_cross_shard_copy(src: Path, dest: Path) -> tuple[Path, str, str]:
    """A copy of the dataset plus one file whose bytes also sit at a path of another shard
    and another label. Returns (root, original rel, copy rel)."""
    shutil.copytree(src, dest)
    original = "n00000000-class_0/img_0000.jpg"
    i = 0
    while True:  # a name in class_5 that falls in another shard than the original
        copy = f"n00000005-class_5/copy_{i}.jpg"
        if shard_of(copy, SHARDS) != shard_of(original, SHARDS):
            break
        i += 1
    shutil.copyfile(dest / original, dest / copy)
    return dest, original, copy


def expected_from_disk(root: Path) -> dict[int, set[str]]:
    """content id -> every valid image path holding it (what any correct run may name)."""
    out: dict[int, set[str]] = {}
    for f in scan(root).files:
        data = f.path.read_bytes()
        if f.rel.split("/")[-1].startswith("img_") or f.rel.split("/")[-1].startswith("copy_"):
            out.setdefault(content_id(data), set()).add(f.rel)
    return out


def snapshot(uri: str, collection: str) -> dict[int, tuple[str, str, np.ndarray]]:
    """id -> (path, label, embedding); asserts no id is stored twice."""
    store = open_store(uri, collection)
    try:
        entries = list(store.iter_entries())
        count = store.count()
        full = store.get_many([e.id for e in entries], with_embedding=True)  # one call, not one per entry
        out = {e.id: (e.path, e.label, got.embedding) for e, got in zip(entries, full)}
    finally:
        store.close()
    assert len(entries) == len(out) == count, (len(entries), len(out), count)
    return out


def assert_same_collection(got: dict, want: dict, root: Path, holders: dict[int, set[str]]) -> None:
    assert set(got) == set(want), (sorted(set(want) - set(got))[:5], sorted(set(got) - set(want))[:5])
    for cid, (path, label, emb) in got.items():
        w_path, w_label, w_emb = want[cid]
        if len(holders[cid]) == 1:
            assert (path, label) == (w_path, w_label), cid
        else:  # content at several paths: any of them, with its own label
            assert path in holders[cid] and label == label_for(path), (cid, path, label)
        assert content_id((root / path).read_bytes()) == cid
        # same model, same pixels; batches are composed differently, so allow float noise
        np.testing.assert_allclose(emb, w_emb, rtol=1e-4, atol=1e-5, err_msg=path)


def shard_env(env: dict[str, str], milvus: MilvusServer, collection: str) -> dict[str, str]:
    return env | {"IMGSEARCH_MILVUS_URI": milvus.uri, "IMGSEARCH_COLLECTION": collection}


def shard_args(k: int, report: Path, *options: str) -> list[str]:
    return [f"--shard={k}/{SHARDS}", "--workers", "1", "--json", str(report), *options]


def run_shards(spawn_index, root: Path, env: dict[str, str], tmp_path: Path, *options: str,
               shards=range(SHARDS)) -> dict[int, dict]:
    """The shards as processes started at once, as an Indexed Job runs them."""
    for k in shards:
        (tmp_path / f"shard-{k}.json").unlink(missing_ok=True)
    procs = {k: spawn_index(root, env, *shard_args(k, tmp_path / f"shard-{k}.json", *options), cwd=tmp_path)
             for k in shards}
    reports = {}
    for k, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"shard {k}: {err[-3000:]}"
        reports[k] = json.loads((tmp_path / f"shard-{k}.json").read_text())
    return reports


def run_in_process(root: Path, env: dict[str, str], tmp_path: Path, *options: str,
                   shards=range(SHARDS)) -> dict[int, dict]:
    """The shards one after another in this process: for the runs whose point is not
    concurrency or a kill."""
    reports = {}
    for k in shards:
        out = tmp_path / f"shard-{k}.json"
        out.unlink(missing_ok=True)  # a report left by an earlier pass is not this run's
        assert index_in_process(root, env, *shard_args(k, out, *options)) == 0, f"shard {k}"
        reports[k] = json.loads(out.read_text())
    return reports


@pytest.fixture(scope="module")
def reference(milvus, dataset, triton, repo18, tmp_path_factory):
    """One plain run over the dataset (+ a cross-shard copy): the collection shards must equal."""
    base = tmp_path_factory.mktemp("shards_ref")
    root, original, copy = with_cross_shard_copy(dataset.root, base / "images")
    env = {"IMGSEARCH_TRITON_URL": triton.grpc_url, "IMGSEARCH_MODEL_REPOSITORY": str(repo18),
           "IMGSEARCH_MILVUS_URI": milvus.uri, "IMGSEARCH_COLLECTION": "single"}
    assert index_in_process(root, env, "--workers", "1") == 0
    want = snapshot(milvus.uri, "single")
    holders = expected_from_disk(root)
    assert set(want) == set(holders) and len(want) == len(dataset.valid)  # the copy is one entry
    assert want[content_id((root / copy).read_bytes())][0] == original  # one run: first in scan order wins
    return root, want, holders


def test_three_shards_at_once_equal_one_run(milvus, reference, env, tmp_path, spawn_index):
    root, want, holders = reference
    reports = run_shards(spawn_index, root, shard_env(env, milvus, "sharded"), tmp_path)
    # disjoint parts that cover the folder: every file scanned by exactly one shard
    assert sum(r["scanned"] for r in reports.values()) == len(scan(root).files)
    assert all(r["scanned"] > 0 for r in reports.values())
    # the copy was encoded by both shards that hold it, or skipped by the later one
    assert sum(r["indexed"] for r in reports.values()) in (len(want), len(want) + 1)
    assert_same_collection(snapshot(milvus.uri, "sharded"), want, root, holders)

    # a second pass of all shards is a no-op: every file is "unchanged", nothing encoded
    again = run_in_process(root, shard_env(env, milvus, "sharded"), tmp_path)
    assert sum(r["indexed"] for r in again.values()) == 0
    assert sum(r["unchanged"] + r["duplicates"] for r in again.values()) == len(want) + 1


def wait_for_rows(uri: str, collection: str, ids: list[int], at_least: int, proc, timeout_s: float = 120) -> int:
    store = None
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                store = store or open_store(uri, collection)
                have = len(store.existing(ids))
                if have >= at_least:
                    return have
            except Exception:  # noqa: BLE001 - the collection is still being created by the shards
                store = None
            time.sleep(0.05 if store else 0.25)  # no new client 20 times a second while they start
    finally:
        if store:
            store.close()
    return -1


def test_a_shard_killed_mid_run_resumes_exactly(milvus, reference, env, tmp_path, spawn_index):
    root, want, holders = reference
    run_env = shard_env(env, milvus, "killed")
    victim = 1
    victim_ids = sorted({content_id(f.path.read_bytes()) for f in scan(root).files
                         if shard_of(f.rel, SHARDS) == victim and f.rel.rsplit("/", 1)[-1].startswith(("img_", "copy_"))})
    others = {k: spawn_index(root, run_env, f"--shard={k}/{SHARDS}", "--workers", "1", cwd=tmp_path)
              for k in range(SHARDS) if k != victim}
    # small batches, one request in flight: the victim upserts in many small steps
    proc = spawn_index(root, run_env, f"--shard={victim}/{SHARDS}", "--workers", "1", "--batch-size", "4",
                       "--in-flight", "1", cwd=tmp_path)
    stored = wait_for_rows(milvus.uri, "killed", victim_ids, random.Random(7).randint(4, 16), proc)
    children = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
    assert proc.poll() is None and stored > 0, f"the shard finished before the kill:\n{proc.communicate()}"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, f"decode workers outlived the killed shard: {alive}"
    for k, p in others.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, f"shard {k}: {err[-3000:]}"

    partial = snapshot(milvus.uri, "killed")
    assert set(partial) < set(want)  # the victim's part is missing some ids, nothing foreign
    missing = set(want) - set(partial)
    assert missing and missing <= set(victim_ids)

    report = run_in_process(root, run_env, tmp_path, shards=[victim])[victim]
    assert report["indexed"] == len(missing)  # only what the killed run had not stored
    assert report["unchanged"] == len(victim_ids) - len(missing)
    assert_same_collection(snapshot(milvus.uri, "killed"), want, root, holders)


def test_sync_in_a_shard_deletes_only_that_shards_entries(milvus, dataset, env, tmp_path, spawn_index):
    root = tmp_path / "images"
    shutil.copytree(dataset.root, root)
    run_env = shard_env(env, milvus, "synced")
    run_in_process(root, run_env, tmp_path)
    valid = sorted(f.rel for f in scan(root).files if f.rel.rsplit("/", 1)[-1].startswith("img_"))
    by_shard = {k: [r for r in valid if shard_of(r, SHARDS) == k] for k in range(SHARDS)}
    gone0, gone1 = by_shard[0][0], by_shard[1][0]
    moved_from = by_shard[0][1]
    label_dir = moved_from.split("/")[0]
    moved_to = next(f"{label_dir}/renamed_{i}.jpg" for i in range(1000)
                    if shard_of(f"{label_dir}/renamed_{i}.jpg", SHARDS) == 2)
    cid = {r: content_id((root / r).read_bytes()) for r in (gone0, gone1, moved_from)}
    before = snapshot(milvus.uri, "synced")
    (root / gone0).unlink()
    (root / gone1).unlink()
    (root / moved_from).rename(root / moved_to)

    # pass 1, every shard, no --sync: the moved file's entry is re-pointed by its new shard
    first = run_in_process(root, run_env, tmp_path)
    assert sum(r["indexed"] for r in first.values()) == 0 and first[2]["moved"] == 1
    assert snapshot(milvus.uri, "synced")[cid[moved_from]][0] == moved_to

    # pass 2, shard 0 alone with --sync: its deleted file goes, shard 1's stays (not its business)
    r0 = run_in_process(root, run_env, tmp_path, "--sync", shards=[0])[0]
    after0 = snapshot(milvus.uri, "synced")
    assert r0["deleted"] == 1 and r0["indexed"] == 0
    assert set(after0) == set(before) - {cid[gone0]}
    assert after0[cid[gone1]][0] == gone1  # the deleted file of shard 1 still has its entry
    assert after0[cid[moved_from]][0] == moved_to  # in shard 2 now: kept, not re-encoded
    np.testing.assert_array_equal(after0[cid[moved_from]][2], before[cid[moved_from]][2])

    # the other shards' --sync, at once: now the collection is exactly the folder
    rest = run_shards(spawn_index, root, run_env, tmp_path, "--sync", shards=[1, 2])
    assert rest[1]["deleted"] == 1 and rest[2]["deleted"] == 0
    final = snapshot(milvus.uri, "synced")
    on_disk = {content_id((root / r).read_bytes()): r for r in
               (f.rel for f in scan(root).files) if r.rsplit("/", 1)[-1].startswith(("img_", "renamed_"))}
    assert {k: v[0] for k, v in final.items()} == on_disk
