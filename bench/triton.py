"""Dynamic batching on the local Triton: the same model with and without it, one run.

Serves two copies of the exported model from one tritonserver (the wheel's binary, the
CPU config): ``<model>`` as exported (dynamic batching) and ``<model>_nobatch`` (the same
config with the ``dynamic_batching`` block removed, so Triton runs each request alone).
For each concurrency level, closed-loop clients send single-image requests for
``--seconds`` to one copy, then the other (alternating, so a shared machine's drift hits
both alike). Prints img/s, p50/p99 and Triton's average batch size (from its metrics), and
the dynamic/no-batching throughput ratio per level; writes everything as JSON.

  python -m bench.triton                                  # model_repository, resnet152
  python -m bench.triton --repository /tmp/repo18 --levels 1,8,32 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from harness.drive import drive
from imgsearch.export.triton_config import without_dynamic_batching
from imgsearch.loadtest.cli import machine_info
from imgsearch.settings import get_settings
from imgsearch.stats import percentiles
from imgsearch.triton_client import TritonEncoder
from imgsearch.triton_metrics import fetch_model_stats, stats_since
from imgsearch.triton_server import LocalTriton


def make_repository(src: Path, model: str, dest: Path) -> tuple[str, str]:
    """dest/<model> (as exported) and dest/<model>_nobatch; large files symlinked."""
    nobatch = f"{model}_nobatch"
    for name in (model, nobatch):
        shutil.copytree((src / model).resolve(), dest / name, copy_function=os.symlink)
        cfg = dest / name / "configs" / "cpu.pbtxt"
        text = cfg.read_text()
        cfg.unlink()  # a symlink to the original: replace, never write through it
        cfg.write_text(without_dynamic_batching(text, name=nobatch) if name == nobatch else text)
    return model, nobatch


async def closed_loop(enc: TritonEncoder, pixels: np.ndarray, concurrency: int, seconds: float) -> dict:
    load = await drive(lambda i: enc.encode(pixels[i % len(pixels)][None]), concurrency=concurrency,
                       seconds=seconds, keep_results=False)
    lat = [x * 1000 for x in load.ok_latencies_s]
    p50, p99 = percentiles(lat, [50, 99]) if lat else (float("nan"), float("nan"))
    return {"images": len(lat), "errors": load.error_count, "seconds": round(load.wall_s, 3),
            "img_s": round(load.throughput, 2), "p50_ms": round(p50, 1), "p99_ms": round(p99, 1)}


async def sweep(server: LocalTriton, models: tuple[str, str], levels: list[int], seconds: float) -> list[dict]:
    pixels = np.random.default_rng(0).integers(0, 256, (64, 224, 224, 3), dtype=np.uint8)
    encoders = {m: TritonEncoder(server.grpc_url, m) for m in models}
    rows = []
    try:
        for m in models:  # warm-up: first calls pay session and channel set-up
            await closed_loop(encoders[m], pixels, 2, 1.0)
        for c in levels:
            for m in models:
                before = fetch_model_stats(server.metrics_url, m)
                r = await closed_loop(encoders[m], pixels, c, seconds)
                d = stats_since(server.metrics_url, m, before, requests=r["images"])  # one image per request
                if d.requests < r["images"]:
                    print(f"  warning: Triton counted {d.requests:.0f} of {r['images']} requests: "
                          "its averages below are partial", flush=True)
                r.update(model=m, mode="dynamic" if m == models[0] else "nobatch", concurrency=c,
                         avg_batch=round(d.avg_batch, 2),
                         queue_ms=round(d.queue_us / 1000 / max(d.requests, 1), 1),
                         compute_ms=round(d.compute_us / 1000 / max(d.requests, 1), 1))
                rows.append(r)
                print(f"  c={c:<3} {r['mode']:<8} {r['img_s']:>8.1f} img/s  p50 {r['p50_ms']:>7.1f}  "
                      f"p99 {r['p99_ms']:>7.1f} ms  batch {r['avg_batch']:>5.2f}", flush=True)
    finally:
        for e in encoders.values():
            await e.close()
    return rows


def parser() -> argparse.ArgumentParser:
    s = get_settings()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", type=Path, default=s.model_repository)
    ap.add_argument("--model", default=s.model_name)
    ap.add_argument("--levels", default="1,2,4,8,16,32,64", help="concurrency levels (default: %(default)s)")
    ap.add_argument("--seconds", type=float, default=8.0, help="per level and mode (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=Path("loadtest/out/bench_triton.json"))
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-triton-") as tmp:
        models = make_repository(args.repository, args.model, Path(tmp))
        with LocalTriton(tmp, "cpu", exit_timeout_s=5) as server:
            print(f"tritonserver {server.grpc_url}: {models[0]} (dynamic batching) vs {models[1]}", flush=True)
            rows = asyncio.run(sweep(server, models, levels, args.seconds))
    by = {(r["concurrency"], r["mode"]): r for r in rows}
    print(f"\n{'conc':>4} | {'dynamic img/s':>13} {'p50':>7} {'p99':>7} {'batch':>5} | "
          f"{'nobatch img/s':>13} {'p50':>7} {'p99':>7} | {'ratio':>5}")
    ratios = {}
    for c in levels:
        d, n = by[(c, "dynamic")], by[(c, "nobatch")]
        ratios[c] = round(d["img_s"] / n["img_s"], 2) if n["img_s"] else None
        print(f"{c:>4} | {d['img_s']:>13.1f} {d['p50_ms']:>7.1f} {d['p99_ms']:>7.1f} {d['avg_batch']:>5.2f} | "
              f"{n['img_s']:>13.1f} {n['p50_ms']:>7.1f} {n['p99_ms']:>7.1f} | {ratios[c]:>5}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": machine_info(),
        "repository": str(args.repository), "model": args.model, "seconds": args.seconds,
        "dynamic_vs_nobatch": ratios, "rows": rows}, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
