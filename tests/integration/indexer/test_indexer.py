"""``imgsearch index`` against the real tritonserver and Milvus Lite.

Exactness is checked entry by entry: every id is the content hash of the file at the
entry's path, no id twice, and (self-search) every file's freshly computed embedding
finds its own entry first.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from harness.data import image_bytes, jpeg_bytes, png_bytes, shape_image
from harness.indexer import entries_and_check, open_store, release_lite
from imgsearch.imaging import decode_image
from imgsearch.store import content_id
from imgsearch.triton_client import TritonEncoder
from imgsearch.triton_metrics import fetch_model_stats
from imgsearch.triton_server import LocalTriton

pytestmark = pytest.mark.integration
MODEL = "resnet152"


def inferences(server) -> int:
    return fetch_model_stats(server.metrics_url, MODEL).inferences


# --- basic run, re-run, self-search, admin ---------------------------------------------
def test_index_rerun_selfsearch_and_collection_admin(dataset, env, index_cli, triton, capsys):
    uri = env["IMGSEARCH_MILVUS_URI"]
    first = index_cli(dataset.root, "--batch-size", "16", "--in-flight", "2", "--workers", "2")
    assert first.rc == 0, first.err
    rep = first.report
    assert rep["indexed"] == len(dataset.valid) and rep["unchanged"] == 0 and rep["duplicates"] == 0
    failed = {path: code for code, items in rep["failed"].items() for path, _msg in items}
    assert failed == dataset.broken  # each broken file reported, with the right reason
    assert rep["ignored"] == {"not an image name (.txt)": 1}
    assert rep["aborted"] is None and rep["batches"] >= len(dataset.valid) // 16
    assert all(rep["stages_s"][s] > 0 for s in ("hash", "decode", "infer", "upsert"))
    assert abs(sum(rep["shares"].values()) - 1) < 1e-6
    # the run ends with the rows sealed and indexed, and the collection records that build
    assert rep["stages_s"]["index"] > 0
    assert rep["settings"]["index"]["last_build"]["rows"] == len(dataset.valid)
    assert rep["settings"]["index"]["indexed_rows"] == len(dataset.valid)
    assert "indexed 200, unchanged 0, duplicates 0, failed 4 of 204 files" in first.out
    assert "failed, undecodable_image (2):" in first.out and "n00000003-class_3/bomb.png" in first.out

    stored = entries_and_check(uri, dataset.root)
    assert stored == {cid: rel for rel, cid in dataset.valid.items()}

    # a second run encodes nothing: Triton sees no inference at all
    before = inferences(triton)
    second = index_cli(dataset.root)
    assert second.rc == 0, second.err
    assert (second.report["indexed"], second.report["unchanged"]) == (0, len(dataset.valid))
    assert second.report["batches"] == 0
    assert second.report["failed_count"] == len(dataset.broken)  # only these are decoded again
    assert inferences(triton) == before
    assert len(entries_and_check(uri, dataset.root)) == len(dataset.valid)

    # self-search: each file, decoded and encoded afresh, finds its own entry first
    rels = sorted(dataset.valid)
    pixels = np.stack([decode_image((dataset.root / r).read_bytes()) for r in rels])

    async def encode_all():
        enc = TritonEncoder(triton.grpc_url, MODEL)
        try:
            parts = [await enc.encode(pixels[i : i + 32]) for i in range(0, len(pixels), 32)]
        finally:
            await enc.close()
        return np.concatenate([p.embeddings for p in parts])

    emb = asyncio.run(encode_all())
    store = open_store(uri)
    try:
        hits = store.search(emb, top_k=2)
        first_own = [store.get(dataset.valid[rels[0]], with_embedding=True).embedding]
    finally:
        store.close()
    for rel, row in zip(rels, hits):
        assert row[0].id == dataset.valid[rel] and row[0].path == rel, (rel, row[0])
        assert row[0].score > 0.999 and row[0].score >= row[1].score
    np.testing.assert_allclose(first_own[0], emb[0], atol=1e-4)  # the stored vector is this file's

    # imgsearch collection stats / drop
    from imgsearch.cli import main

    capsys.readouterr()
    assert main(["collection", "stats", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["count"] == len(dataset.valid) and st["dim"] == 512
    assert st["labels"] == {f"class_{c}": 20 for c in range(10)}
    assert st["index"]["index_type"] == "HNSW" and st["index"]["indexed_rows"] == len(dataset.valid)
    assert st["index"]["last_build"]["rows"] == len(dataset.valid) and st["index"]["last_build"]["seconds"] > 0
    assert main(["collection", "stats"]) == 0
    text = capsys.readouterr().out
    assert f"{len(dataset.valid)} of {len(dataset.valid)} rows indexed" in text
    assert f"built     over {len(dataset.valid)} rows in" in text
    assert main(["collection", "drop"]) == 2  # not a terminal and no --yes: refuses
    assert main(["collection", "drop", "--yes"]) == 0
    assert main(["collection", "stats"]) == 1
    release_lite(uri)


# --- crash safety: SIGKILL at random points, five times -------------------------------
def test_sigkill_five_times_then_exact(dataset, env, triton, tmp_path, spawn_index, index_cli):
    uri = env["IMGSEARCH_MILVUS_URI"]
    rng = random.Random(1234)
    total = len(dataset.valid)
    counts = []
    for attempt in range(5):
        start = inferences(triton)
        proc = spawn_index(dataset.root, env, "--batch-size", "8", "--in-flight", "2", cwd=tmp_path)
        if attempt == 0:
            time.sleep(rng.uniform(0.5, 2.0))  # somewhere in start-up (imports, Milvus, workers)
        else:
            # after a random number of Triton batches, then a random extra delay: mid-pipeline
            target = start + 8 * rng.randint(1, 3)
            deadline = time.monotonic() + 60
            while inferences(triton) < target and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)  # each poll is a /metrics scrape
            time.sleep(rng.uniform(0, 0.2))
        children = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        assert proc.poll() is None, f"run {attempt} finished before the kill:\n{proc.communicate()}"
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        gone, alive = psutil.wait_procs(children, timeout=5)
        assert not alive, f"decode workers outlived the killed indexer: {alive}"
        stored = entries_and_check(uri, dataset.root) if Path(uri).exists() else {}
        assert set(stored) <= set(dataset.valid.values())
        counts.append(len(stored))
    assert counts[-1] > 0 and any(0 < c < total for c in counts), counts

    last = index_cli(dataset.root)  # in this process: a plain run, nothing to kill
    assert last.rc == 0, last.err
    final = last.report
    assert final["unchanged"] == counts[-1] and final["indexed"] == total - counts[-1]
    stored = entries_and_check(uri, dataset.root)
    assert stored == {cid: rel for rel, cid in dataset.valid.items()}  # exact: nothing lost, nothing twice


# --- Triton dies mid-index --------------------------------------------------------------
def test_triton_dying_mid_index_stops_cleanly_and_resumes(dataset, env, repo18, triton, tmp_path, spawn_index,
                                                         index_cli):
    uri = env["IMGSEARCH_MILVUS_URI"]
    total = len(dataset.valid)
    server = LocalTriton(repo18, "cpu", exit_timeout_s=2)
    with server:
        run_env = env | {"IMGSEARCH_TRITON_URL": server.grpc_url}
        proc = spawn_index(dataset.root, run_env, "--batch-size", "8", "--retry-for", "3", cwd=tmp_path)
        deadline = time.monotonic() + 60
        while inferences(server) < 24 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # each poll is a /metrics scrape
        assert proc.poll() is None, proc.communicate()
        server.kill()
        t_kill = time.monotonic()
        out, err = proc.communicate(timeout=90)
        waited = time.monotonic() - t_kill
    assert proc.returncode == 1, (out, err)
    assert "retry" in err and "Triton" in err, err  # it retried with backoff ...
    assert "stopped" in err and "re-run" in err, err  # ... then stopped with a clear message
    assert waited >= 2.5, waited  # the retry window (3 s) was used, not an instant crash
    assert "STOPPED:" in out
    kept = entries_and_check(uri, dataset.root)
    assert 0 < len(kept) < total  # what was upserted stays

    # Triton is back (the session's server: the same model, another process, as after a restart)
    again = index_cli(dataset.root)
    assert again.rc == 0, again.err
    resumed = again.report
    assert resumed["unchanged"] == len(kept) and resumed["indexed"] == total - len(kept)
    assert entries_and_check(uri, dataset.root) == {cid: rel for rel, cid in dataset.valid.items()}


def test_unreachable_triton_fails_fast_with_a_clear_message(dataset, env, index_cli, settings_env):
    from imgsearch.triton_server import free_port

    settings_env.setenv("IMGSEARCH_TRITON_URL", f"127.0.0.1:{free_port()}")
    run = index_cli(dataset.root, "--retry-for", "1", "--limit", "5")
    assert run.rc == 1
    assert "has no ready model" in run.err and "IMGSEARCH_TRITON_URL" in run.err
    assert run.report["indexed"] == 0
    release_lite(env["IMGSEARCH_MILVUS_URI"])


# --- formats ----------------------------------------------------------------------------
def test_unusual_formats_are_indexed(env, index_cli, tmp_path):
    root = tmp_path / "formats"
    base = shape_image(3, 7, 120)
    exif = Image.Exif()
    exif[0x0112] = 6
    a16 = (np.asarray(base.convert("L"), np.uint16) * 257).astype(np.uint16)
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 120, dtype=np.uint8), (120, 1))))
    frames = [shape_image(c, 1, 80).convert("P") for c in (1, 2, 3)]
    files = {
        "cmyk.jpg": image_bytes(base.convert("CMYK"), "JPEG", quality=90),
        "grey16.png": image_bytes(Image.fromarray(a16), "PNG"),
        "rgba.png": png_bytes(rgba),
        "palette.gif": image_bytes(base.convert("P", palette=Image.Palette.ADAPTIVE), "GIF"),
        "animated.gif": image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50),
        "photo.webp": image_bytes(base, "WEBP", quality=85),
        "exif_rotated.jpg": image_bytes(base, "JPEG", quality=90, exif=exif.tobytes()),
        "bitmap.bmp": image_bytes(base, "BMP"),
        "plain.jpg": jpeg_bytes(base),
    }
    (root / "odd").mkdir(parents=True)
    for name, data in files.items():
        (root / "odd" / name).write_bytes(data)
    run = index_cli(root)
    assert run.rc == 0 and run.report["failed"] == {}, run.report["failed"]
    assert run.report["indexed"] == len(files)
    store = open_store(env["IMGSEARCH_MILVUS_URI"])
    try:
        assert store.count() == len(files)
        assert {e.label for e in store.iter_entries()} == {"odd"}
    finally:
        store.close()
        release_lite(env["IMGSEARCH_MILVUS_URI"])


# --- --sync, duplicates, moves, and the collection guard ------------------------------
def test_sync_duplicates_and_moves(env, index_cli, tmp_path, monkeypatch):
    uri = env["IMGSEARCH_MILVUS_URI"]
    root = tmp_path / "sync"
    for c in range(3):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(4):
            (root / f"c{c}" / f"{i}.jpg").write_bytes(jpeg_bytes(shape_image(c, 50 + i)))
    shutil.copy(root / "c0" / "0.jpg", root / "c2" / "copy_of_c0_0.jpg")  # same bytes, other folder
    ids = {p.relative_to(root).as_posix(): content_id(p.read_bytes()) for p in root.rglob("*.jpg")}

    run = index_cli(root)
    assert run.rc == 0 and (run.report["indexed"], run.report["duplicates"]) == (12, 1)

    def entries():
        store = open_store(uri)
        try:
            return {e.id: (e.path, e.label) for e in store.iter_entries()}
        finally:
            store.close()

    assert entries()[ids["c0/0.jpg"]] == ("c0/0.jpg", "c0")  # sorted order: the first copy wins

    # a rename is noticed without --sync: same content, entry re-pointed, nothing re-encoded
    (root / "c1" / "1.jpg").rename(root / "c1" / "renamed.jpg")
    run = index_cli(root)
    assert (run.report["indexed"], run.report["moved"]) == (0, 1)
    assert entries()[ids["c1/1.jpg"]] == ("c1/renamed.jpg", "c1")

    # c0/0.jpg gets other bytes (its old content lives on in c2's copy), c1/2.jpg is deleted
    (root / "c0" / "0.jpg").write_bytes(jpeg_bytes(shape_image(0, 999)))
    new_id = content_id((root / "c0" / "0.jpg").read_bytes())
    (root / "c1" / "2.jpg").unlink()
    run = index_cli(root)
    assert (run.report["indexed"], run.report["deleted"]) == (1, 0) and len(entries()) == 13

    # --sync: content no longer under the root goes; the entry whose path now holds other
    # bytes is re-pointed to the live copy instead of being deleted
    run = index_cli(root, "--sync")
    assert run.rc == 0, run.err
    assert (run.report["indexed"], run.report["deleted"], run.report["repointed"]) == (0, 1, 1), run.report
    now = entries()
    assert len(now) == 12 and ids["c1/2.jpg"] not in now
    assert now[ids["c0/0.jpg"]] == ("c2/copy_of_c0_0.jpg", "c2")
    assert now[new_id] == ("c0/0.jpg", "c0")
    assert "sync: deleted 1 entries" in run.out

    # the last copy goes: without --sync the entry stays, with it the content is deleted
    (root / "c2" / "copy_of_c0_0.jpg").unlink()
    assert index_cli(root).report["deleted"] == 0 and len(entries()) == 12
    run = index_cli(root, "--sync")
    assert run.report["deleted"] == 1 and ids["c0/0.jpg"] not in entries() and len(entries()) == 11

    assert index_cli(root, "--sync", "--limit", "3").rc == 2  # refused: would delete the rest

    # a folder that cannot be listed looks like deleted files: --sync must then delete nothing
    import os

    import imgsearch.indexer.scan as scan_mod

    real_walk = os.walk

    def walk(top, onerror=None, followlinks=False):
        onerror(PermissionError(13, "Permission denied", str(root / "c1")))
        for dirpath, dirnames, filenames in real_walk(top, followlinks=followlinks):
            if Path(dirpath) != root / "c1":
                yield dirpath, [d for d in dirnames if d != "c1"], filenames

    monkeypatch.setattr(scan_mod.os, "walk", walk)
    run = index_cli(root, "--sync")
    assert run.rc == 0 and run.report["deleted"] == 0 and "--sync skipped" in run.out
    assert len(entries()) == 11
    release_lite(uri)


def test_collection_guard_refuses_another_model(env, index_cli, repo18, tmp_path, settings_env, dataset):
    uri = env["IMGSEARCH_MILVUS_URI"]
    assert index_cli(dataset.root, "--limit", "6").rc == 0

    other = tmp_path / "other_repo"
    shutil.copytree(repo18, other, ignore=shutil.ignore_patterns("*.onnx"))
    card_path = other / MODEL / "model_card.json"
    card = json.loads(card_path.read_text())
    card["model_sha"] = "0123456789abcdef"
    card_path.write_text(json.dumps(card))
    settings_env.setenv("IMGSEARCH_MODEL_REPOSITORY", str(other))
    run = index_cli(dataset.root, "--limit", "6")
    assert run.rc == 1 and "--recreate" in run.err and "another model" in run.err, run.err

    # --recreate starts over under the new card (Triton serves the same 512-d graph here)
    run = index_cli(dataset.root, "--limit", "6", "--recreate")
    # the first 6 files by path: class_0/empty.jpg and five images
    assert run.rc == 0 and (run.report["indexed"], run.report["unchanged"], run.report["failed_count"]) == (5, 0, 1)

    # a card whose dim disagrees with what Triton returns is caught before anything is written
    card["embedding_dim"] = 256
    card_path.write_text(json.dumps(card))
    run = index_cli(dataset.root, "--limit", "6", "--recreate")
    assert run.rc == 1 and "512-d embeddings but the model card says 256" in run.err, run.err
    assert run.report["indexed"] == 0
    release_lite(uri)
