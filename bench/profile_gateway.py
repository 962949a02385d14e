"""Gateway CPU per request, and where it goes: one client at a time (under a profiler too), and
with ``--clients`` concurrent clients, where search batching shares Milvus calls between requests.

CPU per request = the gateway process' own CPU time (user + system, all its threads) over
a run of sequential requests, divided by their number. Milvus runs as a server in its own
process here (``harness.stack.MilvusServer``): Milvus Lite on a ``.db`` path runs inside
the gateway process and its search work would count as the gateway's. Triton and the
client are other processes too. The profiler (yappi, every thread: :mod:`bench.profiled`)
adds its own overhead to every call, so the CPU figure comes from a second, unprofiled run
of the same requests; the profile says where the time goes.

  healthz   GET /healthz: the gateway's floor (no Triton, no Milvus), for reading the others
  Milvus client: the two calls of a ``similar`` made by the store in this process, CPU per call,
            alone and batched, beside pymilvus' own client making the same calls, and the same
            search through the bare gRPC stub (the floor of a Python client)
  similar   GET /v1/images/{id}/similar over ``--vectors`` synthetic 2048-d vectors
  search    POST /v1/search, IMGSEARCH_TRITON_INPUT=bytes (files go to Triton's ensemble
            undecoded), resnet18 with random weights exported here

  python -m bench.profile_gateway --requests 500
"""

from __future__ import annotations

import argparse
import io
import json
import pstats
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import httpx
import numpy as np
import psutil

from bench import command_line
from bench.search import build_collection
from harness.data import make_dataset
from harness.drive import drive_threads
from harness.stack import (
    COLLECTION,
    MilvusServer,
    copy_db,
    export_repo,
    gateway_env,
    index_images,
    start_gateway,
)
from harness.vectors import clustered_vectors, vectors_card_repo
from imgsearch import milvus_rpc
from imgsearch.loadtest.cli import machine_info
from imgsearch.model_card import read_card
from imgsearch.store import SearchQuery, VectorStore, search_ef
from imgsearch.triton_server import LocalTriton, free_port

MODEL = "resnet152"
# the stages the issue names: multipart, response models, JSON, vectors for pymilvus, metrics
WATCH = ("serialize_response|solve_dependencies|read_upload|render|search_many|get_many|MetricsMiddleware|"
         "response|hit_json|_blocking|prepare|search_result|generate_latest|encode_bytes|run_endpoint_function")


def cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def measure(env: dict, send, n: int, tmp: Path, name: str, profile: bool, clients: int = 1,
            start=start_gateway) -> dict:
    prof = tmp / f"{name}.prof"
    # through `imgsearch serve`, as the images and manifests run it (its uvicorn options: no proxy
    # headers middleware, the connection limit and keep-alive from the settings)
    gw = start(env, serve_cli=True, log_level="warning", log_path=tmp / f"{name}.log",
                       python_args=["-m", "bench.profiled", str(prof)] if profile else ())
    try:
        # one kept-alive connection per client, as a browser or a load balancer's pool keeps: httpx's
        # default keeps 20, so 32 clients would open a connection for almost every request
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        with httpx.Client(base_url=gw.url, timeout=60, limits=limits) as c:
            for i in range(20):  # warm-up: connections, first-call imports, caches
                r = send(c, i)
                assert r.status_code == 200, r.text
            if profile:
                gw.proc.send_signal(signal.SIGUSR1)  # bench.profiled: start now
                time.sleep(0.2)
            c0 = cpu_s(gw.pid)
            load = drive_threads(lambda i: send(c, i), concurrency=clients, requests=n, keep_results=False)
            cpu, wall = cpu_s(gw.pid) - c0, load.wall_s
    finally:
        gw.stop(30)
    out = {"requests": n, "clients": clients, "gateway_cpu_ms_per_request": round(cpu / n * 1000, 3),
           "wall_ms_per_request": round(wall / n * 1000, 3)}
    if profile and prof.exists():
        buf = io.StringIO()
        st = pstats.Stats(str(prof), stream=buf)
        st.sort_stats("tottime").print_stats(25)
        st.sort_stats("cumulative").print_stats(WATCH)
        out["profile"] = buf.getvalue().splitlines()
    return out


