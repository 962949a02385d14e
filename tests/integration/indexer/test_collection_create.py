"""Creating the collection is crash-safe: a kill at any point leaves no collection without its model.

Against the real Milvus Lite. The killed process is a real one, SIGKILLed by itself the moment
Milvus has answered the create request: the worst point for a create done in two calls.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness.indexer import release_lite
from imgsearch.errors import CollectionMismatch, StoreUnavailable
from imgsearch.store import (
    LITE_COLLECTIONS_DIR,
    LITE_SCHEMA_FILE,
    PROP_DIM,
    PROP_MODEL,
    PROP_SHA,
    Row,
    VectorStore,
    collection_schema,
)

pytestmark = pytest.mark.integration
DIM = 8

DIE_AFTER_CREATE = """
import os, signal, sys
from pymilvus import MilvusClient

create = MilvusClient.create_collection

def create_then_die(self, *args, **kwargs):
    create(self, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)

MilvusClient.create_collection = create_then_die
from imgsearch.store import VectorStore
VectorStore(sys.argv[1], "images").open(int(sys.argv[2]), "sha-a", "model a")
"""


def _raw_create_without_properties(uri: str) -> None:
    """What a creator killed between a create call and a separate set-properties call leaves
    (the store sends the properties with the create; an older collection may lack them)."""
    from pymilvus import MilvusClient

    c = MilvusClient(uri)
    schema, index = collection_schema(c, DIM)
    c.create_collection("images", schema=schema, index_params=index, consistency_level="Strong")
    c.close()


def test_killed_right_after_create_leaves_a_usable_collection(tmp_path: Path):
    uri = str(tmp_path / "milvus.db")
    proc = subprocess.run([sys.executable, "-c", DIE_AFTER_CREATE, uri, str(DIM)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]  # it really died right after creating
    store = VectorStore(uri, "images")
    try:
        assert store.exists()
        props = store.properties()
        assert (props.get(PROP_DIM), props.get(PROP_SHA), props.get(PROP_MODEL)) == (str(DIM), "sha-a", "model a")
        store.open(DIM, "sha-a")  # the next run opens it as its own
        with pytest.raises(CollectionMismatch):
            store.open(DIM, "sha-b")  # and the guard still tells models apart
    finally:
        store.close()
        release_lite(uri)


def test_half_created_empty_collection_is_finished_a_filled_one_refused(tmp_path: Path):
    uri = str(tmp_path / "milvus.db")
    _raw_create_without_properties(uri)
    store = VectorStore(uri, "images")
    try:
        store.open(DIM, "sha-a", "model a")
        assert store.properties()[PROP_SHA] == "sha-a" and store.properties()[PROP_DIM] == str(DIM)
        store.upsert([Row(1, "a/x.jpg", "a", [1.0] + [0.0] * (DIM - 1))])
        assert store.count() == 1
    finally:
        store.close()
        release_lite(uri)

    # entries without model properties: whose they are is unknown, so nothing is assumed
    uri2 = str(tmp_path / "filled.db")
    _raw_create_without_properties(uri2)
    store = VectorStore(uri2, "images")
    try:
        store._call("insert", lambda c: c.insert("images", [Row(1, "a/x.jpg", "a", [1.0] * DIM).to_dict()]))
        with pytest.raises(CollectionMismatch):
            store.open(DIM, "sha-a")
        assert PROP_SHA not in store.properties()
    finally:
        store.close()
        release_lite(uri2)


def lite_with_a_stray_folder(tmp_path: Path) -> tuple[str, Path]:
    """A Milvus Lite .db holding a collection, and an empty folder where "images" would be."""
    from milvus_lite.db import COLLECTIONS_DIRNAME

    uri = str(tmp_path / "milvus.db")
    other = VectorStore(uri, "other")
    try:
        other.open(DIM, "sha-a")
    finally:
        other.close()
        release_lite(uri)
    folder = Path(uri) / COLLECTIONS_DIRNAME / "images"
    folder.mkdir()
    return uri, folder


def test_a_create_killed_before_its_schema_was_written_is_created_again(tmp_path: Path):
    """Milvus Lite makes the collection's folder, then writes its schema through a temporary
    file: killed while that file is synced, it leaves a folder that Lite does not list and
    refuses to create over."""
    from milvus_lite.db import COLLECTIONS_DIRNAME, SCHEMA_FILENAME

    assert (LITE_COLLECTIONS_DIR, LITE_SCHEMA_FILE) == (COLLECTIONS_DIRNAME, SCHEMA_FILENAME)  # the store's copy
    uri, folder = lite_with_a_stray_folder(tmp_path)
    (folder / (SCHEMA_FILENAME + ".tmp")).write_text('{"collection_name": "ima')  # cut short mid-write
    store = VectorStore(uri, "images")
    try:
        assert not store.exists()
        store.open(DIM, "sha-a", "model a")
        assert store.properties()[PROP_SHA] == "sha-a"
        store.upsert([Row(1, "a/x.jpg", "a", [1.0] + [0.0] * (DIM - 1))])
        assert store.count() == 1
    finally:
        store.close()
        release_lite(uri)


def test_a_collection_folder_holding_more_than_a_cut_short_schema_is_left_alone(tmp_path: Path):
    uri, folder = lite_with_a_stray_folder(tmp_path)
    (folder / "someone-elses.bin").write_bytes(b"x")
    store = VectorStore(uri, "images")
    try:
        with pytest.raises(StoreUnavailable, match="create_collection.*File exists"):
            store.open(DIM, "sha-a")
        assert (folder / "someone-elses.bin").exists()
    finally:
        store.close()
        release_lite(uri)
