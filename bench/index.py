"""Indexer throughput against raw Triton throughput, on the same images, in one run.

raw      the images are decoded first (not timed), then sent straight to Triton as uint8
         batches of --batch-size with --in-flight requests at once: the ceiling.
indexer  ``imgsearch index`` end to end (read, hash, decode in workers, Triton, Milvus
         upsert) into a fresh collection, same batch size and in-flight count.

Raw and indexer passes alternate (raw, indexer, raw, indexer, raw for --rounds 2); each
indexer pass is compared with the mean of the raw passes around it, and the median of
those ratios is reported, so load from other processes on a shared machine hits both
sides alike (and shows up as spread between the raw figures). The indexer's images/s is
its own pipeline time (first file to last upsert); the ratio including process start-up
(imports, Milvus Lite, worker spawn) is printed too. Also prints the indexer's time per
stage (decode / infer / upsert) and writes everything as JSON to --out.

When the benchmark starts Triton itself (no IMGSEARCH_TRITON_URL), it also measures CPU
seconds per image (Triton's processes + the client or the indexer's processes). On a
CPU-only machine where inference and decoding share the cores, the ratio of those is what
a dedicated machine's throughput ratio would be (given Triton is never starved, which the
"Triton idle" figure shows), and it is far less disturbed by other load than wall time.

examples:
  python -m bench.index data/images --out loadtest/out/bench_index.json
  IMGSEARCH_MODEL_REPOSITORY=/tmp/repo18 python -m bench.index --generate 1000
  IMGSEARCH_TRITON_URL=127.0.0.1:8101 python -m bench.index data/images --limit 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from harness.drive import drive
from imgsearch.errors import ImageError
from imgsearch.imaging import decode_image
from imgsearch.labels import IMAGE_SUFFIXES
from imgsearch.settings import Settings
from imgsearch.triton_client import TritonEncoder, with_backoff
from imgsearch.triton_server import triton_for


def list_images(root: Path, limit: int | None) -> list[Path]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    return files[:limit] if limit else files


def decode_all(files: list[Path], size: int) -> np.ndarray:
    arrays = []
    for p in files:
        try:
            arrays.append(decode_image(p.read_bytes(), size=size))
        except ImageError:
            pass
    return np.stack(arrays)


async def raw_triton(url: str, model: str, protocol: str, pixels: np.ndarray, batch: int, in_flight: int) -> dict:
    enc = TritonEncoder(url, model, protocol)
    try:
        await enc.encode(pixels[:batch])  # warm-up: connection, metadata, first execution

        async def one(k: int) -> int:
            res = await with_backoff(lambda: enc.encode(pixels[k * batch : (k + 1) * batch]))
            return res.embeddings.shape[0]

        load = await drive(one, concurrency=in_flight, requests=-(-len(pixels) // batch), raise_errors=True)
        done, dt = sum(load.results()), load.wall_s
    finally:
        await enc.close()
    return {"images": done, "seconds": round(dt, 3), "images_per_s": round(done / dt, 2)}


def tree_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) used so far by a process and its children (tritonserver + stub)."""
    if pid is None:
        return 0.0
    import psutil

    total = 0.0
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def run_indexer(root: Path, url: str, workdir: Path, args) -> dict:
    out = workdir / "index_report.json"
    env = dict(os.environ, IMGSEARCH_TRITON_URL=url, IMGSEARCH_MILVUS_URI=str(workdir / "bench.db"))
    cmd = [sys.executable, "-m", "imgsearch.cli", "index", str(root), "--collection", "bench_index",
           "--recreate", "--no-progress", "--batch-size", str(args.batch_size), "--in-flight", str(args.in_flight),
           "--json", str(out)]
    if args.workers:
        cmd += ["--workers", str(args.workers)]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not out.exists():
        sys.exit(f"the indexer failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rep = json.loads(out.read_text())
    rep["process_wall_s"] = round(wall, 3)
    return rep


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image_root", nargs="?", type=Path, help="images to index (or use --generate)")
    ap.add_argument("--generate", type=int, metavar="N", help="build N demo images first (imgsearch demo-data)")
    ap.add_argument("--limit", type=int, help="use only the first N files")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--in-flight", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0, help="indexer decode processes (default: its own)")
    ap.add_argument("--rounds", type=int, default=2, help="indexer runs, each between two raw runs (default: 2)")
    ap.add_argument("--out", type=Path, default=Path("loadtest/out/bench_index.json"))
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    settings = Settings()

    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-index-")))
        root = args.image_root
        if root is None:
            if not args.generate:
                ap.error("give IMAGE_ROOT or --generate N")
            root = workdir / "images"
            subprocess.run([sys.executable, "-m", "imgsearch.cli", "demo-data", str(root), "--count",
                            str(args.generate)], check=True)
        files = list_images(root, args.limit)
        if not files:
            sys.exit(f"no images under {root}")
        triton = stack.enter_context(triton_for(settings))
        url = triton.url
        # known only for a Triton started here: then CPU per image is measured too
        triton_pid = triton.server.proc.pid if triton.server else None
        print(f"{len(files)} files under {root}; Triton {url}; batch {args.batch_size}, in flight {args.in_flight}",
              flush=True)
        pixels = decode_all(files, settings.image_size)

        def raw() -> dict:
            t0, c0 = tree_cpu(triton_pid), time.process_time()
            res = asyncio.run(raw_triton(url, settings.model_name, settings.triton_protocol, pixels,
                                         args.batch_size, args.in_flight))
            # Triton's CPU includes the warm-up batch; so does the image count here
            res["cpu_per_image_ms"] = 1000 * (tree_cpu(triton_pid) - t0 + time.process_time() - c0) / (
                res["images"] + args.batch_size)
            return res

        def indexer() -> dict:
            t0 = tree_cpu(triton_pid)
            rep = run_indexer(root, url, workdir, args)
            rep["triton_cpu_s"] = tree_cpu(triton_pid) - t0
            rep["cpu_per_image_ms"] = 1000 * (rep["triton_cpu_s"] + rep["cpu_s"]["main"] + rep["cpu_s"]["workers"]) / max(
                1, rep["indexed"])
            return rep

        # raw, indexer, raw, indexer, raw...: each indexer run is compared with the raw runs
        # right before and after it, so load from other processes hits both sides alike
        raws = [raw()]
        print(f"raw Triton:  {raws[-1]['images_per_s']:6.1f} images/s", flush=True)
        runs = []
        for _ in range(args.rounds):
            idx = indexer()
            runs.append(idx)
            print(f"indexer:     {idx['images_per_s']:6.1f} images/s ({idx['indexed']} indexed in "
                  f"{idx['elapsed_s']:.1f}s, Triton idle {idx['triton_idle_s']:.1f}s of it; "
                  f"process wall {idx['process_wall_s']:.1f}s incl. start-up)", flush=True)
            raws.append(raw())
            print(f"raw Triton:  {raws[-1]['images_per_s']:6.1f} images/s", flush=True)

    ratios, wall_ratios = [], []
    for i, idx in enumerate(runs):
        ref = (raws[i]["images_per_s"] + raws[i + 1]["images_per_s"]) / 2
        ratios.append(idx["images_per_s"] / ref)
        wall_ratios.append(idx["indexed"] / idx["process_wall_s"] / ref)
    ratio = statistics.median(ratios)
    cpu_ratio = None
    if triton_pid is not None:
        # CPU-bound machine, Triton never starved: images/s is inversely proportional to CPU per
        # image, which load from other processes distorts far less than wall time
        cpu_ratio = statistics.median(raws[i]["cpu_per_image_ms"] for i in range(len(raws))) / statistics.median(
            r["cpu_per_image_ms"] for r in runs)
    shares = {k: round(statistics.mean(r["shares"][k] for r in runs), 4) for k in runs[0]["shares"]}
    result = {
        "images": len(pixels), "batch_size": args.batch_size, "in_flight": args.in_flight, "rounds": args.rounds,
        "raw_triton_images_per_s": [r["images_per_s"] for r in raws],
        "indexer_images_per_s": [r["images_per_s"] for r in runs],
        "ratios": [round(x, 3) for x in ratios],
        "ratio": round(ratio, 3),
        "ratio_incl_process_start": round(statistics.median(wall_ratios), 3),
        "cpu_per_image_ms": {"raw": [round(r["cpu_per_image_ms"], 2) for r in raws] if triton_pid else None,
                             "indexer": [round(r["cpu_per_image_ms"], 2) for r in runs] if triton_pid else None},
        "ratio_from_cpu": round(cpu_ratio, 3) if cpu_ratio else None,
        "triton_idle_fraction": [round(r["triton_idle_s"] / r["elapsed_s"], 3) for r in runs],
        "stage_shares": shares,
        "stage_seconds": [r["stages_s"] for r in runs],
        "indexer_workers": runs[0]["settings"]["workers"],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_1m_at_end": round(os.getloadavg()[0], 2)},
        "indexer_reports": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"ratio indexer / raw Triton = {ratio:.2f} (median of {', '.join(f'{x:.2f}' for x in ratios)}; "
          f"target >= 0.80); counting the indexer's process start-up: {result['ratio_incl_process_start']:.2f}")
    if cpu_ratio:
        print(f"CPU per image: raw {statistics.median(r['cpu_per_image_ms'] for r in raws):.1f} ms, indexer "
              f"{statistics.median(r['cpu_per_image_ms'] for r in runs):.1f} ms (Triton + indexer processes) "
              f"-> ratio on a dedicated CPU-bound machine ~ {cpu_ratio:.2f}")
    print("indexer time shares: " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items())
          + " (decode = worker-seconds reading + decoding; infer = Triton request-seconds; upsert = Milvus)")
    print(f"load average at the end: {result['machine']['loadavg_1m_at_end']} on {os.cpu_count()} CPUs")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
