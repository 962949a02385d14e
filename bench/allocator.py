"""The gateway's allocator setting (:func:`imgsearch.imaging.unmap_large_allocations`), off and on,
side by side in one run.

* ``turns``: four decode threads under one :class:`~imgsearch.imaging.DecodeBudget` that fits
  one 49 MP RGBA raster and not two, four such PNGs at once, so the decodes take turns: the
  process's peak RSS over its peak before (what the memory limit must hold).
* ``jpeg`` and ``png``: a 12 MP photo-sized JPEG (decoded in draft mode) and PNG (decoded
  whole), one thread: CPU time and minor page faults per decode (what the setting costs).

Every (setting, case) runs in a fresh child process, and the settings alternate for
``--rounds`` rounds, so a shared machine's drift hits both alike.

  python -m bench.allocator --out bench/results/allocator.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import command_line
from harness.data import huge_png
from imgsearch.loadtest.cli import machine_info

CASES = ("turns", "jpeg", "png")
CHILD = r"""
import json, os, resource, sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import numpy as np
from PIL import Image
from harness.data import jpeg_bytes, png_bytes
from harness.stack import peak_rss_bytes
from imgsearch.imaging import DecodeBudget, decode_image, unmap_large_allocations

setting, case, repeats, png49 = sys.argv[1] == "on", sys.argv[2], int(sys.argv[3]), sys.argv[4]
if setting:
    assert unmap_large_allocations(), "no glibc mallopt here"

def peak() -> int:
    return peak_rss_bytes(os.getpid())

if case == "turns":
    data = Path(png49).read_bytes()  # made by the parent: making it here would set the peak
    budget = DecodeBudget(7000 * 7000 * 4 * 3 // 2, wait_s=600)
    decode_image(png_bytes(Image.new("RGB", (640, 480))), budget=budget)
    before = peak()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: decode_image(data, budget=budget), range(4)))
    print(json.dumps({"peak_rss_rise_mib": round((peak() - before) / 2**20, 1)}))
else:
    rng = np.random.default_rng(0)
    rgb = np.empty((3000, 4000, 3), np.uint8)
    rgb[..., 0] = np.linspace(0, 255, 4000, dtype=np.float32)[None, :]
    rgb[..., 1] = 100
    rgb[..., 2] = rng.integers(0, 256, (3000, 4000))
    data = (jpeg_bytes if case == "jpeg" else png_bytes)(Image.fromarray(rgb))
    for _ in range(3):
        decode_image(data)
    t, f = time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeats):
        decode_image(data)
    print(json.dumps({"file_mb": round(len(data) / 1e6, 1),
                      "cpu_ms_per_decode": round((time.process_time() - t) / repeats * 1e3, 1),
                      "minor_faults_per_decode": round((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f) / repeats)}))
"""


def run_child(setting: str, case: str, repeats: int, png49: Path) -> dict:
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = subprocess.run([sys.executable, "-c", CHILD, setting, case, str(repeats), str(png49)], cwd=root, env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="off/on rounds per case (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=20, help="decodes per child for jpeg and png (default: %(default)s)")
    ap.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    ap.add_argument("--out", type=Path, default=Path("bench/results/allocator.json"))
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    runs: dict[str, dict[str, list[dict]]] = {c: {"off": [], "on": []} for c in args.cases}
    with tempfile.TemporaryDirectory(prefix="bench-allocator-") as tmp:
        png49 = Path(tmp) / "rgba-7000.png"
        png49.write_bytes(huge_png("RGBA"))
        for case in args.cases:
            for r in range(args.rounds):
                for setting in ("off", "on"):
                    got = run_child(setting, case, args.repeats, png49)
                    runs[case][setting].append(got)
                    print(f"{case:<5} round {r + 1} {setting:<3} {got}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": command_line("bench.allocator", argv),
        "machine": {**machine_info(), "libc": " ".join(platform.libc_ver())},
        "runs": runs}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
