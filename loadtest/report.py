"""Turn a load-test run folder into numbers (``summary.json``), plots (PNG) and ``report.html``.

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
in the shed ratio instead, and failures in the failure ratio.
"""

from __future__ import annotations

import csv
import json
import math
import shlex
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .scenario import SHED_PREFIX

REQUEST_LOG = "requests.csv"
METRICS = "metrics.jsonl"
RUN = "run.json"
SUMMARY = "summary.json"
REPORT = "report.html"
LOCUST_PREFIX = "locust"
PLOTS = {
    "latency": "latency.png",
    "throughput": "throughput.png",
    "outcomes": "outcomes.png",
    "triton": "triton.png",
    "stages": "stages.png",
}
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
    """p50/p95/p99/max/mean; 'higher' = an observed latency, never an interpolated one."""
    if len(ms) == 0:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None, "mean_ms": None}
    p = np.percentile(ms, [50, 95, 99], method="higher")
    return {"p50_ms": float(p[0]), "p95_ms": float(p[1]), "p99_ms": float(p[2]),
            "max_ms": float(ms.max()), "mean_ms": float(ms.mean())}


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


# --- plots ----------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["t"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_latency(summary: dict, path: Path, slo: dict) -> None:
    plt = _plt()
    bins = summary["bins"]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for key, label, style in (("p50_ms", "p50", "-"), ("p95_ms", "p95", "-"), ("p99_ms", "p99", "-")):
        x, y = _series(bins, key)
        ax.plot(x, y, style, label=label, linewidth=1.6)
    for key, colour in (("p95_ms", "tab:orange"), ("p99_ms", "tab:green")):
        if slo.get(key):
            ax.axhline(slo[key], color=colour, linestyle="--", linewidth=1, label=f"SLO {key[:3]} {slo[key]:g} ms")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel(f"latency of served requests, ms ({summary['bin_s']:g} s bins)")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.step([r["t"] for r in bins], [r["users"] for r in bins], where="mid", color="grey", alpha=0.5,
             label="users")
    ax2.set_ylabel("users")
    ax2.set_ylim(bottom=0)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
    ax.set_title("Latency percentiles over time")
    _save(fig, path)


def plot_throughput(summary: dict, path: Path) -> None:
    plt = _plt()
    levels = [lv for lv in summary["levels"] if lv["window_s"] >= MIN_LEVEL_WINDOW_S] or summary["levels"]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    users = [lv["users"] for lv in levels]
    ok = np.array([lv["ok_rps"] for lv in levels])
    shed = np.array([lv["shed"] / max(lv["window_s"], 1e-9) for lv in levels])
    fail = np.array([lv["failed"] / max(lv["window_s"], 1e-9) for lv in levels])
    width = 0.8 * (min(np.diff(users)) if len(users) > 1 else 1)
    ax.bar(users, ok, width, label="served rps", color="tab:blue")
    ax.bar(users, shed, width, bottom=ok, label="shed rps", color="tab:orange")
    ax.bar(users, fail, width, bottom=ok + shed, label="failed rps", color="tab:red")
    ax.set_xlabel("users (concurrent clients)")
    ax.set_ylabel("requests / s")
    top = float((ok + shed + fail).max()) if len(users) else 1.0
    ax.set_ylim(0, top * 1.6 or 1)  # room above the bars for the legend and the knee label
    ax.grid(alpha=0.3, axis="y")
    ax2 = ax.twinx()
    ax2.plot(users, [lv["slowest"]["p99_ms"] for lv in levels], "o-", color="black",
             label="p99 of the slowest endpoint")
    ax2.plot(users, [lv["p99_ms"] for lv in levels], ".--", color="grey", label="p99 of all requests")
    rule = summary["knee_rule"]
    ax2.axhline(rule["p99_ms"], color="black", linestyle=":", linewidth=1, label=f"knee p99 limit {rule['p99_ms']:g} ms")
    ax2.set_ylabel("p99 of served requests, ms")
    p99s = [v for lv in levels for v in (lv["slowest"]["p99_ms"], lv["p99_ms"]) if v is not None]
    ax2.set_ylim(0, max(p99s + [rule["p99_ms"]]) * 1.6)
    knee = summary.get("knee")
    if knee:
        ax.annotate(f"knee: {knee['ok_rps']:.1f} rps @ {knee['users']} users",
                    xy=(knee["users"], knee["ok_rps"]), xytext=(0, 18), textcoords="offset points",
                    ha="center", fontsize=9, arrowprops={"arrowstyle": "->"})
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8, ncol=2)
    ax.set_title("Throughput vs users")
    _save(fig, path)


