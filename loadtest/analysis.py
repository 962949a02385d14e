"""A load-test run folder as numbers: the summary that ``summary.json``, the plots and the page show.

Inputs, all written by ``imgsearch loadtest`` into one folder:

- ``requests.csv``: one line per request from the locustfile (end time, latency, users,
  name, outcome ok/shed/fail, status). Exact percentiles per endpoint and per users level
  come from here: Locust's own history holds 10-second rolling percentiles only.
- ``locust_stats.csv``, ``locust_stats_history.csv``, ``locust_failures.csv``: Locust's CSVs
  (cross-check of the totals, failure messages, users over time).
- ``metrics.jsonl``: Triton and gateway ``/metrics`` scraped once a second
  (:mod:`imgsearch.loadtest.scrape`); counters become rates by differencing consecutive scrapes.
- ``run.json``: how the run was made (command, host, shape, machine).

Latency figures are of *served* requests (outcome ok): a shed request (429/503 with
Retry-After) answers in microseconds and would flatter the percentiles; it is counted
in the shed ratio instead, and failures in the failure ratio. Percentiles computed here
are nearest-rank (:mod:`imgsearch.stats`); Locust's own, copied from its CSV, are not (see
:func:`locust_csvs`).
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgsearch.stats import percentiles as nearest_rank

from .scenario import SHED_PREFIX

REQUEST_LOG = "requests.csv"
METRICS = "metrics.jsonl"
RUN = "run.json"
SUMMARY = "summary.json"
LOCUST_PREFIX = "locust"
STAGES = ("decode", "infer", "search")
SEARCH = "POST /v1/search"  # the request that runs the model: its latency is reported on its own too
DEFAULT_KNEE_P99_MS = 1000.0
MIN_LEVEL_WINDOW_S = 3.0  # a users level held shorter than this is a ramp, not a measurement


class ReportError(Exception):
    """The run folder lacks what a report needs (no request was made, files missing)."""


# --- SLO ------------------------------------------------------------------------------
@dataclass
class Slo:
    p95_ms: float | None = None
    p99_ms: float | None = None
    max_failure_ratio: float | None = None
    max_shed_ratio: float | None = None

    @property
    def knee_p99_ms(self) -> float:
        """The p99 a users level must meet to count for the knee."""
        return self.p99_ms if self.p99_ms else DEFAULT_KNEE_P99_MS

    def checks(self, summary: dict) -> list[dict]:
        """One row per configured limit: name, limit, measured, ok."""
        t = summary["totals"]
        rows = []

        def add(name: str, limit: float | None, measured: float | None, unit: str) -> None:
            if limit is None:
                return
            ok = measured is not None and not math.isnan(measured) and measured <= limit
            rows.append({"name": name, "limit": limit, "measured": measured, "unit": unit, "ok": ok})

        slow = t["slowest"]
        for q, limit in (("p95", self.p95_ms), ("p99", self.p99_ms)):
            who = slow.get(f"{q}_name")
            add(f"{q} of {who}" if who else q, limit, slow.get(f"{q}_ms"), "ms")
        add("failure ratio", self.max_failure_ratio, t["failure_ratio"], "")
        add("shed ratio", self.max_shed_ratio, t["shed_ratio"], "")
        return rows

    def violations(self, summary: dict) -> list[str]:
        out = []
        for c in self.checks(summary):
            if not c["ok"]:
                m = "n/a (no served request)" if c["measured"] is None else _fmt(c["measured"], c["unit"])
                out.append(f"{c['name']} {m} > {_fmt(c['limit'], c['unit'])}")
        return out


def _fmt(v: float, unit: str) -> str:
    if unit == "ms":
        return f"{v:.1f} ms" if v >= 1 else f"{v:.3g} ms"
    return f"{v:.2%}" if v >= 0.0001 or v == 0 else f"{v:.2g}"


# --- request log ----------------------------------------------------------------------
@dataclass
class RequestLog:
    end: np.ndarray  # unix seconds at completion
    ms: np.ndarray
    users: np.ndarray
    name: np.ndarray  # "METHOD name" without the shed: prefix
    outcome: np.ndarray  # ok | shed | fail
    status: np.ndarray
    error: np.ndarray
    state: np.ndarray  # Locust's runner state: spawning | running | stopping ("" in old logs)

    def __len__(self) -> int:
        return len(self.end)

    def subset(self, mask: np.ndarray) -> "RequestLog":
        return RequestLog(*(getattr(self, f)[mask] for f in self.__dataclass_fields__))


def read_request_log(path: str | Path) -> RequestLog:
    rows = []
    with Path(path).open(newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            try:
                name = r["name"]
                if name.startswith(SHED_PREFIX):
                    name = name[len(SHED_PREFIX):]
                rows.append((float(r["end"]), float(r["ms"]), int(r["users"]), f"{r['method']} {name}",
                             r["outcome"], int(r["status"] or 0), r.get("error") or "", r.get("state") or ""))
            except (KeyError, ValueError):
                continue  # a torn last line from a killed run
    rows.sort(key=lambda x: x[0])
    cols = list(zip(*rows)) if rows else [[]] * 8
    return RequestLog(np.array(cols[0], dtype=float), np.array(cols[1], dtype=float),
                      np.array(cols[2], dtype=int), np.array(cols[3], dtype=object),
                      np.array(cols[4], dtype=object), np.array(cols[5], dtype=int),
                      np.array(cols[6], dtype=object), np.array(cols[7], dtype=object))


def percentiles(ms: np.ndarray) -> dict[str, float | None]:
    """p50/p95/p99 (nearest rank: an observed latency, never an interpolated one), max and mean."""
    if len(ms) == 0:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None, "mean_ms": None}
    p50, p95, p99 = nearest_rank(ms, [50, 95, 99])
    return {"p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "max_ms": float(ms.max()), "mean_ms": float(ms.mean())}


def counts(log: RequestLog, duration_s: float) -> dict[str, Any]:
    n = len(log)
    ok = int((log.outcome == "ok").sum())
    shed = int((log.outcome == "shed").sum())
    failed = int((log.outcome == "fail").sum())
    d = max(duration_s, 1e-9)
    out: dict[str, Any] = {"requests": n, "ok": ok, "shed": shed, "failed": failed,
                           "failure_ratio": failed / n if n else 0.0, "shed_ratio": shed / n if n else 0.0,
                           "rps": n / d, "ok_rps": ok / d}
    out.update(percentiles(log.ms[log.outcome == "ok"]))
    out["slowest"] = slowest(log)
    return out


def slowest(log: RequestLog) -> dict[str, Any]:
    """The endpoint with the highest p95 and the one with the highest p99 (served requests).

    SLO limits and the knee use these, not the all-requests percentiles: in a mix where a
    cheap endpoint answers 100 times for each search, the all-requests p99 is a cheap
    request's and would hide a search tail many times over the limit.
    """
    out: dict[str, Any] = {"p95_ms": None, "p95_name": None, "p99_ms": None, "p99_name": None}
    ok = log.outcome == "ok"
    for name in sorted(set(log.name[ok])):
        p = percentiles(log.ms[ok & (log.name == name)])
        for q in ("p95", "p99"):
            if out[f"{q}_ms"] is None or p[f"{q}_ms"] > out[f"{q}_ms"]:
                out[f"{q}_ms"], out[f"{q}_name"] = p[f"{q}_ms"], name
    return out


# --- users levels and the knee --------------------------------------------------------
def users_levels(log: RequestLog, t_end: float | None = None) -> list[dict]:
    """Requests grouped by the number of users running when they completed.

    A level's window is the time between its first completion and the first completion
    at another level (summed over its stretches), so rps = requests / window. Requests that
    completed while Locust was stopping its users (users falling back to 0, each level
    visited again briefly with the queue of the top one) belong to no level.
    """
    t_end = float(log.end[-1]) if t_end is None and len(log) else t_end
    stopping = log.state == "stopping"
    if stopping.any():
        t_end = min(t_end, float(log.end[stopping].min()))
        log = log.subset(~stopping)
    if len(log) == 0:
        return []
    change = np.flatnonzero(np.diff(log.users) != 0) + 1
    starts = np.concatenate([[0], change])
    stops = np.concatenate([change, [len(log)]])
    windows: dict[int, float] = defaultdict(float)
    members: dict[int, list[np.ndarray]] = defaultdict(list)
    segments: dict[int, list[list[float]]] = defaultdict(list)
    for a, b in zip(starts, stops):
        users = int(log.users[a])
        seg_end = float(log.end[b]) if b < len(log) else max(t_end, float(log.end[b - 1]))
        windows[users] += seg_end - float(log.end[a])
        members[users].append(np.arange(a, b))
        segments[users].append([float(log.end[a]), seg_end])
    levels = []
    for users in sorted(windows):
        sub = log.subset(np.concatenate(members[users]))
        row = {"users": users, "window_s": windows[users], "segments": segments[users]}
        row.update(counts(sub, windows[users]))
        search = (sub.outcome == "ok") & (sub.name == SEARCH)
        row["search_ok_rps"] = float(search.sum()) / max(windows[users], 1e-9)
        row["search"] = percentiles(sub.ms[search])
        levels.append(row)
    return levels


def find_knee(levels: list[dict], p99_ms: float, max_failure_ratio: float | None,
              min_window_s: float = MIN_LEVEL_WINDOW_S) -> dict | None:
    """The level with the highest served rps whose slowest endpoint keeps p99 <= ``p99_ms``
    (and failures within limit)."""
    ok = [lv for lv in levels
          if lv["window_s"] >= min_window_s and lv["slowest"]["p99_ms"] is not None
          and lv["slowest"]["p99_ms"] <= p99_ms
          and (max_failure_ratio is None or lv["failure_ratio"] <= max_failure_ratio)]
    return max(ok, key=lambda lv: lv["ok_rps"]) if ok else None


def time_bins(log: RequestLog, t0: float, bin_s: float) -> list[dict]:
    if len(log) == 0:
        return []
    idx = np.floor((log.end - t0) / bin_s).astype(int)
    out = []
    users = 0
    for b in range(max(0, int(idx.min())), int(idx.max()) + 1):
        sub = log.subset(idx == b)
        # a bin where nothing completed (slow searches) still had its users running
        users = int(sub.users.max()) if len(sub) else users
        row = {"t": (b + 0.5) * bin_s, "users": users}
        row.update(counts(sub, bin_s))
        out.append(row)
    return out


# --- scraped metrics ------------------------------------------------------------------
def _pairs(scrapes: list) -> list[tuple]:
    good = [s for s in scrapes if s.ok]
    return list(zip(good, good[1:]))


def pick_model(scrapes: list, model: str | None) -> str | None:
    """The model asked for when Triton reports it, else the busiest one."""
    last = next((s for s in reversed(scrapes) if s.ok), None)
    if last is None:
        return None
    models = last.label_values("nv_inference_count", "model")
    if model in models:
        return model
    return max(models, key=lambda m: last.value("nv_inference_count", model=m), default=None)


def triton_stats(scrapes: list, model: str | None, t0: float) -> dict:
    """Average batch size and per-request queue / compute time, overall and per interval."""
    model = pick_model(scrapes, model)
    if model is None:
        return {"model": None, "scrapes_ok": 0, "scrapes_failed": sum(1 for s in scrapes if not s.ok),
                "series": []}

    def d(a, b, name):
        return b.value(name, model=model) - a.value(name, model=model)

    def derived(a, b) -> dict:
        reqs, execs = d(a, b, "nv_inference_request_success"), d(a, b, "nv_inference_exec_count")
        infs = d(a, b, "nv_inference_count")
        return {
            "requests": reqs, "executions": execs, "inferences": infs,
            "avg_batch": infs / execs if execs > 0 else None,
            "queue_ms": d(a, b, "nv_inference_queue_duration_us") / reqs / 1000 if reqs > 0 else None,
            "compute_ms": d(a, b, "nv_inference_compute_infer_duration_us") / reqs / 1000 if reqs > 0 else None,
            "failures": d(a, b, "nv_inference_request_failure"),
        }

    series = []
    for a, b in _pairs(scrapes):
        row = derived(a, b)
        row.update(t=(a.t + b.t) / 2 - t0, rps=row["requests"] / max(b.t - a.t, 1e-9))
        series.append(row)
    good = [s for s in scrapes if s.ok]
    total = derived(good[0], good[-1]) if len(good) >= 2 else {}
    return {"model": model, "scrapes_ok": len(good), "scrapes_failed": len(scrapes) - len(good),
            "series": series, **total}


def gateway_stats(scrapes: list, t0: float) -> dict:
    """Mean ms per stage (decode / infer / search), in-flight, sheds and errors by kind."""

    def stage_ms(a, b, stage) -> float | None:
        n = b.value("imgsearch_stage_duration_seconds_count", stage=stage) - a.value(
            "imgsearch_stage_duration_seconds_count", stage=stage)
        s = b.value("imgsearch_stage_duration_seconds_sum", stage=stage) - a.value(
            "imgsearch_stage_duration_seconds_sum", stage=stage)
        return s / n * 1000 if n > 0 else None

    def by_label(a, b, name, label) -> dict[str, float]:
        keys = b.label_values(name, label)
        return {k: b.value(name, **{label: k}) - a.value(name, **{label: k}) for k in sorted(keys)}

    series = []
    for a, b in _pairs(scrapes):
        series.append({"t": (a.t + b.t) / 2 - t0, "inflight": b.value("imgsearch_inflight_requests"),
                       **{f"{st}_ms": stage_ms(a, b, st) for st in STAGES}})
    good = [s for s in scrapes if s.ok]
    out: dict[str, Any] = {"scrapes_ok": len(good), "scrapes_failed": len(scrapes) - len(good), "series": series}
    if len(good) >= 2:
        a, b = good[0], good[-1]
        out["stage_ms"] = {st: stage_ms(a, b, st) for st in STAGES}
        out["shed_by_reason"] = by_label(a, b, "imgsearch_shed_total", "reason")
        out["errors_by_code"] = by_label(a, b, "imgsearch_errors_total", "code")
        out["max_inflight"] = max((s.value("imgsearch_inflight_requests") for s in good), default=0.0)
    return out


# --- Locust's CSVs --------------------------------------------------------------------
def _read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _num(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def locust_csvs(out_dir: Path, prefix: str = LOCUST_PREFIX) -> dict:
    """Locust's own totals, per-request rows and failures, as its CSVs give them.

    Locust's percentiles are its own definition, not this module's: each response time is
    first rounded to about two significant digits (147 ms counts as 150), and the q-th
    percentile of n requests is the rounded time at 0-based position ``int(n * q / 100)``
    in sorted order. They cover every request, shed ones included, so they are a
    cross-check only; the report's percentiles are nearest rank over served requests.
    """
    stats = _read_csv(out_dir / f"{prefix}_stats.csv")
    agg = next((r for r in stats if r.get("Name") == "Aggregated"), None)
    history = _read_csv(out_dir / f"{prefix}_stats_history.csv")
    users = [int(float(r["User Count"])) for r in history if r.get("Name") == "Aggregated" and r.get("User Count")]
    return {
        "aggregated": None if agg is None else {
            "requests": int(float(agg["Request Count"])), "failures": int(float(agg["Failure Count"])),
            "p50_ms": _num(agg.get("50%")), "p95_ms": _num(agg.get("95%")), "p99_ms": _num(agg.get("99%")),
            "rps": _num(agg.get("Requests/s"))},
        "rows": [{"type": r["Type"], "name": r["Name"], "requests": int(float(r["Request Count"])),
                  "failures": int(float(r["Failure Count"])), "p50_ms": _num(r.get("50%")),
                  "p95_ms": _num(r.get("95%")), "p99_ms": _num(r.get("99%"))}
                 for r in stats if r.get("Name") != "Aggregated"],
        "failures": [{"method": r.get("Method"), "name": r.get("Name"), "error": r.get("Error"),
                      "occurrences": int(float(r.get("Occurrences") or 0))}
                     for r in _read_csv(out_dir / f"{prefix}_failures.csv")],
        "history_users": users,
    }


# --- the whole analysis ---------------------------------------------------------------
def analyse(out_dir: str | Path, slo: Slo | None = None, model: str | None = None) -> dict:
    """Everything the report shows, as plain data (written to ``summary.json``)."""
    from .scrape import load_scrapes

    out_dir = Path(out_dir)
    slo = slo or Slo()
    run = json.loads((out_dir / RUN).read_text()) if (out_dir / RUN).exists() else {}
    if not (out_dir / REQUEST_LOG).exists():
        raise ReportError(f"{out_dir / REQUEST_LOG} is missing: was the run made with --request-log?")
    log = read_request_log(out_dir / REQUEST_LOG)
    if len(log) == 0:
        raise ReportError("no request was made (see locust.log in the output folder)")
    first_start = float((log.end - log.ms / 1000).min())
    t0 = float(run.get("started_at") or first_start)
    t_end = float(run.get("finished_at") or log.end[-1])
    # the load lasted from the first request sent to the last one answered
    duration = max(float(log.end[-1]) - first_start, 1e-3)

    totals = counts(log, duration)
    totals["duration_s"] = duration
    by_name = []
    for name in sorted(set(log.name)):
        row = {"name": name}
        row.update(counts(log.subset(log.name == name), duration))
        by_name.append(row)
    mix = Counter()
    for o, st, nm, err in zip(log.outcome, log.status, log.name, log.error):
        if o != "ok":
            mix[(o, int(st), nm, err if o == "fail" else "")] += 1
    outcome_mix = [{"outcome": o, "status": st, "name": nm, "error": err, "count": c}
                   for (o, st, nm, err), c in mix.most_common()]

    levels = users_levels(log, t_end)
    is_step = run.get("shape") == "step"
    knee = find_knee(levels, slo.knee_p99_ms, slo.max_failure_ratio)
    # bins of >= 1 s holding ~20 served requests on average, so a bin's p99 is more than its max
    bin_s = float(min(max(1, math.ceil(duration / 150), math.ceil(20 * duration / max(totals["ok"], 1))),
                      max(1, math.ceil(duration / 10))))
    scrapes = load_scrapes(out_dir / METRICS)
    triton = triton_stats(scrapes.get("triton", []), model or run.get("model"), t0)
    gateway = gateway_stats(scrapes.get("gateway", []), t0)
    for lv in levels:
        lv["avg_batch"] = _window_batch(triton, lv, t0)
    summary = {
        "run": run,
        "totals": totals,
        "by_name": by_name,
        "outcome_mix": outcome_mix,
        "levels": levels,
        "knee": knee,
        "knee_rule": {"p99_ms": slo.knee_p99_ms, "max_failure_ratio": slo.max_failure_ratio,
                      "min_window_s": MIN_LEVEL_WINDOW_S, "shape": run.get("shape") or "constant",
                      "meaningful": is_step},
        "bins": time_bins(log, t0, bin_s),
        "bin_s": bin_s,
        "triton": triton,
        "gateway": gateway,
        "locust": locust_csvs(out_dir),
        "slo": asdict(slo),
    }
    summary["checks"] = slo.checks(summary)
    summary["violations"] = slo.violations(summary)
    return summary


def _window_batch(triton: dict, level: dict, t0: float) -> float | None:
    """Triton's average batch over the scrape intervals that fall inside a users level."""
    rows = [r for r in triton.get("series", []) if r["executions"] > 0
            and any(a - t0 <= r["t"] <= b - t0 for a, b in level["segments"])]
    execs = sum(r["executions"] for r in rows)
    return sum(r["inferences"] for r in rows) / execs if execs else None
