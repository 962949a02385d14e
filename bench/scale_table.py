"""The search scale table: collection size x vector size -> memory, index build, latency, recall.

For each size (``--sizes``) and dimension (``--dims``: 2048 = ResNet-152 pooled, 256 = a
projected embedding) it builds a Milvus Lite collection of synthetic clustered vectors
(:mod:`harness.vectors`) with the store's index settings, and measures:

  * index build time (flush + wait for the index: what ``imgsearch index`` ends with);
  * ANN recall@10 of the store's search against exact search (FLAT: brute-force cosine);
  * resident memory of a gateway serving it (gateway + embedded Milvus Lite);
  * ``similar`` p50/p99 and req/s at 1 and ``--clients`` clients, batching on and off
    (:func:`bench.search.compare`: alternating rounds, two gateways).

Each finished cell is written to ``--out`` at once, so an interrupted run keeps what it
measured; ``--only 250000x2048`` re-runs one cell and merges it in.

  python -m bench.scale_table                        # the whole table (hours on 2 cores)
  python -m bench.scale_table --sizes 20000 --dims 256 2048
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import command_line
from bench.search import NOTE, build_collection, compare, gateway_pair, similar_worker
from harness.stack import COLLECTION, MODEL
from harness.vectors import clustered_vectors, recall_at_k, release, vectors_card_repo
from imgsearch.loadtest.cli import machine_info
from imgsearch.model_card import read_card
from imgsearch.store import HNSW, VectorStore, search_ef
from imgsearch.triton_server import free_port


def cell(n: int, dim: int, args: argparse.Namespace, tmp: Path) -> dict:
    repo = vectors_card_repo(tmp / f"repo-{dim}", MODEL, dim)
    vectors = clustered_vectors(n, dim, seed=n + dim)
    # held-out queries from the same clusters: the same centres (same seed), other noise
    queries = clustered_vectors(n + args.queries, dim, seed=n + dim)[n:]
    db = tmp / f"scale-{n}-{dim}.db"
    ids, index = build_collection(db, vectors, read_card(repo, MODEL).model_sha)
    store = VectorStore(str(db), COLLECTION)
    try:
        store.open(dim, read_card(repo, MODEL).model_sha, patient=True)
        recall = recall_at_k(store, vectors, ids, queries, 10)
    finally:
        release(store)
    del vectors
    pick = [int(i) for i in np.random.default_rng(n).choice(ids, size=min(2000, n), replace=False)]
    out = {"vectors": n, "dim": dim, "raw_vectors_mb": round(n * dim * 4 / 2**20, 1),
           "insert_s": index["insert_s"], "build_index_s": index["build_index_s"],
           "search_ms_before_index": index["search_ms_before_index"],
           "search_ms_after_index": index["search_ms_after_index"],
           "recall_at_10": round(recall, 4), "recall_queries": args.queries,
           "search_ef_top10": search_ef(10)}  # per cell: a file may hold cells measured at another ef
    with gateway_pair(repo, f"127.0.0.1:{free_port()}", db, tmp, args.window_ms, args.batch_max, tmp) as gws:
        for c in (1, args.clients):
            out[f"similar_{c}"] = asyncio.run(compare(gws, similar_worker(10), pick, c, args.seconds, args.rounds))
        out["rss_mb_gateway_and_milvus"] = out[f"similar_{args.clients}"]["off"]["rss_mb"]
    shutil.rmtree(db, ignore_errors=True)
    shutil.rmtree(tmp / f"{db.stem}-off.db", ignore_errors=True)
    return out


def row(c: dict, clients: int) -> str:
    one, many = c["similar_1"], c[f"similar_{clients}"]
    return (f"| {c['vectors']:>7} | {c['dim']:>4} | {c['rss_mb_gateway_and_milvus']:>7.0f} | {c['build_index_s']:>7.1f} "
            f"| {c['recall_at_10']:.3f} | {one['off']['p50_ms']:.1f} / {one['off']['p99_ms']:.1f} "
            f"| {one['on']['p50_ms']:.1f} / {one['on']['p99_ms']:.1f} "
            f"| {many['off']['p50_ms']:.0f} / {many['off']['p99_ms']:.0f} ({many['off']['throughput_rps']:.0f}/s) "
            f"| {many['on']['p50_ms']:.0f} / {many['on']['p99_ms']:.0f} ({many['on']['throughput_rps']:.0f}/s) |")


def table(cells: list[dict], clients: int) -> str:
    head = (f"| vectors | dim | RSS MB | build s | recall@10 | 1 client off p50/p99 ms | 1 client on | "
            f"{clients} clients off p50/p99 (req/s) | {clients} clients on |\n|" + "---|" * 9)
    return "\n".join([head] + [row(c, clients) for c in sorted(cells, key=lambda c: (c["dim"], c["vectors"]))])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000, 250_000])
    p.add_argument("--dims", type=int, nargs="+", default=[2048, 256])
    p.add_argument("--only", nargs="*", default=[], help="cells as NxDIM (e.g. 250000x2048): run just these")
    p.add_argument("--clients", type=int, default=32, help="the loaded client count (default: %(default)s)")
    p.add_argument("--window-ms", type=float, default=5.0, help="IMGSEARCH_SEARCH_BATCH_MS when on (default: %(default)s)")
    p.add_argument("--batch-max", type=int, default=64)
    p.add_argument("--seconds", type=float, default=8.0, help="per round (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="on+off pairs per client count (default: %(default)s)")
    p.add_argument("--queries", type=int, default=200, help="held-out queries for recall (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("bench/results/search-scale.json"), help="(default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    todo = [(n, d) for d in args.dims for n in args.sizes]
    if args.only:
        todo = [tuple(int(x) for x in s.lower().split("x")) for s in args.only]
    res = json.loads(args.out.read_text()) if args.out.exists() else {}
    cells = {(c["vectors"], c["dim"]): c for c in res.get("cells", [])}
    res.update({"note": NOTE, "index": dict(HNSW),
                "machine": machine_info()})
    for n, d in todo:
        tmp = Path(tempfile.mkdtemp(prefix="scale-"))
        print(f"cell {n} x {d}", flush=True)
        t0 = time.perf_counter()
        c = cell(n, d, args, tmp)
        c["wall_s"] = round(time.perf_counter() - t0, 1)
        c["command"] = command_line("bench.scale_table", argv)
        cells[(n, d)] = c
        res["cells"] = list(cells.values())
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")
        print(row(c, args.clients), flush=True)
        shutil.rmtree(tmp, ignore_errors=True)
    print(table(list(cells.values()), args.clients))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