def plot_outcomes(summary: dict, path: Path) -> None:
    plt = _plt()
    bins = summary["bins"]
    mix = summary["outcome_mix"][:8]
    fig, (ax, axb) = plt.subplots(2, 1, figsize=(10, 4.2 + 0.45 * max(len(mix), 2)),
                                  gridspec_kw={"height_ratios": [3, 0.6 * max(len(mix), 2)]})
    t = [r["t"] for r in bins]
    ax.stackplot(t, [r["ok_rps"] for r in bins], [r["shed"] / summary["bin_s"] for r in bins],
                 [r["failed"] / summary["bin_s"] for r in bins], labels=["served", "shed", "failed"],
                 colors=["tab:blue", "tab:orange", "tab:red"], alpha=0.8)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("requests / s")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title("Served, shed and failed over time")
    if mix:
        labels = [f"{m['outcome']} {m['status'] or 'no response'}  {m['name']}"
                  + (f"  ({m['error'][:60]})" if m["error"] else "") for m in mix]
        colours = ["tab:orange" if m["outcome"] == "shed" else "tab:red" for m in mix]
        bars = axb.barh(range(len(mix)), [m["count"] for m in mix], color=colours)
        axb.set_yticks([])
        for bar, label in zip(bars, labels):  # labels inside the axes: long names never get cut off
            axb.text(0.005, bar.get_y() + bar.get_height() / 2, f"{label}: {int(bar.get_width())}",
                     transform=axb.get_yaxis_transform(), va="center", fontsize=8)
        axb.invert_yaxis()
        axb.set_xlabel("requests")
        axb.set_xlim(0, max(m["count"] for m in mix) * 1.05)
    else:
        axb.text(0.5, 0.5, "no shed and no failed request", ha="center", va="center", transform=axb.transAxes)
        axb.set_xticks([])
        axb.set_yticks([])
    axb.set_title("Error and shed mix", fontsize=10)
    _save(fig, path)


def plot_triton(summary: dict, path: Path) -> None:
    plt = _plt()
    tr = summary["triton"]
    fig, (ax, axq) = plt.subplots(1, 2, figsize=(11, 4.2))
    if tr.get("series"):
        x, y = _series(tr["series"], "avg_batch")
        ax.plot(x, y, "-o", markersize=3, color="tab:purple")
        ax.set_ylim(bottom=0)
        x, q = _series(tr["series"], "queue_ms")
        axq.plot(x, q, label="queue ms / request", color="tab:brown")
        x, c = _series(tr["series"], "compute_ms")
        axq.plot(x, c, label="compute ms / request", color="tab:cyan")
        axq.legend(fontsize=8)
        axq.set_ylim(bottom=0)
    else:
        for a in (ax, axq):
            a.text(0.5, 0.5, "no Triton metrics scraped", ha="center", va="center", transform=a.transAxes)
    ax.set_title(f"Triton average batch size ({tr.get('model') or 'n/a'})")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("images per execution")
    axq.set_title("Triton queue and compute time")
    axq.set_xlabel("seconds since start")
    axq.set_ylabel("ms")
    for a in (ax, axq):
        a.grid(alpha=0.3)
    _save(fig, path)


