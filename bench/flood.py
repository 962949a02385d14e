"""Overload and fault figures: a flood at 10x capacity, Triton's bounded queue, Triton killed,
Milvus down or locked, and SIGTERM with requests in flight. The numbers in docs/reliability.md.

Each scenario drives the real gateway over HTTP and measures what a client sees:

  flood          capacity first (closed loop, concurrency 1 then 2), then an open-loop flood at
                 --factor x capacity for --flood-s seconds: answers by status, p50/p99 of the
                 accepted (200) requests, 503s without Retry-After, the gateway's RSS peak
                 over its baseline, and how long after the flood stops a search is normal again
  triton_queue   a gateway with a high in-flight limit over a Triton whose queue holds 2:
                 a burst of 40 -> 200 or 503 "overloaded", counted in imgsearch_shed_total
  triton_kill    SIGKILL Triton under load: first 503 and /readyz 503 after the kill, then
                 restart it on the same ports: seconds until searches succeed again
  milvus_down    the same with Milvus as a server URI (``milvus-lite server`` in its own process)
  milvus_locked  the gateway starts while another process holds the Milvus Lite file's lock
                 (as `imgsearch index` would): 503 with the reason, then the lock goes away
  shutdown       SIGTERM to `imgsearch serve` while 8 uploads are half sent: all must end 200

Without --host the script builds its own stack on loopback ports: resnet18 with random
weights exported into a temp dir (or --model-repository), the local tritonserver, a few
dozen generated images indexed into Milvus Lite, and one uvicorn gateway per scenario.
The flood gets a backend-bound stack of its own, as the test does: ResNet-152 served by
one ONNX Runtime thread (~9 searches/s on a 2-core box), so that 10x capacity is a load one
Python client can offer rather than a measure of the client.
With --host it runs the flood only (it cannot kill what it did not start).

The scenarios are harness.faults; the tests in tests/integration/reliability/ call them and assert bounds.

examples:
  python -m bench.flood                                    # every scenario, own stack (~2 min)
  python -m bench.flood --scenarios flood,triton_kill --out loadtest/out/flood.json
  python -m bench.flood --model-repository /tmp/repo18 --outage-s 20   # reuse an export
  python -m bench.flood --host http://127.0.0.1:8000 --query dog.jpg  # flood a running gateway
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness.data import jpeg_bytes, make_dataset, shape_image
from harness.faults import (
    flood,
    graceful_shutdown,
    locked_then_released,
    outage,
    public,
    triton_queue,
)
from harness.stack import (
    GatewayProc,
    LockHolder,
    MilvusServer,
    backend_bound_repo,
    copy_db,
    export_repo,
    gateway_env,
    index_images,
    start_gateway,
)

SCENARIOS = ("flood", "triton_queue", "triton_kill", "milvus_down", "milvus_locked", "shutdown")



def run_own_stack(args: argparse.Namespace, wanted: list[str]) -> dict[str, Any]:
    from imgsearch.triton_server import LocalTriton

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="imgsearch-flood-") as tmp_s, contextlib.ExitStack() as stack:
        tmp = Path(tmp_s)
        t0 = time.monotonic()
        repo = Path(args.model_repository) if args.model_repository else export_repo(tmp / "repo")
        print(f"model repository {repo} ({time.monotonic() - t0:.0f}s)", file=sys.stderr)
        triton = stack.enter_context(LocalTriton(repo, "cpu", exit_timeout_s=2))
        images = tmp / "images"
        make_dataset(images, classes=4, per_class=8)
        template = tmp / "template.db"
        index_images(images, str(template), triton.grpc_url, repo)
        query = args.query.read_bytes() if args.query else jpeg_bytes(shape_image(1, 424242))
        n = 0

        def gateway(triton_url: str, milvus_uri: str | None = None, **extra: object) -> GatewayProc:
            nonlocal n
            n += 1
            uri = milvus_uri or str(copy_db(template, tmp / f"gw{n}.db"))
            gw = start_gateway(gateway_env(repo, triton_url, uri, images, **extra), log_path=tmp / f"gw{n}.log")
            stack.callback(gw.stop)
            return gw

        for name in wanted:
            print(f"-- {name}", file=sys.stderr)
            if name == "flood":
                # the backend the test floods too: capacity set by the model, not by this box's last cycle
                t0 = time.monotonic()
                slow_repo = backend_bound_repo(tmp / "slow152")
                slow = stack.enter_context(LocalTriton(slow_repo, "cpu", exit_timeout_s=2))
                db = tmp / "flood152.db"
                index_images(images, str(db), slow.grpc_url, slow_repo)
                print(f"flood backend: ResNet-152, one ONNX Runtime thread ({time.monotonic() - t0:.0f}s)",
                      file=sys.stderr)
                n += 1
                gw = start_gateway(gateway_env(slow_repo, slow.grpc_url, str(db), images,
                                               max_inflight=args.max_inflight), log_path=tmp / f"gw{n}.log")
                stack.callback(gw.stop)
                results[name] = {"max_inflight": args.max_inflight, "backend": "resnet152, 1 ORT thread",
                                 **public(asyncio.run(flood(gw.url, query, gw.pid, factor=args.factor,
                                                            flood_s=args.flood_s)))}
            elif name == "triton_queue":
                tq = export_repo(tmp / "tinyq", "--max-queue-size", "2", "--max-batch-size", "1",
                                 "--queue-delay-us", "0")
                small = stack.enter_context(LocalTriton(tq, "cpu", exit_timeout_s=2))
                gw = gateway(small.grpc_url, max_inflight=64)
                results[name] = {"triton_max_queue_size": 2, "max_inflight": 64,
                                 **public(asyncio.run(triton_queue(gw.url, query, 40)))}
            elif name == "triton_kill":
                own = LocalTriton(repo, "cpu", exit_timeout_s=2)
                stack.enter_context(own)
                gw = gateway(own.grpc_url)
                results[name] = public(asyncio.run(outage(gw.url, query, own.kill, own.start, down_s=args.outage_s)))
            elif name == "milvus_down":
                server = MilvusServer(copy_db(template, tmp / "server.db"), log_path=tmp / "milvus.log").start()
                stack.callback(server.stop)
                gw = gateway(triton.grpc_url, server.uri)
                results[name] = public(asyncio.run(outage(gw.url, query, server.kill, server.start,
                                                          down_s=args.outage_s)))
            elif name == "milvus_locked":
                db = copy_db(template, tmp / "locked.db")
                holder = LockHolder(db).start()
                stack.callback(holder.release)
                gw = gateway(triton.grpc_url, str(db))
                results[name] = public(asyncio.run(locked_then_released(gw.url, query, holder.release)))
            elif name == "shutdown":
                n += 1
                gw = start_gateway(gateway_env(repo, triton.grpc_url, str(copy_db(template, tmp / f"gw{n}.db")),
                                               images, max_inflight=16, graceful_shutdown_s=args.grace_s),
                                   serve_cli=True, log_path=tmp / f"gw{n}.log")
                stack.callback(gw.stop)
                results[name] = {"graceful_shutdown_s": args.grace_s,
                                 **public(asyncio.run(graceful_shutdown(gw, query)))}
    return results


def table(results: dict[str, Any]) -> str:
    lines = []
    for name, r in results.items():
        lines.append(f"{name}:")
        for k, v in r.items():
            lines.append(f"  {k:34s} {json.dumps(v)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.flood", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", help="flood this running gateway (e.g. http://127.0.0.1:8000) instead of a stack of our own")
    p.add_argument("--pid", type=int, help="with --host: the gateway's pid, to sample its RSS")
    p.add_argument("--query", type=Path, help="query image (default: a generated JPEG)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma list of: " + ", ".join(SCENARIOS))
    p.add_argument("--model-repository", help="reuse an exported model repository (served name resnet152)")
    p.add_argument("--factor", type=float, default=10.0, help="flood rate / measured capacity (default: %(default)s)")
    p.add_argument("--flood-s", type=float, default=4.0, help="flood duration (default: %(default)s)")
    p.add_argument("--max-inflight", type=int, default=4, help="own stack's IMGSEARCH_MAX_INFLIGHT for the flood")
    p.add_argument("--outage-s", type=float, default=1.0, help="seconds a killed backend stays down before restart")
    p.add_argument("--grace-s", type=float, default=10.0, help="IMGSEARCH_GRACEFUL_SHUTDOWN_S for the shutdown run")
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = p.parse_args(argv)
    wanted = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(wanted) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    if args.host:
        if wanted != ["flood"] and set(wanted) != set(SCENARIOS):
            p.error("--host runs the flood only: the fault scenarios need a stack this script started")
        query = args.query.read_bytes() if args.query else jpeg_bytes(shape_image(1, 424242))
        results = {"flood": public(asyncio.run(flood(args.host.rstrip("/"), query, args.pid, factor=args.factor,
                                                     flood_s=args.flood_s)))}
    else:
        results = run_own_stack(args, wanted)
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
            "python": platform.python_version(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(table(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
