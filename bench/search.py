"""Batched vs unbatched vector search through the gateway, side by side in one run.

Two gateways over copies of one Milvus Lite collection, identical but for
``IMGSEARCH_SEARCH_BATCH_MS`` (``--window-ms`` vs 0), measured in alternating rounds
(on, off, on, off, ...) so that whatever else the machine runs hits both alike. On a
shared machine only the ratios of one run mean something; the absolute figures move
with the neighbours' load.

  similar   ``GET /v1/images/{id}/similar`` over ``--vectors`` synthetic ``--dim``-d vectors
            (clustered, unit length; the gateway needs no model for it): req/s and p50/p99
            at ``--clients`` and at 1 client.
  search    ``POST /v1/search`` through a real Triton (``--repository``, or a resnet18 with
            random weights exported here) over the demo-style images plus synthetic vectors
            of the model's dimension: req/s per client count, and the knee (most req/s).
            ``--baseline REV`` adds a third gateway, "today": this project's code at REV
            (``git archive``), e.g. the commit before search batching, in the same rounds.
  index     the cost of a search right after the inserts, and once ``build_index`` (what
            ``imgsearch index`` ends with) has flushed and waited for the index.

  python -m bench.search                      # all three, results JSON in bench/results/
  python -m bench.search --skip-search --vectors 5000 --seconds 5   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import httpx
import numpy as np

from bench import write_results
from bench.gateway import run_round, summarize
from harness.data import make_dataset
from harness.stack import (
    COLLECTION,
    MODEL,
    GatewayProc,
    checkout,
    commit,
    copy_db,
    gateway_env,
    index_images,
    rss_tree_bytes,
    start_gateway,
)
from harness.vectors import (
    clustered_vectors,
    fill,
    release,
    time_searches,
    vectors_card_repo,
)
from imgsearch.model_card import read_card
from imgsearch.stats import percentile
from imgsearch.store import VectorStore
from imgsearch.triton_metrics import metric_sum
from imgsearch.triton_server import free_port

NOTE = ("Absolute req/s and latencies move with the machine and with other processes' load on it; the "
        "on/off ratios are measured side by side in alternating rounds of one run, and are what this file reports.")


def build_collection(db: Path, vectors: np.ndarray, sha: str, extra_rows=()) -> tuple[list[int], dict]:
    """Insert, time searches on the unindexed rows, build the index, time them again."""
    store = VectorStore(str(db), COLLECTION)
    try:
        t0 = time.perf_counter()
        ids = fill(store, vectors, sha)
        insert_s = time.perf_counter() - t0
        probe = vectors[:: max(1, len(vectors) // 5)][:5]
        before = time_searches(store, probe)
        t1 = time.perf_counter()
        state = store.build_index()
        build_s = time.perf_counter() - t1
        after = time_searches(store, probe)
    finally:
        release(store)
    return ids, {"insert_s": round(insert_s, 2), "build_index_s": round(build_s, 2),
                 "search_ms_before_index": [round(x * 1000, 1) for x in before],
                 "search_ms_after_index": [round(x * 1000, 1) for x in after],
                 "slowdown_before_index": round(percentile(before, 50) / percentile(after, 50), 1),
                 "index_state": state}


@contextlib.contextmanager
def gateway_pair(repo: Path, triton_url: str, db: Path, image_root: Path, window_ms: float, batch_max: int,
                 tmp: Path, baseline: Path | None = None):
    """Batching on and off, each over its own copy of the collection (one process per Lite file);
    with ``baseline`` (a :func:`harness.stack.checkout`), that code's gateway too, as "today"."""
    common = {"max_inflight": 512, "collection": COLLECTION}
    with contextlib.ExitStack() as stack:
        def serve(mode: str, db_: Path, code: Path | None = None, **settings: object) -> GatewayProc:
            gw = start_gateway(gateway_env(repo, triton_url, db_, image_root, **common, **settings),
                               log_level="warning", log_path=tmp / f"gateway-{mode}.log", checkout=code)
            stack.callback(gw.stop, 20)
            return gw

        # every copy before any gateway opens the file
        off_db = copy_db(db, tmp / f"{db.stem}-off.db")
        today_db = copy_db(db, tmp / f"{db.stem}-today.db") if baseline is not None else None
        gws = {"on": serve("on", db, search_batch_ms=window_ms, search_batch_max=batch_max),
               "off": serve("off", off_db, search_batch_ms=0)}
        if baseline is not None:
            gws["today"] = serve("today", today_db, baseline)
        yield gws


