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
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import command_line
from imgsearch.loadtest.cli import machine_info
from imgsearch.store import Row, SearchQuery, VectorStore

RESENT = "trying once more"


def reader(wait_s: float, minutes: float) -> None:
    """One process: reads every ``wait_s``; prints one JSON line per read."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    folder = Path(tempfile.mkdtemp(prefix="idle-reads-"))
    store = VectorStore(str(folder / "x.db"), "images")
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
    shutil.rmtree(folder, ignore_errors=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--waits", type=float, nargs="+", default=[40, 47, 53, 70],
                   help="seconds between reads, one process each (default: %(default)s)")
    p.add_argument("--minutes", type=float, default=5.0, help="how long each process reads (default: %(default)s)")
    p.add_argument("--out", type=Path, help="also write the counts here as JSON")
    p.add_argument("--reader", type=float, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.reader is not None:
        reader(args.reader, args.minutes)
        return 0
    procs = {w: subprocess.Popen([sys.executable, "-m", "bench.idle_reads", "--reader", str(w), "--minutes",
                                  str(args.minutes)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for w in args.waits}
    rows, crashed = {}, []
    for w, proc in procs.items():
        out, err = proc.communicate()
        if proc.returncode:
            crashed.append(f"the reader every {w:g} s exited {proc.returncode}: {err[-1500:]}")
        lines = out.splitlines()
        reads = [json.loads(ln) for ln in lines if ln.startswith("{")]
        rows[f"{w:g}"] = {"reads": len(reads), "failed": sum(not r["ok"] for r in reads),
                          "sent_again": sum(RESENT in ln for ln in lines),
                          "errors": [r["error"] for r in reads if not r["ok"]]}
        print(f"every {w:g} s: " + ", ".join(f"{k} {v}" for k, v in rows[f"{w:g}"].items() if k != "errors")
              + "".join(f"\n  {e}" for e in rows[f"{w:g}"]["errors"]))
    total = {k: sum(r[k] for r in rows.values()) for k in ("reads", "failed", "sent_again")}
    print(f"all: {total}" + "".join(f"\n{c}" for c in crashed))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"total": total, "every_s": rows, "minutes": args.minutes,
                                        "machine": machine_info(),
                                        "command": command_line("bench.idle_reads", argv)}, indent=2) + "\n")
    return 1 if total["failed"] or crashed or not total["reads"] else 0


if __name__ == "__main__":
    sys.exit(main())
