"""Dynamic batching in its default mode (IMGSEARCH_SEARCH_BATCH_IDLE_SEND): a batch goes out
as soon as a Milvus call slot is free, so a lone request never waits the window, and the
requests that arrive while the call is busy form the next batch.

The real gateway over a Milvus server (milvus-lite's server mode) holding synthetic vectors;
``similar`` never calls the model, so no Triton runs. The window is set far longer than the
test: a request that waited for it would time the test out. To make "arrive while the call is
busy" exact rather than a matter of timing, the burst is sent while the Milvus server is
paused (SIGSTOP): the first lookup goes out and hangs, and every other request is inside the
gateway (its in-flight gauge says so) before the server resumes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest

from harness.stack import COLLECTION, MODEL, MilvusServer, gateway_env, start_gateway
from harness.vectors import clustered_vectors, fill, vectors_card_repo
from imgsearch.model_card import read_card
from imgsearch.store import VectorStore
from imgsearch.triton_metrics import metric_sum
from imgsearch.triton_server import free_port

pytestmark = pytest.mark.integration

DIM, ROWS, BURST, TOP_K = 64, 400, 12, 5
WINDOW_MS = 10_000


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = tmp_path_factory.mktemp("idle-send")
    repo = vectors_card_repo(base / "repo", MODEL, DIM)
    milvus = MilvusServer(base / "milvus-data", log_path=base / "milvus.log").start()
    gw = None
    try:
        store = VectorStore(milvus.uri, COLLECTION)
        try:
            ids = fill(store, clustered_vectors(ROWS, DIM, seed=5), read_card(repo, MODEL).model_sha, progress=False)
            store.build_index()
        finally:
            store.close()
        # no Triton: the URL is a closed port (similar does not encode)
        gw = start_gateway(gateway_env(repo, f"127.0.0.1:{free_port()}", milvus.uri, base, max_inflight=64,
                                       search_batch_ms=WINDOW_MS, milvus_timeout_s=60),
                           log_path=base / "gateway.log")
        yield gw, milvus, ids
    finally:
        if gw is not None:
            gw.stop()
        milvus.stop()


def _delta(before: str, after: str, name: str, op: str) -> float:
    return metric_sum(after, name, op=op) - metric_sum(before, name, op=op)


def _hits(body: dict) -> list[tuple[int, float]]:
    return [(h["id"], h["score"]) for h in body["results"]]


def test_a_lone_request_goes_out_at_once_and_alone(served):
    gw, _, ids = served
    with httpx.Client(base_url=gw.url, timeout=120) as c:
        before = c.get("/metrics").text
        took = []
        for id_ in ids[:5]:
            t0 = time.monotonic()
            r = c.get(f"/v1/images/{id_}/similar", params={"top_k": TOP_K})
            took.append(time.monotonic() - t0)
            assert r.status_code == 200, r.text
            assert len(r.json()["results"]) == TOP_K
        after = c.get("/metrics").text
    assert max(took) < WINDOW_MS / 1000 / 2, took  # far from the window, whatever the machine's load
    for op in ("get", "search"):
        assert _delta(before, after, "imgsearch_milvus_batch_size_count", op) == 5, op
        assert _delta(before, after, "imgsearch_milvus_batch_size_sum", op) == 5, op
        assert _delta(before, after, "imgsearch_milvus_batch_wait_seconds_sum", op) < 1.0, op


def test_requests_arriving_while_the_call_is_busy_share_the_next_call(served):
    gw, milvus, ids = served
    picked = ids[10:10 + BURST]
    with httpx.Client(base_url=gw.url, timeout=120) as c:
        want = {}
        for id_ in picked:
            r = c.get(f"/v1/images/{id_}/similar", params={"top_k": TOP_K})
            assert r.status_code == 200, r.text
            want[id_] = _hits(r.json())
        before = c.get("/metrics").text

    async def burst_while_paused() -> tuple[list[httpx.Response], str]:
        async with httpx.AsyncClient(base_url=gw.url, timeout=120,
                                     limits=httpx.Limits(max_connections=BURST + 1)) as ac:
            os.kill(milvus.proc.pid, signal.SIGSTOP)
            try:
                tasks = [asyncio.create_task(ac.get(f"/v1/images/{id_}/similar", params={"top_k": TOP_K}))
                         for id_ in picked]
                deadline = time.monotonic() + 60
                while True:
                    inside = metric_sum((await ac.get("/metrics")).text, "imgsearch_inflight_requests")
                    if inside == BURST:
                        break
                    assert time.monotonic() < deadline, f"{inside} of {BURST} requests inside the gateway"
                    assert not any(t.done() for t in tasks), "answered while Milvus is paused"
                    await asyncio.sleep(0.05)
            finally:
                os.kill(milvus.proc.pid, signal.SIGCONT)
            got = await asyncio.gather(*tasks)
            return got, (await ac.get("/metrics")).text

    got, after = asyncio.run(burst_while_paused())
    for id_, r in zip(picked, got):
        assert r.status_code == 200, r.text
        hits = _hits(r.json())
        assert [h for h, _ in hits] == [h for h, _ in want[id_]], id_
        assert all(abs(s - w) <= 1e-5 for (_, s), (_, w) in zip(hits, want[id_])), id_

    # lookups: the first request's call went out alone and hung; the other BURST - 1 waited for
    # the slot and went out together
    assert _delta(before, after, "imgsearch_milvus_batch_size_count", "get") == 2
    assert _delta(before, after, "imgsearch_milvus_batch_size_sum", "get") == BURST
    # searches: the first request's alone; the others' lookups answer at once, so they share one
    # call while the lone search holds the slot, or, if it was free again when the first of them
    # arrived, that one goes alone and the rest share the next (three calls)
    calls = _delta(before, after, "imgsearch_milvus_batch_size_count", "search")
    assert _delta(before, after, "imgsearch_milvus_batch_size_sum", "search") == BURST
    assert 2 <= calls <= 3, calls
