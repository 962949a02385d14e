"""The pipeline's failure handling with scripted fakes of Triton and Milvus (real decode workers).

The integration tests kill the real Triton; here the rarer paths are forced exactly:
a full queue that clears, Milvus failing mid-run, Triton never coming back, a wrong dim.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from harness.data import make_dataset
from imgsearch.errors import StoreUnavailable, TritonOverloaded, TritonUnavailable
from imgsearch.indexer.pipeline import Indexer, IndexOptions
from imgsearch.indexer.scan import scan
from imgsearch.store import Entry
from imgsearch.triton_client import Encoded

DIM = 8


class FakeEncoder:
    url = "fake:1"
    model_name = "resnet152"

    def __init__(self, failures=(), dim=DIM, ready=True):
        self.failures = list(failures)  # exception (or None) per call, then success
        self.calls = 0
        self.dim = dim
        self.ready = ready

    async def is_ready(self) -> bool:
        return self.ready

    async def encode(self, pixels: np.ndarray) -> Encoded:
        self.calls += 1
        await asyncio.sleep(0)
        if self.failures:
            err = self.failures.pop(0)
            if err is not None:
                raise err
        v = pixels.reshape(len(pixels), -1)[:, : self.dim].astype(np.float32) + 1
        return Encoded(v / np.linalg.norm(v, axis=1, keepdims=True), None)

    async def close(self) -> None:
        pass


class FakeStore:
    uri = "fake.db"
    collection = "images"

    def __init__(self, fail_on_upsert: int | None = None):
        self.rows = {}
        self.upserts = 0
        self.fail_on_upsert = fail_on_upsert
        self.builds: list[int] = []  # rows held at each build_index

    def build_index(self):
        self.builds.append(len(self.rows))
        return {"index_type": "HNSW", "indexed_rows": len(self.rows), "total_rows": len(self.rows)}

    def existing(self, ids):
        return {i: self.rows[i].path for i in ids if i in self.rows}

    def upsert(self, rows, bulk=False):
        self.upserts += 1
        if self.fail_on_upsert is not None and self.upserts >= self.fail_on_upsert:
            raise StoreUnavailable("Milvus (fake.db) failed during upsert: connection refused")
        for r in rows:
            self.rows[r.id] = r
        return len(rows)

    def get(self, id_, with_embedding=False):
        r = self.rows[id_]
        return Entry(r.id, r.path, r.label, r.embedding)

    def iter_entries(self):
        return iter([Entry(r.id, r.path, r.label) for r in self.rows.values()])

    def delete(self, ids):
        for i in ids:
            self.rows.pop(i, None)
        return len(ids)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    make_dataset(root, classes=3, per_class=8)
    return scan(root)


def run(store, encoder, found, **opts):
    options = IndexOptions(batch_size=4, workers=1, in_flight=2, progress=False, **opts)
    return asyncio.run(Indexer(store, encoder, DIM, options).run(found))


def test_full_queue_is_retried_with_backoff(images):
    enc = FakeEncoder([TritonOverloaded("queue full"), TritonOverloaded("queue full")])
    store = FakeStore()
    rep = run(store, enc, images)
    assert rep.aborted is None and rep.indexed == 24 == len(store.rows)
    assert enc.calls == 6 + 2  # 6 batches, 2 of the calls were refused and retried


def test_queue_full_for_too_long_stops_with_advice(images):
    enc = FakeEncoder([TritonOverloaded("queue full")] * 100)
    rep = run(FakeStore(), enc, images, retries=2)
    assert rep.indexed == 0 and "lower --in-flight or --batch-size" in rep.aborted


def test_milvus_failing_mid_run_stops_and_keeps_what_was_written(images):
    store = FakeStore(fail_on_upsert=2)
    rep = run(store, FakeEncoder(), images)
    assert rep.aborted.startswith("Milvus (fake.db) failed during upsert")
    assert rep.indexed == len(store.rows) > 0  # counted only what the store accepted
    assert store.upserts == 2  # nothing more was tried once Milvus was gone
    assert rep.scanned - rep.done > 0


def test_triton_gone_is_retried_until_the_deadline(images):
    # two batches go through, then Triton is gone for good
    enc = FakeEncoder([None, None] + [TritonUnavailable("connection refused")] * 1000)
    store = FakeStore()
    rep = run(store, enc, images, unavailable_timeout_s=0.6)
    assert "still failing after retrying" in rep.aborted
    assert "connection refused" in rep.aborted
    assert rep.indexed == len(store.rows) == 8  # the encoded batches were still upserted
    assert enc.calls > 4  # retried, not given up at the first error


def test_triton_with_another_dim_is_caught_before_writing(images):
    store = FakeStore()
    rep = run(store, FakeEncoder(dim=DIM + 1), images)
    assert "model card says 8" in rep.aborted and rep.indexed == 0 and not store.rows


def test_unchanged_files_are_not_decoded_or_encoded(images):
    store = FakeStore()
    run(store, FakeEncoder(), images)
    enc = FakeEncoder()
    rep = run(store, enc, images)
    assert (rep.indexed, rep.unchanged, enc.calls, rep.stages_s["decode"]) == (0, 24, 0, 0.0)


def test_triton_needed_only_when_something_must_be_encoded(images):
    store = FakeStore()
    run(store, FakeEncoder(), images)
    rep = run(store, FakeEncoder(ready=False), images, unavailable_timeout_s=0.3)
    assert rep.aborted is None and rep.unchanged == 24  # nothing new: a down Triton does not matter
    rep = run(FakeStore(), FakeEncoder(ready=False), images, unavailable_timeout_s=0.3)
    assert "has no ready model 'resnet152'" in rep.aborted and rep.indexed == 0


# --- bytes mode (IMGSEARCH_TRITON_INPUT=bytes): files to the ensemble, undecoded ----------------


class FakeBytesEncoder(FakeEncoder):
    """A Triton with the ensemble: a file without a JPEG end marker fails its whole request."""

    ensemble_name = "image_search"

    def __init__(self, problem=None, gone_after_split=False, **kw):
        super().__init__(**kw)
        self.problem = problem
        self.gone_after_split = gone_after_split
        self.requests: list[int] = []  # files per encode_bytes call

    async def bytes_path_problem(self, max_pixels: int):
        return self.problem

    async def encode_bytes(self, blobs):
        from imgsearch.errors import CorruptImage

        self.requests.append(len(blobs))
        await asyncio.sleep(0)
        if self.gone_after_split and len(blobs) == 1:
            raise TritonUnavailable("connection refused")
        bad = [i for i, b in enumerate(blobs) if not b.endswith(b"\xff\xd9")]
        if bad:
            raise CorruptImage(f"image {bad[0] + 1} of {len(blobs)}: truncated")
        v = np.stack([np.frombuffer(b[-DIM - 2:-2], np.uint8) for b in blobs]).astype(np.float32) + 1
        return Encoded(v / np.linalg.norm(v, axis=1, keepdims=True), None)


@pytest.fixture
def with_bad(tmp_path):
    from harness.data import truncated_jpeg

    make_dataset(tmp_path, classes=2, per_class=3)
    (tmp_path / "n00000000-class_0" / "img_0001b.jpg").write_bytes(truncated_jpeg())
    (tmp_path / "n00000001-class_1" / "notes.jpg").write_bytes(b"plain text")
    return scan(tmp_path)


def test_bytes_mode_retries_a_refused_batch_one_file_at_a_time(with_bad):
    enc, store = FakeBytesEncoder(), FakeStore()
    rep = run(store, enc, with_bad, triton_input="bytes")
    assert rep.aborted is None and rep.indexed == 6 == len(store.rows)
    assert enc.calls == 0  # nothing decoded here, nothing sent as pixels
    assert rep.settings["triton_input"] == "bytes"
    assert {c: [p for p, _ in v] for c, v in rep.failed.items()} == {
        "undecodable_image": ["n00000000-class_0/img_0001b.jpg"],  # found by "Triton"
        "unsupported_media_type": ["n00000001-class_1/notes.jpg"],  # refused by content in the worker
    }
    # [img_0000, img_0001, img_0001b, img_0002] refused, then 4 single requests; [img_0000.., ] fine
    assert rep.split_batches == 1 and enc.requests.count(1) == 4 and enc.requests.count(4) == 1
    assert rep.batches == 3 + 1  # the singles that went through + the clean batch of 3


def test_bytes_mode_triton_gone_during_the_retry_stops_the_run(with_bad):
    enc = FakeBytesEncoder(gone_after_split=True)
    rep = run(FakeStore(), enc, with_bad, triton_input="bytes", unavailable_timeout_s=0.3)
    assert "still failing after retrying" in rep.aborted
    assert "undecodable_image" not in rep.failed  # no file blamed for Triton being gone


def test_bytes_mode_without_a_usable_ensemble_decodes_here(with_bad):
    enc = FakeBytesEncoder(problem="Triton has no ready ensemble 'image_search'")
    rep = run(FakeStore(), enc, with_bad, triton_input="bytes")
    assert rep.indexed == 6 and enc.requests == [] and enc.calls > 0
    assert rep.settings["triton_input"] == "pixels"
    assert rep.settings["triton_input_fallback"] == "Triton has no ready ensemble 'image_search'"


def test_a_run_ends_with_the_index_built_over_every_row_and_a_dead_store_skips_it(images):
    store = FakeStore()
    rep = run(store, FakeEncoder(), images)
    assert rep.indexed > 0 and store.builds == [len(store.rows)]  # once, after the last upsert
    assert rep.settings["index"]["indexed_rows"] == len(store.rows) and rep.stages_s["index"] >= 0
    dead = FakeStore(fail_on_upsert=1)
    rep = run(dead, FakeEncoder(), images)
    assert rep.aborted and dead.builds == []