async def warm_up(mode: str, gw: GatewayProc, worker, items: list, clients: int,
                  patience_s: float = 3600.0) -> None:
    """One request per client, repeated until every one answers 200. A gateway over a copied Lite
    file can spend minutes loading it (250k x 2048-d: longer than a client's timeout), and a round
    started before that would time the load, not the search. A 4xx or a gateway that exited
    will not change by waiting."""
    t0 = time.monotonic()
    while True:
        got = await asyncio.gather(*[worker(items[i % len(items)]) for i in range(clients)])
        if all(s == "200" for s in got):
            return
        if gw.proc.poll() is not None or any(s.startswith("4") for s in got):
            raise RuntimeError(f"gateway {mode!r} cannot be warmed up: {dict(Counter(got))} (log: {gw.log_path})")
        if time.monotonic() - t0 > patience_s:
            raise RuntimeError(f"gateway {mode!r} still not answering after {patience_s:.0f} s: {Counter(got)}")
        print(f"  {mode}: warming up ({dict(Counter(got))}), {time.monotonic() - t0:.0f} s", flush=True)
        await asyncio.sleep(1.0)


async def compare(gws: dict, make_worker, items: list, clients: int, seconds: float, rounds: int) -> dict:
    """Alternating rounds (on, off[, today]) at ``clients``; summary per mode, on's ratios to the
    others, Milvus calls per mode."""
    out: dict = {"clients": clients}
    async with contextlib.AsyncExitStack() as stack:
        workers, before = {}, {}
        for mode, gw in gws.items():
            client = await stack.enter_async_context(httpx.AsyncClient(
                base_url=gw.url, timeout=120, limits=httpx.Limits(max_connections=clients)))
            workers[mode] = make_worker(client)
            await warm_up(mode, gw, workers[mode], items, clients)
            before[mode] = (await client.get("/metrics")).text
        rs = {m: [] for m in gws}
        for i in range(rounds):
            for mode in gws:
                r = await run_round(mode, workers[mode], items, clients, seconds)
                rs[mode].append(r)
                print(f"  {clients:3d} clients round {i + 1}/{rounds} {mode:3s} {r.requests:6d} req "
                      f"{(r.requests - r.errors) / r.seconds:8.1f} req/s  errors {r.errors}", flush=True)
        for mode, gw in gws.items():
            s = summarize(mode, rs[mode])
            text = httpx.get(gw.url + "/metrics", timeout=30).text
            out[mode] = {**asdict(s), "statuses": _statuses(rs[mode]), "rss_mb": round(rss_tree_bytes(gw.pid) / 2**20, 1)}
            if "imgsearch_milvus_batch_size_count" in text:  # code from before batching has none
                calls = (metric_sum(text, "imgsearch_milvus_batch_size_count", op="search")
                         - metric_sum(before[mode], "imgsearch_milvus_batch_size_count", op="search"))
                vecs = (metric_sum(text, "imgsearch_milvus_batch_size_sum", op="search")
                        - metric_sum(before[mode], "imgsearch_milvus_batch_size_sum", op="search"))
                out[mode] |= {"milvus_search_calls": int(calls),
                              "vectors_per_search_call": round(vecs / calls, 2) if calls else None}
    on, off = out["on"], out["off"]
    out["ratio_rps_on_off"] = round(on["throughput_rps"] / off["throughput_rps"], 3) if off["throughput_rps"] else None
    out["p99_on_lower"] = on["p99_ms"] < off["p99_ms"]
    out["p50_delta_ms"] = round(on["p50_ms"] - off["p50_ms"], 3)
    if "today" in out:
        today = out["today"]
        out["ratio_rps_on_today"] = (round(on["throughput_rps"] / today["throughput_rps"], 3)
                                     if today["throughput_rps"] else None)
        out["p50_delta_ms_today"] = round(on["p50_ms"] - today["p50_ms"], 3)
    return out