def plot_stages(summary: dict, path: Path) -> None:
    plt = _plt()
    gw = summary["gateway"]
    fig, (ax, axb) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 1]})
    series = gw.get("series", [])
    if series and any(r.get(f"{st}_ms") is not None for r in series for st in STAGES):
        rows = [r for r in series if all(r.get(f"{st}_ms") is not None for st in STAGES)]
        ax.stackplot([r["t"] for r in rows], *[[r[f"{st}_ms"] for r in rows] for st in STAGES],
                     labels=list(STAGES), alpha=0.85)
        ax.legend(loc="upper left", fontsize=8)
        ax2 = ax.twinx()
        ax2.plot([r["t"] for r in series], [r["inflight"] for r in series], color="black", linewidth=1,
                 label="in flight")
        ax2.set_ylabel("requests in flight")
        ax2.set_ylim(bottom=0)
        means = gw.get("stage_ms") or {}
        vals = [means.get(st) or 0.0 for st in STAGES]
        axb.bar(list(STAGES), vals, color=["tab:blue", "tab:orange", "tab:green"])
        for i, v in enumerate(vals):
            axb.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
        axb.set_ylabel("mean ms over the run")
    else:
        ax.text(0.5, 0.5, "no gateway stage metrics scraped", ha="center", va="center", transform=ax.transAxes)
        axb.set_xticks([])
    ax.set_title("Gateway time per search, by stage (mean per interval)")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("ms")
    ax.grid(alpha=0.3)
    axb.set_title("whole run")
    _save(fig, path)


def write_plots(summary: dict, out_dir: Path) -> dict[str, str]:
    slo = {"p95_ms": summary["slo"]["p95_ms"], "p99_ms": summary["slo"]["p99_ms"]}
    plot_latency(summary, out_dir / PLOTS["latency"], slo)
    plot_throughput(summary, out_dir / PLOTS["throughput"])
    plot_outcomes(summary, out_dir / PLOTS["outcomes"])
    plot_triton(summary, out_dir / PLOTS["triton"])
    plot_stages(summary, out_dir / PLOTS["stages"])
    return dict(PLOTS)


# --- HTML -----------------------------------------------------------------------------
def _jinja_env():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]), undefined=jinja2.StrictUndefined)

    def ms(v):
        return "–" if v is None else (f"{v:.1f}" if v >= 1 else f"{v:.3f}")

    def pct(v):
        return "–" if v is None else f"{v:.2%}"

    def num(v, digits=1):
        return "–" if v is None else f"{v:.{digits}f}"

    env.filters.update(ms=ms, pct=pct, num=num)
    return env


def render_html(summary: dict, out_dir: Path, plots: dict[str, str]) -> Path:
    links = [(name, name) for name in ("locust.html", f"{LOCUST_PREFIX}_stats.csv",
                                       f"{LOCUST_PREFIX}_stats_history.csv", f"{LOCUST_PREFIX}_failures.csv",
                                       REQUEST_LOG, METRICS, SUMMARY, "locust.log")
             if (out_dir / name).exists()]
    page = _jinja_env().get_template("report.html.j2").render(
        s=summary, plots=plots, links=links, min_window_s=MIN_LEVEL_WINDOW_S,
        command=shlex.join(summary["run"].get("argv", [])))
    path = out_dir / REPORT
    path.write_text(page, encoding="utf-8")
    return path


def build_report(out_dir: str | Path, slo: Slo | None = None, model: str | None = None) -> dict:
    """analyse + summary.json + PNG plots + report.html; returns the summary."""
    out_dir = Path(out_dir)
    summary = analyse(out_dir, slo, model)
    (out_dir / SUMMARY).write_text(json.dumps(summary, indent=1, default=_json_default))
    plots = write_plots(summary, out_dir)
    render_html(summary, out_dir, plots)
    return summary


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
