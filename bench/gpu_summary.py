"""Markdown from a GPU check's result file: the GPU targets, where the time went, and
the capacity line docs/deploy.md quotes.

  python -m bench.gpu_summary bench/results/gpu-2026-12-01.json
  python -m bench.gpu_summary loadtest/out/gpu-dry/gpu-*-dry.json     # a dry run (figures meaningless)

Every number printed is read from the file; nothing is estimated. Where a target does not
hold, the section under it shows the measured split (Triton queue vs compute per level, the
gateway's own stage times vs what the client saw) that says where the time goes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

TARGETS = (
    ("Triton ÷ raw model", "triton_vs_raw", ">=", 0.6),
    ("indexer ÷ raw model", "indexer_vs_raw", ">=", 0.5),
    ("`/v1/search` req/s with p99 ≤ 50 ms", "search_req_s", ">=", 2000),
    ("dynamic batching ÷ none at c={c}", "dyn_vs_nobatch", ">=", 5),
)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
    return "—" if v is None else str(v)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return out


def _stages(d: dict | None) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in d.items()) if d else ""


def targets(r: dict) -> list[tuple[str, Any, str, bool | str | None]]:
    """(name, measured, target text, holds: True/False, None when not measured, "n/a" in a dry run)."""
    raw = r.get("raw_model_img_s")
    measured = {
        "triton_vs_raw": r["triton_img_s"] / raw if raw and r.get("triton_img_s") else None,
        "indexer_vs_raw": r["indexer_img_s"] / raw if raw and r.get("indexer_img_s") else None,
        "search_req_s": r.get("search_req_s"),
        "dyn_vs_nobatch": r.get("dyn_vs_nobatch"),
    }
    rows = []
    for name, key, _, bound in TARGETS:
        v = measured[key]
        holds = None if v is None else v >= bound
        if key == "search_req_s" and v is not None:
            holds = holds and (r.get("search_p99_ms") or 1e9) <= 50
        if r.get("mode", "").startswith("dry"):
            holds = None if v is None else "n/a (dry run)"
        rows.append((name.format(c=r.get("dyn_vs_nobatch_at_concurrency", 64)), v, f"≥ {bound:g}", holds))
    return rows


def capacity_line(r: dict) -> str:
    at = r.get("triton_img_s_at") or {}
    return (f"One {r.get('device')}: raw engine {_fmt(r.get('raw_model_img_s'))} img/s; through Triton "
            f"{_fmt(r.get('triton_img_s'))} img/s (c={at.get('concurrency')}, {at.get('images_per_request')} "
            f"image(s) per request); indexer {_fmt(r.get('indexer_img_s'))} img/s from JPEG files "
            f"({r.get('indexer_source')}); `/v1/search` {_fmt(r.get('search_req_s'))} req/s at p99 "
            f"{_fmt(r.get('search_p99_ms'))} ms (c={r.get('search_at_concurrency')}). "
            f"Source: gpu_check run of {r.get('started')}.")


def markdown(r: dict) -> str:
    lines = [f"## GPU check: {r.get('device')}, {r.get('started')} ({r.get('mode')})", ""]
    env = r.get("env", {})
    lines.append(f"python {env.get('python')}, torch {env.get('torch')}, {env.get('cpus')} CPUs; "
                 f"Triton input for the indexer CLI and the gateway: {r.get('triton_input', '—')}.")
    lines.append("")
    lines += _table(["target", "measured", "target", "holds"],
                    [[n, v, t, {True: "yes", False: "**no**", None: "not measured"}.get(h, h)] for n, v, t, h in targets(r)])
    lines += ["", "Phases: " + ", ".join(f"{k} {v.get('status')}" + (f" ({v['seconds']} s)" if "seconds" in v else "")
                                          for k, v in r.get("phases", {}).items())]
    for n in r.get("notes", []):
        lines.append(f"- note: {n}")

    lines += ["", "### Raw engine (outside Triton)", ""]
    lines += _table(["mode", "batch", "ms", "img/s"],
                    [[x["mode"], x["batch"], x["ms"], x["img_s"]] for x in r.get("raw_table", [])])

    lines += ["", "### Triton sweep (gRPC): where the time goes", ""]
    lines += _table(["model", "c", "img/req", "img/s", "p50 ms", "p99 ms", "avg batch", "queue ms/req",
                     "compute ms/exec", "errors"],
                    [[x["model"], x["concurrency"], x["images_per_request"], x["img_s"], x["p50_ms"], x["p99_ms"],
                      x["avg_batch"], x["queue_ms_per_req"], x["compute_ms_per_exec"], x["errors"] or ""]
                     for x in r.get("triton_table", [])])

    if "bytes_probe" in r:
        lines += ["", f"Bytes-path probe (Triton's preprocess vs decode_image): `{json.dumps(r['bytes_probe'])}`"]

    lines += ["", "### Indexer (JPEG files on disk)", ""]
    lines += _table(["path", "img/s", "images", "stage seconds"],
                    [[x["path"], x.get("img_s"), x.get("indexed", x.get("images")),
                      _stages(x.get("stages_s") or x.get("stage_s_summed")) or x.get("error")]
                     for x in r.get("indexer_table", [])])
    lines += ["", f"`indexer_img_s` (the `imgsearch index` run): {_fmt(r.get('indexer_img_s'))} img/s; "
              f"`bytes_path_img_s` ({r.get('bytes_path_measured', 'not run')}): {_fmt(r.get('bytes_path_img_s'))} img/s."]

    lines += ["", "### `/v1/search` (multipart JPEG, top_k 10)", ""]
    rows = []
    for x in r.get("search_table", []):
        server = x.get("server_timings_ms_avg", {})
        total, mean = server.get("total"), x.get("mean_ms")
        # what a client waited beyond the handler's own timing: HTTP, multipart parsing, uvicorn's queue
        outside = round(mean - total, 2) if isinstance(total, (int, float)) and isinstance(mean, (int, float)) else None
        rows.append([x["concurrency"], x["req_s"], x["p50_ms"], x["p99_ms"], mean, server.get("decode"),
                     server.get("infer"), server.get("search"), total, outside, x["status"]])
    lines += _table(["c", "req/s", "p50 ms", "p99 ms", "mean ms", "decode ms", "infer ms", "milvus ms",
                     "handler total ms", "mean outside the handler ms", "status"], rows)
    lines += ["", "### Capacity line for docs/deploy.md", "", capacity_line(r), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_summary", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("result", type=Path, help="gpu-<date>.json written by bench/gpu_check.sh")
    args = p.parse_args(argv)
    try:
        r = json.loads(args.result.read_text())
    except (OSError, json.JSONDecodeError) as e:
        print(f"cannot read {args.result}: {e}", file=sys.stderr)
        return 2
    print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
