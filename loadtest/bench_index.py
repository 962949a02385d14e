"""Indexer throughput against raw Triton throughput, on the same images, in one run.

raw      the images are decoded first (not timed), then sent straight to Triton as uint8
         batches of --batch-size with --in-flight requests at once: the ceiling.
indexer  ``imgsearch index`` end to end (read, hash, decode in workers, Triton, Milvus
         upsert) into a fresh collection, same batch size and in-flight count.

The raw pass runs before and after the indexer pass and the mean is the reference, so a
change in machine load during the run shows up as a gap between the two raw figures.
Prints the ratio and the indexer's time per stage (decode / infer / upsert), and writes
everything as JSON to --out.

examples:
  python loadtest/bench_index.py data/images --out outputs/bench_index.json
  IMGSEARCH_MODEL_REPOSITORY=/tmp/repo18 python loadtest/bench_index.py --generate 1000
  IMGSEARCH_TRITON_URL=127.0.0.1:8101 python loadtest/bench_index.py data/images --limit 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from imgsearch.errors import ImageError
from imgsearch.imaging import decode_image
from imgsearch.settings import Settings
from imgsearch.triton_client import TritonEncoder, with_backoff

SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp"}


def list_images(root: Path, limit: int | None) -> list[Path]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file()
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
        sem = asyncio.Semaphore(in_flight)

        async def one(i: int) -> int:
            async with sem:
                res = await with_backoff(lambda: enc.encode(pixels[i : i + batch]))
                return res.embeddings.shape[0]

        t0 = time.perf_counter()
        done = sum(await asyncio.gather(*[one(i) for i in range(0, len(pixels), batch)]))
        dt = time.perf_counter() - t0
    finally:
        await enc.close()
    return {"images": done, "seconds": round(dt, 3), "images_per_s": round(done / dt, 2)}


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image_root", nargs="?", type=Path, help="images to index (or use --generate)")
    ap.add_argument("--generate", type=int, metavar="N", help="build N demo images first (imgsearch demo-data)")
    ap.add_argument("--limit", type=int, help="use only the first N files")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--in-flight", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0, help="indexer decode processes (default: its own)")
    ap.add_argument("--out", type=Path, default=Path("outputs/bench_index.json"))
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
        url = settings.triton_url
        if not url:
            from imgsearch.triton_server import LocalTriton

            server = stack.enter_context(LocalTriton(settings.model_repository, settings.model_config_name))
            url = server.grpc_url
        print(f"{len(files)} files under {root}; Triton {url}; batch {args.batch_size}, in flight {args.in_flight}",
              flush=True)
        pixels = decode_all(files, settings.image_size)

        def raw() -> dict:
            return asyncio.run(raw_triton(url, settings.model_name, settings.triton_protocol, pixels,
                                          args.batch_size, args.in_flight))

        raw1 = raw()
        print(f"raw Triton (before): {raw1['images_per_s']:.1f} images/s", flush=True)
        idx = run_indexer(root, url, workdir, args)
        print(f"indexer:             {idx['images_per_s']:.1f} images/s "
              f"({idx['indexed']} indexed in {idx['elapsed_s']:.1f}s; process wall {idx['process_wall_s']:.1f}s)",
              flush=True)
        raw2 = raw()
        print(f"raw Triton (after):  {raw2['images_per_s']:.1f} images/s", flush=True)

    raw_rate = (raw1["images_per_s"] + raw2["images_per_s"]) / 2
    ratio = idx["images_per_s"] / raw_rate if raw_rate else 0.0
    wall_rate = idx["indexed"] / idx["process_wall_s"]
    shares = idx["shares"]
    result = {
        "images": len(pixels), "batch_size": args.batch_size, "in_flight": args.in_flight,
        "raw_triton_images_per_s": [raw1["images_per_s"], raw2["images_per_s"]],
        "raw_triton_mean_images_per_s": round(raw_rate, 2),
        "indexer_images_per_s": idx["images_per_s"],
        "ratio": round(ratio, 3),
        "ratio_incl_process_start": round(wall_rate / raw_rate, 3) if raw_rate else 0.0,
        "stage_seconds": idx["stages_s"], "stage_shares": shares,
        "indexer_workers": idx["settings"]["workers"],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_1m": round(os.getloadavg()[0], 2)},
        "indexer_report": idx,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"ratio indexer / raw Triton = {ratio:.2f} (target >= 0.80); "
          f"including process start-up {result['ratio_incl_process_start']:.2f}")
    print("indexer time shares: " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items())
          + " (decode = worker-seconds reading + decoding; infer = Triton request-seconds; upsert = Milvus)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