def _statuses(rounds) -> dict[str, int]:
    return dict(sum((Counter(r.statuses) for r in rounds), Counter()))


def similar_worker(top_k: int):
    def make(client: httpx.AsyncClient):
        async def worker(id_: int) -> str:
            try:
                return str((await client.get(f"/v1/images/{id_}/similar", params={"top_k": top_k})).status_code)
            except httpx.HTTPError as e:
                return type(e).__name__
        return worker
    return make


def search_worker(top_k: int):
    def make(client: httpx.AsyncClient):
        async def worker(data: bytes) -> str:
            try:
                r = await client.post("/v1/search", params={"top_k": top_k},
                                      files={"file": ("q.jpg", data, "application/octet-stream")})
                return str(r.status_code)
            except httpx.HTTPError as e:
                return type(e).__name__
        return worker
    return make


def bench_similar(args: argparse.Namespace, tmp: Path) -> dict:
    repo = vectors_card_repo(tmp / "repo-vectors", MODEL, args.dim)
    vectors = clustered_vectors(args.vectors, args.dim, seed=1)
    db = tmp / "similar.db"
    ids, index = build_collection(db, vectors, read_card(repo, MODEL).model_sha)
    rng = np.random.default_rng(2)
    pick = [int(i) for i in rng.choice(ids, size=min(2000, len(ids)), replace=False)]
    # no Triton: similar never calls the model; a closed port makes that plain
    with gateway_pair(repo, f"127.0.0.1:{free_port()}", db, tmp, args.window_ms, args.batch_max, tmp) as gws:
        res = {"index": index, "vectors": args.vectors, "dim": args.dim,
               "at_clients": asyncio.run(compare(gws, similar_worker(args.top_k), pick, args.clients,
                                                 args.seconds, args.rounds)),
               "at_1_client": asyncio.run(compare(gws, similar_worker(args.top_k), pick, 1,
                                                  args.seconds, args.rounds))}
    return res


def bench_search(args: argparse.Namespace, tmp: Path) -> dict:
    from harness.stack import export_repo
    from imgsearch.triton_server import LocalTriton

    repo = args.repository or export_repo(tmp / "repo18")
    card = read_card(repo, MODEL)
    root = tmp / "images"
    make_dataset(root, classes=6, per_class=8)
    images = [p.read_bytes() for p in sorted(root.rglob("*.jpg"))]
    with LocalTriton(repo, "cpu", exit_timeout_s=5) as triton:
        db = tmp / "search.db"
        vectors = clustered_vectors(args.vectors, card.embedding_dim, seed=3)
        ids, index = build_collection(db, vectors, card.model_sha)
        index_images(root, str(db), triton.grpc_url, repo)  # the query images themselves, too
        baseline_commit = args.baseline_commit
        baseline = checkout(baseline_commit, tmp / "baseline") if baseline_commit else None
        with gateway_pair(repo, triton.grpc_url, db, root, args.window_ms, args.batch_max, tmp, baseline) as gws:
            steps = [asyncio.run(compare(gws, search_worker(args.top_k), images, c, args.seconds, args.rounds))
                     for c in args.search_clients]
    knee = {m: max(steps, key=lambda s: s[m]["throughput_rps"]) for m in ("on", "off", "today") if m in steps[0]}
    return {"model": {"arch": card.arch, "dim": card.embedding_dim, "weights": card.weights},
            "vectors": args.vectors, "index": index, "steps": steps,
            **({"baseline": args.baseline, "baseline_commit": baseline_commit} if baseline_commit else {}),
            "knee": {m: {"clients": k["clients"], "throughput_rps": k[m]["throughput_rps"],
                         "p99_ms": k[m]["p99_ms"]} for m, k in knee.items()}}


