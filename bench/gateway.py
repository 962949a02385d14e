"""Gateway overhead: ``POST /v1/search`` vs calling Triton directly, same images, same concurrency.

Direct = what the gateway cannot avoid: decode the file (the shared decoder, in a thread)
and one ``TritonEncoder.encode`` of the image. Gateway = the whole HTTP search: upload,
multipart parsing, decode, Triton, Milvus top-k, JSON. Both run in this process from one
asyncio loop with ``--concurrency`` workers, in alternating rounds (direct, gateway,
direct, gateway, ...) so that a shared machine's drift hits both alike. The ratios
(gateway throughput / direct throughput, direct p50 / gateway p50, direct p99 / gateway
p99) say how much of Triton's capacity survives the gateway: 1.0 is free, the target is
>= 0.85.

Two ways to run it:

  # against a running stack (make demo, or imgsearch serve): gateway URL + Triton gRPC
  python -m bench.gateway --gateway http://127.0.0.1:8000 --triton 127.0.0.1:8101 \\
      --images data/images

  # self-contained: starts Triton (free ports) on --repository, indexes --images into a
  # temporary Milvus Lite, starts the gateway (uvicorn subprocess), measures, stops all
  python -m bench.gateway --start --repository model_repository --images data/images

Writes the table to stdout and everything (settings, per-round figures) as JSON (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness.drive import drive
from harness.stack import gateway_env, index_images, start_gateway
from imgsearch.imaging import decode_image, sniff_format
from imgsearch.loadtest.cli import machine_info
from imgsearch.loadtest.scenario import image_files
from imgsearch.settings import get_settings
from imgsearch.stats import percentiles
from imgsearch.triton_client import TritonEncoder


@dataclass
class Round:
    mode: str
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)


@dataclass
class Summary:
    mode: str
    requests: int
    errors: int
    throughput_rps: float
    p50_ms: float
    p99_ms: float


def load_images(root: Path, limit: int) -> list[bytes]:
    out = []
    for p in image_files(root):
        data = p.read_bytes()
        if sniff_format(data):
            out.append(data)
        if len(out) >= limit:
            break
    if not out:
        raise SystemExit(f"no images under {root}")
    return out


async def run_round(mode: str, worker, images: list[bytes], concurrency: int, seconds: float) -> Round:
    """``concurrency`` clients for ``seconds``; ``worker`` answers a status string, "200" is success."""
    load = await drive(lambda i: worker(images[i % len(images)]), concurrency=concurrency, seconds=seconds,
                       outcome=str, ok="200", keep_results=False)
    return Round(mode, load.requests, load.error_count, load.wall_s, [x * 1000 for x in load.latencies_s],
                 load.counts)


def summarize(mode: str, rounds: list[Round]) -> Summary:
    lat = [x for r in rounds for x in r.latencies_ms] or [0.0]
    ok = sum(r.requests - r.errors for r in rounds)
    secs = sum(r.seconds for r in rounds) or 1.0
    p50, p99 = percentiles(lat, [50, 99])
    return Summary(mode, sum(r.requests for r in rounds), sum(r.errors for r in rounds), ok / secs, p50, p99)


async def bench(args: argparse.Namespace, gateway_url: str, triton_url: str) -> dict:
    import httpx

    images = load_images(args.images, args.limit)
    pool = ThreadPoolExecutor(args.decode_threads)
    enc = TritonEncoder(triton_url, args.model_name, args.protocol)
    loop = asyncio.get_running_loop()

    async def direct(data: bytes) -> str:
        try:
            pixels = await loop.run_in_executor(pool, decode_image, data)
            await enc.encode(pixels[None])
            return "200"
        except Exception as e:  # noqa: BLE001 - counted as an error by type
            return type(e).__name__

    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=gateway_url, timeout=60, limits=limits) as client:
        async def via_gateway(data: bytes) -> str:
            try:
                resp = await client.post("/v1/search", params={"top_k": args.top_k},
                                         files={"file": ("q.jpg", data, "application/octet-stream")})
                return str(resp.status_code)
            except httpx.HTTPError as e:
                return type(e).__name__

        for _ in range(2):  # warm-up: channels, connections, Triton's first batches
            await asyncio.gather(*[direct(images[i % len(images)]) for i in range(args.concurrency)])
            await asyncio.gather(*[via_gateway(images[i % len(images)]) for i in range(args.concurrency)])
        rounds: list[Round] = []
        for i in range(args.rounds):
            for mode, worker in (("direct", direct), ("gateway", via_gateway)):
                r = await run_round(mode, worker, images, args.concurrency, args.seconds)
                rounds.append(r)
                print(f"  round {i + 1}/{args.rounds} {mode:8s} {r.requests:6d} req  "
                      f"{(r.requests - r.errors) / r.seconds:7.1f} req/s  errors {r.errors}", flush=True)
    await enc.close()
    pool.shutdown()
    d = summarize("direct", [r for r in rounds if r.mode == "direct"])
    g = summarize("gateway", [r for r in rounds if r.mode == "gateway"])
    ratios = {
        "throughput": g.throughput_rps / d.throughput_rps if d.throughput_rps else 0.0,
        "p50": d.p50_ms / g.p50_ms if g.p50_ms else 0.0,
        "p99": d.p99_ms / g.p99_ms if g.p99_ms else 0.0,
    }
    return {"direct": asdict(d), "gateway": asdict(g), "ratios": ratios, "target": args.target,
            "rounds": [{k: v for k, v in asdict(r).items() if k != "latencies_ms"} for r in rounds],
            "images": len(images)}


def print_table(res: dict) -> None:
    d, g, r = res["direct"], res["gateway"], res["ratios"]
    print()
    print(f"{'':10s} {'requests':>9s} {'errors':>7s} {'req/s':>9s} {'p50 ms':>9s} {'p99 ms':>9s}")
    for row in (d, g):
        print(f"{row['mode']:10s} {row['requests']:9d} {row['errors']:7d} {row['throughput_rps']:9.1f} "
              f"{row['p50_ms']:9.1f} {row['p99_ms']:9.1f}")
    print(f"{'ratio':10s} {'':9s} {'':7s} {r['throughput']:9.3f} {r['p50']:9.3f} {r['p99']:9.3f}"
          "   (gateway/direct req/s; direct/gateway latency)")
    verdict = "meets" if r["throughput"] >= res["target"] else "MISSES"
    print(f"throughput ratio {r['throughput']:.3f} {verdict} the target {res['target']}")


# --- self-contained stack ----------------------------------------------------------------

@contextlib.contextmanager
def started_stack(args: argparse.Namespace):
    from imgsearch.triton_server import LocalTriton

    tmp = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    with LocalTriton(args.repository, "cpu", exit_timeout_s=5) as triton:
        db = tmp / "bench.db"
        # a temporary collection of the bench images (the indexer is the real tool)
        index_images(args.images, str(db), triton.grpc_url, args.repository, args.model_name, "bench",
                     limit=args.limit)
        env = gateway_env(args.repository, triton.grpc_url, db, args.images, collection="bench",
                          model_name=args.model_name, max_inflight=max(64, args.concurrency * 2),
                          decode_threads=args.decode_threads)
        gw = start_gateway(env, log_level="warning", log_path=tmp / "gateway.log")
        try:
            yield gw.url, triton.grpc_url
        finally:
            gw.stop(20)


def parser() -> argparse.ArgumentParser:
    s = get_settings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gateway", default=f"http://127.0.0.1:{s.port}", help="gateway base URL (default: %(default)s)")
    p.add_argument("--triton", default=s.triton_url or f"127.0.0.1:{s.local_triton_grpc_port}",
                   help="Triton gRPC host:port the gateway uses (default: %(default)s)")
    p.add_argument("--start", action="store_true", help="start Triton + a temporary index + the gateway here")
    p.add_argument("--repository", type=Path, default=s.model_repository, help="with --start (default: %(default)s)")
    p.add_argument("--model-name", default=s.model_name)
    p.add_argument("--protocol", default=s.triton_protocol, choices=("grpc", "http"))
    p.add_argument("--images", type=Path, default=s.image_root, help="query images (default: %(default)s)")
    p.add_argument("--limit", type=int, default=64, help="distinct images used (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=8, help="workers in flight (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=15.0, help="per round (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="direct+gateway pairs (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--decode-threads", type=int, default=s.decode_threads,
                   help="direct decode threads, and the gateway's with --start (default: %(default)s)")
    p.add_argument("--target", type=float, default=0.85, help="throughput ratio to meet (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("loadtest/out/bench_gateway.json"), help="(default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    with contextlib.ExitStack() as stack:
        if args.start:
            gateway_url, triton_url = stack.enter_context(started_stack(args))
        else:
            gateway_url, triton_url = args.gateway.rstrip("/"), args.triton
        print(f"bench_gateway: {args.concurrency} workers, {args.rounds} x ({args.seconds:.0f}s direct + "
              f"{args.seconds:.0f}s gateway), gateway {gateway_url}, Triton {triton_url}", flush=True)
        res = asyncio.run(bench(args, gateway_url, triton_url))
    res["config"] = {k: str(v) for k, v in vars(args).items()}
    res["machine"] = machine_info()
    print_table(res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
