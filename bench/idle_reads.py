"""Reads after idle spells on Milvus Lite embedded: how many fail, how many were sent again.

Milvus Lite embedded (a ``.db`` path) serves pymilvus over gRPC with the default server policy,
which answers pymilvus' 10-second keepalive pings on an idle connection with GOAWAY
"too_many_pings"; a read in flight at that moment fails unserved. Each process here opens its
own store, then every ``wait`` seconds makes one search and one get, for ``--minutes``; the
store's log says when it sent a read once more.

  python -m bench.idle_reads --waits 40 47 53 70 --minutes 5
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from imgsearch.store import Row, SearchQuery, VectorStore

RESENT = "trying once more"


def reader(wait_s: float, minutes: float) -> None:
    """One process: reads every ``wait_s``; prints one JSON line per read."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    store = VectorStore(str(Path(tempfile.mkdtemp(prefix="idle-reads-")) / "x.db"), "images")
    store.open(8, "sha", patient=True)
    vector = np.ones(8, dtype=np.float32)
    store.upsert([Row(1, "a.jpg", "a", vector)])
    t0 = time.monotonic()
    while time.monotonic() - t0 < minutes * 60:
        time.sleep(wait_s)
        try:
            store.search_many([SearchQuery(vector)])
            store.get_many([1], with_embedding=True)
            print(json.dumps({"ok": True}), flush=True)
        except Exception as e:  # noqa: BLE001 - counted and shown, whatever it is
            print(json.dumps({"ok": False, "error": str(e)[:300]}), flush=True)
    store.close()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--waits", type=float, nargs="+", default=[40, 47, 53, 70],
                   help="seconds between reads, one process each (default: %(default)s)")
    p.add_argument("--minutes", type=float, default=5.0, help="how long each process reads (default: %(default)s)")
    p.add_argument("--reader", type=float, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.reader is not None:
        reader(args.reader, args.minutes)
        return 0
    procs = {w: subprocess.Popen([sys.executable, "-m", "bench.idle_reads", "--reader", str(w), "--minutes",
                                  str(args.minutes)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for w in args.waits}
    total = {"reads": 0, "failed": 0, "sent_again": 0}
    for w, proc in procs.items():
        out, _ = proc.communicate()
        lines = out.splitlines()
        reads = [json.loads(ln) for ln in lines if ln.startswith("{")]
        row = {"reads": len(reads), "failed": sum(not r["ok"] for r in reads),
               "sent_again": sum(RESENT in ln for ln in lines)}
        print(f"every {w:g} s: {row}" + "".join(f"\n  {r['error']}" for r in reads if not r["ok"]))
        total = {k: total[k] + row[k] for k in total}
    print(f"all: {total}")
    return 1 if total["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