def milvus_client_cost(uri: str, ids: list[int], n: int, model_sha: str) -> dict:
    """CPU of this process per call, for the two Milvus calls a ``similar`` makes (the stored
    vector, then the search), alone and as a batch shares them: the share of a ``similar`` that
    is the Milvus client, apart from HTTP and routing.

    ``store_*``: the gateway's own store, which builds and reads Milvus' gRPC messages with numpy
    (:mod:`imgsearch.milvus_rpc`). ``pymilvus_*``: the same calls through pymilvus'
    ``MilvusClient`` on the same server, side by side. ``search_raw_grpc``: one request built
    beforehand and sent through the stub, its hit ids read from the reply: the least CPU any
    Python client spends on a Milvus search (the gRPC runtime's own).
    """
    import grpc
    from pymilvus.grpc_gen import milvus_pb2_grpc

    store = VectorStore(uri, COLLECTION)
    channel = grpc.insecure_channel(uri.removeprefix("http://"))
    try:
        store.open(2048, model_sha, patient=True)
        first = store.get_many(ids[:40], with_embedding=True)  # warm-up: channel, collection schema
        vectors = {e.id: e.embedding for e in first if e is not None}
        client = store._connect()
        stub = milvus_pb2_grpc.MilvusServiceStub(channel)
        params = {"metric_type": "COSINE", "params": {"ef": search_ef(10)}}
        request = milvus_rpc.search_request(COLLECTION, vectors[ids[0]], 11, params, "", ["path", "label"])

        def raw_search(k: int) -> list[int]:
            reply = stub.Search(request, timeout=store.timeout_s)
            if reply.status.code:
                raise RuntimeError(f"raw search failed: {reply.status.reason}")
            return list(reply.results.ids.int_id.data)

        def batch(k: int, size: int) -> list[int]:
            return [ids[(k + j) % 40] for j in range(size)]

        def store_search(k: int, size: int = 1) -> list:
            return store.search_many([SearchQuery(vectors[i], 10, None, i) for i in batch(k, size)])

        def pymilvus_search(k: int, size: int = 1) -> list:
            res = client.search(COLLECTION, data=[vectors[i] for i in batch(k, size)], limit=11,
                                output_fields=["path", "label"], search_params=params, timeout=store.timeout_s)
            return [[(h["id"], h["entity"]["path"], h["entity"]["label"], h["distance"]) for h in hits] for hits in res]

        def pymilvus_get(k: int, size: int = 1) -> list:
            rows = client.get(COLLECTION, ids=batch(k, size), output_fields=["id", "path", "label", "embedding"],
                              timeout=store.timeout_s)
            return [(r["id"], r["path"], r["label"], np.asarray(r["embedding"], dtype=np.float32)) for r in rows]

        calls = {"store_get": lambda k: store.get_many(batch(k, 1), with_embedding=True),
                 "pymilvus_get": pymilvus_get,
                 "store_search": store_search, "pymilvus_search": pymilvus_search,
                 "store_get_x8": lambda k: store.get_many(batch(k, 8), with_embedding=True),
                 "pymilvus_get_x8": lambda k: pymilvus_get(k, 8),
                 "store_search_x16": lambda k: store_search(k, 16),
                 "pymilvus_search_x16": lambda k: pymilvus_search(k, 16),
                 "search_raw_grpc": raw_search}
        assert len(raw_search(0)) == 11, "the raw search found nothing: it would measure an empty reply"
        got = store.get_many(batch(0, 4), with_embedding=True)
        theirs_rows = {r[0]: r for r in pymilvus_get(0, 4)}
        assert all(np.array_equal(e.embedding, theirs_rows[e.id][3]) and e.path == theirs_rows[e.id][1]
                   for e in got), "not the same rows"
        ours, theirs = store_search(0, 4), pymilvus_search(0, 4)
        assert [[h.id for h in hits] for hits in ours] == [[h[0] for h in hits if h[0] != i][:10]
                                                           for i, hits in zip(batch(0, 4), theirs)], "not the same hits"
        out = {}
        for name, call in calls.items():
            c0 = time.process_time()
            for k in range(n):
                call(k)
            out[f"{name}_cpu_ms_per_call"] = round((time.process_time() - c0) / n * 1000, 3)
        return {"calls": n, **out}
    finally:
        channel.close()
        store.close()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=500, help="sequential requests per run (default: %(default)s)")
    p.add_argument("--vectors", type=int, default=5000, help="similar: collection size (default: %(default)s)")
    p.add_argument("--skip-search", action="store_true")
    p.add_argument("--clients", type=int, nargs="*", default=[32],
                   help="also measure CPU per request with this many concurrent clients, search batching "
                        "on as by default: where a host's capacity is decided (default: %(default)s)")
    p.add_argument("--profile-clients", type=int, default=1,
                   help="concurrent clients of the profiled run: 32 shows where batched requests spend "
                        "(default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("bench/results/gateway-cpu.json"), help="(default: %(default)s)")
    return p


class SimilarStack(NamedTuple):
    milvus: MilvusServer  # the caller stops it
    env: dict  # the gateway's settings (no Triton: ``similar`` never calls the model)
    ids: list[int]
    model_sha: str
    similar: Callable[[httpx.Client, int], httpx.Response]  # a sender for :func:`measure`


def similar_stack(tmp: Path, vectors: int) -> SimilarStack:
    """Milvus Lite's server over ``vectors`` synthetic 2048-d vectors (built, copied, started)
    and what a gateway serving ``similar`` over it needs."""
    repo = vectors_card_repo(tmp / "repo-vectors", MODEL, 2048)
    db = tmp / "similar.db"
    sha = read_card(repo, MODEL).model_sha
    ids, _ = build_collection(db, clustered_vectors(vectors, 2048, seed=5), sha)
    milvus = MilvusServer(copy_db(db, tmp / "server.db"), log_path=tmp / "milvus.log").start()

    def similar(c: httpx.Client, i: int) -> httpx.Response:
        return c.get(f"/v1/images/{ids[i % len(ids)]}/similar", params={"top_k": 10})

    return SimilarStack(milvus, gateway_env(repo, f"127.0.0.1:{free_port()}", milvus.uri, tmp), ids, sha, similar)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="profile-gateway-"))
    res: dict = {}
    milvus, env, ids, sha, similar = similar_stack(tmp, args.vectors)

    def healthz(c: httpx.Client, i: int) -> httpx.Response:
        return c.get("/healthz")

    # the floor: what a request costs that touches neither Triton nor Milvus (uvicorn, routing,
    # middleware, a small JSON body), measured the same way, so the targets can be read against it
    def runs(env: dict, send, name: str, profiled: bool = True) -> dict:
        """One client, then each --clients count; then --profile-clients under the profiler."""
        out = {"cpu": measure(env, send, args.requests, tmp, name, False),
               "cpu_concurrent": [measure(env, send, args.requests, tmp, f"{name}-{k}", False, k) for k in args.clients]}
        if profiled:
            out["profiled"] = measure(env, send, args.requests, tmp, f"{name}-prof", True, args.profile_clients)
        return out

    res["healthz_floor"] = runs(env, healthz, "healthz", profiled=False)
    res["milvus_client"] = milvus_client_cost(milvus.uri, ids, args.requests, sha)
    res["similar"] = runs(env, similar, "similar")

    if not args.skip_search:
        repo18 = export_repo(tmp / "repo18")
        root = tmp / "images"
        make_dataset(root, classes=4, per_class=8)
        files = [p.read_bytes() for p in sorted(root.rglob("*.jpg"))]
        with LocalTriton(repo18, "cpu", exit_timeout_s=5) as triton:
            index_images(root, milvus.uri, triton.grpc_url, repo18, collection="search")
            senv = gateway_env(repo18, triton.grpc_url, milvus.uri, root, triton_input="bytes", collection="search")

            def search(c: httpx.Client, i: int) -> httpx.Response:
                return c.post("/v1/search", params={"top_k": 10},
                              files={"file": ("q.jpg", files[i % len(files)], "image/jpeg")})

            res["search_bytes"] = runs(senv, search, "search")
    milvus.stop()
    res["machine"] = machine_info()
    res["command"] = command_line("bench.profile_gateway", argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    for k, v in res.items():
        if isinstance(v, dict) and "cpu" in v:
            for m in [v["cpu"], *v["cpu_concurrent"]]:
                print(f"{k}, {m['clients']} client(s): {m['gateway_cpu_ms_per_request']} ms gateway CPU per request "
                      f"({m['wall_ms_per_request']} ms wall)")
            print("\n".join(v.get("profiled", {}).get("profile", [])))
    print(f"Milvus client, in this process: {res['milvus_client']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
