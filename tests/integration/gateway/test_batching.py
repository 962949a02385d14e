"""Dynamic batching over real HTTP: concurrent searches share Milvus calls, each gets its own answer.

Two gateways over copies of one Milvus Lite collection: one with batching off (the answer
each request gets alone), one whose batches go out only when full (a window far longer
than the test, IMGSEARCH_SEARCH_BATCH_MAX = one burst's group size, no send-when-idle), so
how requests were merged is decided by the batcher, not by timing, and is read back from
/metrics.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from harness.gateway import gateway_env, index_folder, label_of, start_gateway
from harness.stack import copy_db
from imgsearch.triton_metrics import metric_sum

pytestmark = pytest.mark.integration

GROUP = 8  # requests per group in a burst = IMGSEARCH_SEARCH_BATCH_MAX of the batching gateway


@pytest.fixture(scope="module")
def pair(gw_data, triton, repo18, tmp_path_factory):
    root = gw_data[0]
    base = tmp_path_factory.mktemp("batching")
    ids = index_folder(root, base / "alone.db", triton.grpc_url, repo18)
    copy_db(base / "alone.db", base / "batched.db")
    alone = start_gateway(gateway_env(repo18, triton.grpc_url, base / "alone.db", root, max_inflight=64,
                                      search_batch_ms=0))
    batched = start_gateway(gateway_env(repo18, triton.grpc_url, base / "batched.db", root, max_inflight=64,
                                        search_batch_ms=10_000, search_batch_max=GROUP,
                                        search_batch_idle_send=False))
    yield alone, batched, root, ids
    alone.stop()
    batched.stop()


def _same_answer(got: dict, want: dict, what: str) -> None:
    assert [(h["id"], h["label"], h["path"]) for h in got["results"]] == \
           [(h["id"], h["label"], h["path"]) for h in want["results"]], what
    # one multi-vector call may sum the dot products in another order than a single one
    for g, w in zip(got["results"], want["results"]):
        assert abs(g["score"] - w["score"]) <= 1e-5, (what, g, w)
    assert got["breed_guess"] == pytest.approx(want["breed_guess"], abs=1e-5) if want["breed_guess"] else \
        got["breed_guess"] is None


async def _burst(url: str, requests: list[tuple[str, str, dict, bytes | None]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120,
                                 limits=httpx.Limits(max_connections=len(requests))) as c:
        async def one(method, path, params, data):
            if method == "POST":
                return await c.post(path, params=params, files={"file": ("q.jpg", data, "image/jpeg")})
            return await c.get(path, params=params)

        return await asyncio.gather(*[one(*r) for r in requests])


def _metrics(url: str) -> str:
    return httpx.get(url + "/metrics", timeout=30).text


def test_concurrent_requests_share_milvus_calls_and_each_gets_its_alone_answer(pair):
    alone, batched, root, ids = pair
    rels = sorted(ids)
    label = label_of(rels[-1])
    # the reference: each request by itself, batching off
    base = [(f"/v1/images/{ids[rel]}/similar", {"top_k": 3 + i % 4}) for i, rel in enumerate(rels[:GROUP])]
    ref = [httpx.get(alone.url + p, params=q, timeout=60).json() for p, q in base]
    # per-request min_score between the 2nd and 3rd hit of its own answer: it cuts the list
    for (p, q), body in zip(base[::2], ref[::2]):
        q["min_score"] = round((body["results"][1]["score"] + body["results"][2]["score"]) / 2, 6)
    similar = base + [(f"/v1/images/{ids[rel]}/similar", {"top_k": 2 + i % 5, "label": label})
                      for i, rel in enumerate(rels[-GROUP:])]
    uploads = [("/v1/search", {"top_k": 1 + i, **({"min_score": 0.0} if i % 3 == 0 else {})},
                (root / rel).read_bytes()) for i, rel in enumerate(rels[::3][:GROUP])]
    want_similar = [httpx.get(alone.url + p, params=q, timeout=60) for p, q in similar]
    want_uploads = [httpx.post(alone.url + p, params=q, files={"file": ("q.jpg", d, "image/jpeg")}, timeout=60)
                    for p, q, d in uploads]
    assert all(r.status_code == 200 for r in want_similar + want_uploads)
    cut = [r.json() for (p, q), r in zip(similar, want_similar) if "min_score" in q]
    assert any(len(b["results"]) < 3 for b in cut), "min_score should have cut some answers"
    assert all({h["label"] for h in r.json()["results"]} == {label} for r in want_similar[GROUP:])

    before = _metrics(batched.url)
    got_similar = asyncio.run(_burst(batched.url, [("GET", p, q, None) for p, q in similar]))
    got_uploads = asyncio.run(_burst(batched.url, [("POST", p, q, d) for p, q, d in uploads]))
    after = _metrics(batched.url)

    for (p, q), g, w in zip(similar, got_similar, want_similar):
        assert g.status_code == 200, g.text
        _same_answer(g.json(), w.json(), f"GET {p} {q}")
    for (p, q, _), g, w in zip(uploads, got_uploads, want_uploads):
        assert g.status_code == 200, g.text
        _same_answer(g.json(), w.json(), f"POST {p} {q}")

    def delta(name: str, op: str) -> float:
        return metric_sum(after, name, op=op) - metric_sum(before, name, op=op)

    # lookups: 16 ids in 2 calls; searches: unfiltered + labelled similar, then the uploads: 3 calls of 8
    assert delta("imgsearch_milvus_batch_size_count", "get") == 2
    assert delta("imgsearch_milvus_batch_size_sum", "get") == 2 * GROUP
    assert delta("imgsearch_milvus_batch_size_count", "search") == 3
    assert delta("imgsearch_milvus_batch_size_sum", "search") == 3 * GROUP
    assert delta("imgsearch_milvus_batch_wait_seconds_count", "search") == 3 * GROUP
    assert delta("imgsearch_milvus_batch_wait_seconds_sum", "search") > 0


def test_batching_off_makes_one_milvus_call_per_request(pair):
    alone, _, _, ids = pair
    rels = sorted(ids)[:4]
    before = _metrics(alone.url)
    got = asyncio.run(_burst(alone.url, [("GET", f"/v1/images/{ids[r]}/similar", {}, None) for r in rels]))
    after = _metrics(alone.url)
    assert all(r.status_code == 200 for r in got)
    for name in ("imgsearch_milvus_batch_size_count", "imgsearch_milvus_batch_size_sum"):
        assert metric_sum(after, name, op="search") - metric_sum(before, name, op="search") == len(rels)


def test_a_missing_id_in_a_batch_is_a_404_and_the_others_are_answered(pair):
    _, batched, _, ids = pair
    rels = sorted(ids)[:GROUP - 1]
    reqs = [("GET", f"/v1/images/{ids[r]}/similar", {}, None) for r in rels] + \
           [("GET", "/v1/images/12345/similar", {}, None)]
    got = asyncio.run(_burst(batched.url, reqs))
    assert [r.status_code for r in got] == [200] * (GROUP - 1) + [404]
    assert got[-1].json()["error"]["code"] == "not_found"
