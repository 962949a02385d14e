"""Messy folders against the real tritonserver, Milvus Lite and uvicorn: a name Milvus cannot
store costs that one file, never the run; labels come back exactly as the folders spell them.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from harness.data import jpeg_bytes, make_dataset, shape_image
from harness.indexer import release_lite
from harness.stack import gateway_env, start_gateway
from imgsearch.labels import label_folder
from imgsearch.model_card import read_card
from imgsearch.store import (
    LABEL_MAX,
    PROP_DIM,
    PROP_SHA,
    VectorStore,
    collection_schema,
)

pytestmark = pytest.mark.integration
MODEL = "resnet152"
API_KEY = "messy-key-0123456789"
ODD_LABELS = ["柴犬", 'say "hi"', "back\\slash"]
# labels no folder name reads back as: stored under <slug>-<hash>/ with a label file
SLUG_LABELS = ["a/b", ".hid", "n12345678-x"]


def _entries(uri: str) -> dict[str, str]:
    """path -> label of every entry."""
    store = VectorStore(uri, "images")
    try:
        props = store.properties()
        store.open(int(props[PROP_DIM]), props[PROP_SHA])
        return {e.path: e.label for e in store.iter_entries()}
    finally:
        store.close()
        release_lite(uri)


def _failed(report: dict) -> dict[str, tuple[str, str]]:
    return {path: (code, msg) for code, items in report["failed"].items() for path, msg in items}


def _messy_root(root: Path) -> tuple[set[str], dict[str, str]]:
    """Good files (rel paths), and the files Milvus must refuse (printable rel -> why)."""
    good = {p.relative_to(root).as_posix() for p in make_dataset(root, classes=2, per_class=4, seed=7)}
    for k, label in enumerate(ODD_LABELS):
        (root / label).mkdir()
        (root / label / "a.jpg").write_bytes(jpeg_bytes(shape_image(k, 9000 + k)))
        good.add(f"{label}/a.jpg")
    # a folder named in latin-1, as old zip archives unpack: not valid UTF-8
    latin = os.fsencode(root) + b"/caf\xe9"
    os.mkdir(latin)
    for i in range(2):
        with open(latin + f"/img_{i}.jpg".encode(), "wb") as f:
            f.write(jpeg_bytes(shape_image(3, 9100 + i)))
    # 5 folders of 80 three-byte characters: 400 characters (Lite would take them), 1 206 bytes
    deep = root.joinpath(*["柴" * 80] * 5)
    deep.mkdir(parents=True)
    (deep / "x.jpg").write_bytes(jpeg_bytes(shape_image(4, 9200)))
    refused = {"caf\\xe9/img_0.jpg": "not valid UTF-8", "caf\\xe9/img_1.jpg": "not valid UTF-8",
               "/".join(["柴" * 80] * 5) + "/x.jpg": "bytes in UTF-8, over Milvus' limit of 1024"}
    return good, refused


def test_unstorable_names_cost_one_file_and_labels_survive_index_recreate_sync(env, index_cli, tmp_path):
    uri = env["IMGSEARCH_MILVUS_URI"]
    root = tmp_path / "messy"
    good, refused = _messy_root(root)

    first = index_cli(root)
    assert first.rc == 0, first.err
    assert first.report["aborted"] is None and first.report["indexed"] == len(good)
    failed = _failed(first.report)
    assert set(failed) == set(refused), failed
    for path, why in refused.items():
        assert failed[path][0] == "entry_refused" and why in failed[path][1], failed[path]
    stored = _entries(uri)
    assert set(stored) == good  # nothing cut short to fit: every stored path is a real file
    for label in ODD_LABELS:
        assert stored[f"{label}/a.jpg"] == label

    # the label filter finds each odd label as itself
    store = VectorStore(uri, "images")
    try:
        props = store.properties()
        store.open(int(props[PROP_DIM]), props[PROP_SHA])
        emb = store.get(next(iter(store.iter_entries())).id, with_embedding=True).embedding
        for label in ODD_LABELS:
            hits = store.search(emb, top_k=5, label=label)[0]
            assert [(h.path, h.label) for h in hits] == [(f"{label}/a.jpg", label)]
    finally:
        store.close()
        release_lite(uri)

    again = index_cli(root, "--recreate")
    assert again.rc == 0 and again.report["indexed"] == len(good), again.err
    assert _entries(uri) == stored

    (root / "n00000000-class_0" / "img_0000.jpg").unlink()
    synced = index_cli(root, "--sync")
    assert synced.rc == 0 and synced.report["deleted"] == 1, synced.err
    assert _entries(uri) == {p: lab for p, lab in stored.items() if p != "n00000000-class_0/img_0000.jpg"}


def _narrow_collection(uri: str, repo: Path, path_max: int = 1024, label_max: int = LABEL_MAX) -> None:
    """This model's collection, but with narrower VARCHAR fields: Milvus itself refuses rows."""
    from pymilvus import MilvusClient

    card = read_card(repo, MODEL)
    c = MilvusClient(uri)
    schema, index = collection_schema(c, card.embedding_dim, path_max, label_max)
    c.create_collection("images", schema=schema, index_params=index, consistency_level="Strong",
                        properties={PROP_SHA: card.model_sha, PROP_DIM: str(card.embedding_dim)})
    c.close()
    release_lite(uri)


