"""Helpers shared by the indexer tests (plain functions; the fixtures are in conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from harness.stack import clean_env, release_lite
from imgsearch.store import VectorStore, content_id


def subprocess_index(root: Path, env: dict[str, str], *options: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "imgsearch.cli", "index", str(root), "--no-progress", *options],
        env=clean_env(env), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)


def index_in_process(root: Path, env: dict[str, str], *options: str) -> int:
    """``imgsearch index`` in this process with the settings :func:`subprocess_index` gives a
    process (saves a process start: seconds of imports on a loaded box)."""
    from unittest import mock

    from imgsearch.cli import main

    with mock.patch.dict(os.environ, clean_env(env), clear=True):
        return main(["index", str(root), "--no-progress", *options])


def open_store(uri: str, collection: str = "images") -> VectorStore:
    store = VectorStore(uri, collection)
    props = store.properties()
    store.open(int(props["imgsearch.dim"]), props["imgsearch.model_sha"])
    return store


def entries_and_check(uri: str, root: Path, collection: str = "images") -> dict[int, str]:
    """All entries; asserts no duplicate id and that each entry's id is its file's content hash."""
    if not Path(uri).exists():
        return {}
    store = VectorStore(uri, collection)
    try:
        if not store.exists():
            return {}
        props = store.properties()
        store.open(int(props["imgsearch.dim"]), props["imgsearch.model_sha"])
        entries = list(store.iter_entries())
        count = store.count()
    finally:
        store.close()
        release_lite(uri)
    ids = [e.id for e in entries]
    assert len(ids) == len(set(ids)) == count, (len(ids), len(set(ids)), count)
    for e in entries:
        assert content_id((root / e.path).read_bytes()) == e.id, f"{e.path}: id is not its content hash"
        assert e.label == e.path.split("/")[0].split("-", 1)[1], e
    return {e.id: e.path for e in entries}