def verdicts(res: dict, window_ms: float) -> dict:
    """The targets, each true only when the runs it compares answered every request: an error
    answered fast (a shed 503) or a timeout on one side would otherwise decide a latency."""
    def clean(*cmps: dict, against: str = "off") -> bool:
        return all(c[m]["errors"] == 0 for c in cmps for m in ("on", against))

    v = {}
    if "similar" in res:
        at, one = res["similar"]["at_clients"], res["similar"]["at_1_client"]
        v["similar_rps_ratio_ge_3"] = clean(at) and bool((at["ratio_rps_on_off"] or 0) >= 3.0)
        v["similar_p99_lower_on"] = clean(at) and bool(at["p99_on_lower"])
        v["similar_1_client_p50_rise_le_window"] = clean(one) and one["p50_delta_ms"] <= window_ms
    if "search" in res:
        steps = res["search"]["steps"]
        k = res["search"]["knee"]
        v["search_knee_on_ge_off"] = clean(*steps) and k["on"]["throughput_rps"] >= k["off"]["throughput_rps"]
        if "today" in k:
            v["search_knee_on_ge_today"] = (clean(*steps, against="today")
                                            and k["on"]["throughput_rps"] >= k["today"]["throughput_rps"])
        one = [s for s in steps if s["clients"] == 1]
        if one:
            v["search_1_client_p50_rise_le_window"] = clean(one[0]) and one[0]["p50_delta_ms"] <= window_ms
            if "today" in one[0]:
                v["search_1_client_p50_rise_vs_today_le_window"] = (clean(one[0], against="today")
                                                                    and one[0]["p50_delta_ms_today"] <= window_ms)
    return v


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vectors", type=int, default=20_000, help="synthetic vectors in each collection (default: %(default)s)")
    p.add_argument("--dim", type=int, default=2048, help="similar: vector size, 2048 = ResNet-152 pooled (default: %(default)s)")
    p.add_argument("--clients", type=int, default=32, help="similar: concurrent clients (default: %(default)s)")
    p.add_argument("--search-clients", type=int, nargs="+", default=[1, 4, 8, 16, 32],
                   help="search: client counts to find the knee (default: %(default)s)")
    p.add_argument("--window-ms", type=float, default=2.0, help="IMGSEARCH_SEARCH_BATCH_MS when on (default: %(default)s)")
    p.add_argument("--batch-max", type=int, default=64, help="IMGSEARCH_SEARCH_BATCH_MAX (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=10.0, help="per round (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="on+off pairs per setting (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--repository", type=Path, help="search: model repository (default: export a random resnet18)")
    p.add_argument("--baseline", metavar="REV",
                   help="search: also serve this project's gateway as it was at REV (e.g. 9dc91c4^, the commit "
                        "before search batching), as \"today\"")
    p.add_argument("--skip-similar", action="store_true")
    p.add_argument("--skip-search", action="store_true")
    p.add_argument("--out", type=Path, default=Path("bench/results/search-batching.json"),
                   help="(default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.baseline_commit = commit(args.baseline) if args.baseline else None  # a wrong REV fails before the runs

    tmp = Path(tempfile.mkdtemp(prefix="bench-search-"))
    t0 = time.perf_counter()
    res: dict = {"note": NOTE}
    if not args.skip_similar:
        print(f"similar: {args.vectors} x {args.dim}-d, {args.clients} clients and 1, window {args.window_ms} ms",
              flush=True)
        res["similar"] = bench_similar(args, tmp)
    if not args.skip_search:
        print(f"search: clients {args.search_clients}, window {args.window_ms} ms", flush=True)
        res["search"] = bench_search(args, tmp)
    res["verdicts"] = verdicts(res, args.window_ms)
    write_results(res, args, "bench.search", argv, t0)
    print(json.dumps(res["verdicts"], indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