def test_a_batch_milvus_refuses_is_retried_row_by_row(env, index_cli, repo18, tmp_path):
    uri = env["IMGSEARCH_MILVUS_URI"]
    _narrow_collection(uri, repo18, path_max=40)
    root = tmp_path / "imgs"
    good = {p.relative_to(root).as_posix() for p in make_dataset(root, classes=2, per_class=6, seed=8)}
    long_dir = root / ("x" * 50)
    long_dir.mkdir()
    for i in range(2):
        (long_dir / f"{i}.jpg").write_bytes(jpeg_bytes(shape_image(2, 9300 + i)))

    run = index_cli(root, "--batch-size", "16")  # all 14 files in one batch and one upsert
    assert run.rc == 0, run.err
    assert run.report["aborted"] is None and run.report["indexed"] == len(good)
    failed = _failed(run.report)
    assert set(failed) == {f"{'x' * 50}/{i}.jpg" for i in range(2)}
    assert all(code == "entry_refused" and "Milvus refused" in msg for code, msg in failed.values()), failed
    assert set(_entries(uri)) == good


def test_api_labels_survive_reindex_and_a_refused_entry_is_422(repo18, triton, tmp_path, index_cli, settings_env):
    root = tmp_path / "images"
    root.mkdir()
    db = tmp_path / "api.db"
    _narrow_collection(str(db), repo18, label_max=12)
    gw = start_gateway(gateway_env(repo18, triton.grpc_url, db, root, api_key=API_KEY), log_path=tmp_path / "gw.log")
    auth = {"Authorization": f"Bearer {API_KEY}"}
    added = {}
    try:
        with httpx.Client(base_url=gw.url, timeout=60) as c:
            for k, label in enumerate(ODD_LABELS):
                data = jpeg_bytes(shape_image(k, 9400 + k))
                r = c.post("/v1/images", files={"file": ("a.jpg", data, "image/jpeg"), "label": (None, label)},
                           headers=auth)
                assert r.status_code == 201, r.text
                assert r.json()["label"] == label and r.json()["path"].split("/")[0] == label
                added[r.json()["path"]] = label
                hits = c.post("/v1/search", files={"file": ("q.jpg", data, "image/jpeg"), "label": (None, label)})
                assert [h["label"] for h in hits.json()["results"]] == [label]
            for k, label in enumerate(SLUG_LABELS):
                data = jpeg_bytes(shape_image(k, 9450 + k))
                r = c.post("/v1/images", files={"file": ("a.jpg", data, "image/jpeg"), "label": (None, label)},
                           headers=auth)
                assert r.status_code == 201, r.text
                folder = r.json()["path"].split("/")[0]
                assert r.json()["label"] == label and folder == label_folder(label) != label
                added[r.json()["path"]] = label
            # a label spelled as another label's folder: that folder is the other label's
            taken = label_folder(SLUG_LABELS[0])
            r = c.post("/v1/images", files={"file": ("a.jpg", jpeg_bytes(shape_image(4, 9460)), "image/jpeg"),
                                            "label": (None, taken)}, headers=auth)
            assert r.status_code == 409 and r.json()["error"]["code"] == "path_conflict", r.text
            # over the label field of this collection: Milvus refuses the row; the client's fault
            data = jpeg_bytes(shape_image(3, 9500))
            r = c.post("/v1/images", files={"file": ("a.jpg", data, "image/jpeg"), "label": (None, "a" * 20)},
                       headers=auth)
            assert r.status_code == 422 and r.json()["error"]["code"] == "entry_refused", r.text
            # what to do, in the gateway's words; Milvus's own text only in the log
            assert "shorter label" in r.json()["error"]["message"], r.text
            leaked = [s for s in ("Milvus refused", "MilvusException", "<", "code=") if s in r.text]
            assert not leaked, (leaked, r.text)
            assert "422 entry_refused: Milvus refused the entry: <MilvusException" in gw.log_text()
            # over 256 bytes (90 characters): refused before Milvus, whatever Milvus counts
            r = c.post("/v1/images", files={"file": ("a.jpg", data, "image/jpeg"), "label": (None, "柴" * 90)},
                       headers=auth)
            assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", r.text
            assert "bytes" in r.json()["error"]["message"]
    finally:
        gw.stop()
    assert {p.relative_to(root).as_posix() for p in root.rglob("*.jpg")} == set(added)  # no orphan file

    # the files the API stored, indexed afresh: each label read back from its folder unchanged
    settings_env.setenv("IMGSEARCH_TRITON_URL", triton.grpc_url)
    settings_env.setenv("IMGSEARCH_MODEL_REPOSITORY", str(repo18))
    settings_env.setenv("IMGSEARCH_MILVUS_URI", str(tmp_path / "fresh.db"))
    run = index_cli(root, "--recreate")
    assert run.rc == 0 and run.report["indexed"] == len(ODD_LABELS) + len(SLUG_LABELS), run.err
    assert _entries(str(tmp_path / "fresh.db")) == added
