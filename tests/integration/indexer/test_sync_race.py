"""``index --sync`` and ``POST /v1/images`` at the same time, against the real tritonserver, a
Milvus server (milvus-lite's server mode, shared by both) and uvicorn.

The race is made exact rather than timed: the folder is scanned, then an image is added through
the API, then the run (indexing and --sync) goes on from that scan, which is the window a run
in production has between listing the folder and judging its entries.
"""

from __future__ import annotations

import httpx
import pytest

from harness.data import jpeg_bytes, make_dataset, shape_image
from harness.indexer import open_store
from harness.stack import MilvusServer, gateway_env, start_gateway
from imgsearch.indexer.pipeline import IndexOptions, run_index
from imgsearch.indexer.scan import scan
from imgsearch.model_card import read_card
from imgsearch.store import VectorStore, content_id
from imgsearch.triton_client import TritonEncoder

pytestmark = pytest.mark.integration
MODEL = "resnet152"
API_KEY = "sync-key-0123456789"


def _index(uri: str, root, triton, repo, found, sync: bool):
    """One indexer run in this process, from ``found`` (a scan made earlier) or a fresh scan."""
    card = read_card(repo, MODEL)
    store = VectorStore(uri, "images")
    try:
        store.open(card.embedding_dim, card.model_sha, card.name)
        return run_index(store, TritonEncoder(triton.grpc_url, MODEL), card.embedding_dim,
                         found or scan(root), IndexOptions(workers=1, sync=sync, progress=False))
    finally:
        store.close()


def test_sync_keeps_what_the_api_added_during_the_run(triton, repo18, tmp_path):
    root = tmp_path / "images"
    files = make_dataset(root, classes=2, per_class=4, seed=11)
    milvus = MilvusServer(tmp_path / "milvus-data", log_path=tmp_path / "milvus.log").start()
    gw = None
    try:
        first = _index(milvus.uri, root, triton, repo18, None, sync=False)
        assert first.indexed == len(files) and first.aborted is None

        gone, changed = files[0], files[1]
        old_changed_id = content_id(changed.read_bytes())
        gone_id = content_id(gone.read_bytes())
        gone.unlink()
        changed.write_bytes(jpeg_bytes(shape_image(5, 777)))  # same path, new content

        gw = start_gateway(gateway_env(repo18, triton.grpc_url, milvus.uri, root, api_key=API_KEY))
        found = scan(root)  # the run lists the folder ...
        data = jpeg_bytes(shape_image(6, 888))
        with httpx.Client(base_url=gw.url, timeout=60) as c:  # ... an image arrives through the API ...
            r = c.post("/v1/images", files={"file": ("new.jpg", data, "image/jpeg"), "label": (None, "late")},
                       headers={"Authorization": f"Bearer {API_KEY}"})
            assert r.status_code == 201, r.text
            added = int(r.json()["id"])
            # ... and the run goes on from its listing, then syncs
            rep = _index(milvus.uri, root, triton, repo18, found, sync=True)
            assert rep.aborted is None and rep.indexed == 1  # the changed file's new content
            assert rep.deleted == 2  # the deleted file, and the old content of the changed one
            assert c.get(f"/v1/images/{added}").content == data  # the API's image survived the sync
            for id_ in (gone_id, old_changed_id):
                assert c.get(f"/v1/images/{id_}").status_code == 404
        store = open_store(milvus.uri)
        try:
            stored = {e.id: e.path for e in store.iter_entries()}
        finally:
            store.close()
        want = {content_id(p.read_bytes()): p.relative_to(root).as_posix() for p in root.rglob("*.jpg")}
        assert stored == want  # exactly what is on disk, the upload included
    finally:
        if gw is not None:
            gw.stop()
        milvus.stop()
