"""Gateway CPU per request: this checkout against another revision of the project, side by side.

Both gateways are started by ``imgsearch serve`` (the revision's from a ``git archive`` of it:
:func:`harness.stack.checkout`) over one Milvus Lite server holding ``--vectors`` synthetic
2048-d vectors, and measured as :mod:`bench.profile_gateway` measures them (the gateway
process' own CPU time over a run of ``GET /v1/images/{id}/similar``, divided by the requests),
in alternating rounds (this, that, this, that, ...) at each client count, so whatever else
the machine does hits both alike. Runs of one code differ by several percent between rounds:
the medians (:mod:`imgsearch.stats`, nearest rank) and their ratio are what the results file
reports.

  python -m bench.gateway_ab a442fca --rounds 5 --requests 1500 --clients 1 32
"""

from __future__ import annotations

import argparse
import functools
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import write_results
from bench.profile_gateway import measure, similar_stack
from harness.stack import REPO_ROOT, checkout, commit, start_gateway
from imgsearch.stats import percentile


def tree_is_clean() -> bool:
    """Whether this checkout's tracked files are those of its HEAD (what ``this_commit`` names)."""
    return not subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                              check=True, capture_output=True, text=True).stdout.strip()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("baseline", metavar="REV", help="the revision to measure beside this checkout")
    p.add_argument("--requests", type=int, default=1500, help="requests per round (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=5, help="rounds of each gateway per client count (default: %(default)s)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 32], help="client counts (default: %(default)s)")
    p.add_argument("--vectors", type=int, default=5000, help="collection size (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("bench/results/gateway-ab.json"), help="(default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="gateway-ab-"))
    t0 = time.perf_counter()
    res: dict = {"baseline": args.baseline, "baseline_commit": commit(args.baseline), "this_commit": commit("HEAD"),
                 "this_tree_clean": tree_is_clean(), "by_clients": []}
    base = checkout(res["baseline_commit"], tmp / "baseline")
    milvus, env, _, _, similar = similar_stack(tmp, args.vectors)

    sides = {"this": start_gateway, "baseline": functools.partial(start_gateway, checkout=base)}
    try:
        for clients in args.clients:
            rounds: dict[str, list[float]] = {side: [] for side in sides}
            for r in range(args.rounds):
                for side, start in sides.items():
                    m = measure(env, similar, args.requests, tmp, f"{side}-{clients}-{r}", False, clients, start)
                    rounds[side].append(m["gateway_cpu_ms_per_request"])
                    print(f"  {clients:3d} client(s) round {r + 1}/{args.rounds} {side:8s} "
                          f"{m['gateway_cpu_ms_per_request']:.3f} ms gateway CPU per similar", flush=True)
            med = {side: round(percentile(v, 50), 3) for side, v in rounds.items()}
            res["by_clients"].append({"clients": clients, "rounds_ms": rounds, "median_ms": med,
                                      "ratio_this_to_baseline": round(med["this"] / med["baseline"], 3)})
    finally:
        milvus.stop()
    write_results(res, args, "bench.gateway_ab", argv, t0)
    for row in res["by_clients"]:
        print(f"{row['clients']} client(s): this {row['median_ms']['this']} ms, {args.baseline} "
              f"{row['median_ms']['baseline']} ms per similar (x{row['ratio_this_to_baseline']})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
