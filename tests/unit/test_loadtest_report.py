"""Report numbers from a synthetic run folder whose answers are known by construction."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from imgsearch.loadtest.analysis import (
    ReportError,
    Slo,
    analyse,
    find_knee,
    percentiles,
    users_levels,
)
from imgsearch.loadtest.report import build_report
from imgsearch.loadtest.scrape import select_samples

T0 = 1_800_000_000.0
# users level -> (served per second, latency ms of served requests)
LEVELS = {2: (20, 10.0), 4: (40, 30.0), 6: (42, 400.0)}
STEP_S = 10


def write_run(d, with_metrics=True):
    rng = np.random.default_rng(0)
    rows = []
    for k, (users, (rps, ms)) in enumerate(LEVELS.items()):
        for i in range(rps * STEP_S):
            end = T0 + k * STEP_S + (i + 0.5) / rps
            lat = ms * (1 + 0.2 * rng.random())
            name = "/v1/search" if i % 3 else "/v1/images/[id]/similar"
            rows.append([f"{end:.4f}", f"{lat:.2f}", users, "POST" if i % 3 else "GET", name, "ok", 200, ""])
        if users == 6:  # overload: sheds and a few failures at the top step
            for i in range(30):
                rows.append([f"{T0 + k * STEP_S + i * 0.3:.4f}", "0.80", users, "POST", "shed:/v1/search",
                             "shed", 503, ""])
            for i in range(6):
                rows.append([f"{T0 + k * STEP_S + i:.4f}", "5.00", users, "POST", "/v1/search", "fail", 500,
                             "CatchResponseError('HTTP 500 internal')"])
    with (d / "requests.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["end", "ms", "users", "method", "name", "outcome", "status", "error", "state"])
        w.writerows(r + ["running"] for r in rows)
    (d / "run.json").write_text(json.dumps({"host": "http://127.0.0.1:9", "shape": "step", "users": 6,
                                            "step_users": 2, "step_time": STEP_S, "started_at": T0,
                                            "model": "resnet152", "argv": ["imgsearch", "loadtest"],
                                            "machine": {"description": "test box"}}))
    if not with_metrics:
        return rows
    lines = []
    for s in range(0, 3 * STEP_S + 1):
        lab = '{model="resnet152",version="1"}'
        # per second: 30 requests, batched 3 per execution; queue 2 ms and compute 20 ms per request
        tri = (f"nv_inference_request_success{lab} {30 * s}\nnv_inference_count{lab} {30 * s}\n"
               f"nv_inference_exec_count{lab} {10 * s}\nnv_inference_queue_duration_us{lab} {30 * s * 2000}\n"
               f"nv_inference_compute_infer_duration_us{lab} {30 * s * 20000}\n"
               f'nv_inference_count{{model="other",version="1"}} 5\n')
        gw = "".join(f'imgsearch_stage_duration_seconds_sum{{stage="{st}"}} {25 * s * sec}\n'
                     f'imgsearch_stage_duration_seconds_count{{stage="{st}"}} {25 * s}\n'
                     for st, sec in (("decode", 0.004), ("infer", 0.050), ("search", 0.002)))
        gw += f'imgsearch_inflight_requests {min(s, 5)}\nimgsearch_shed_total{{reason="inflight"}} {s}\n'
        lines.append({"t": T0 + s, "target": "triton", "ok": True,
                      "samples": select_samples(tri, ("nv_inference_",))})
        lines.append({"t": T0 + s, "target": "gateway", "ok": True, "samples": select_samples(gw, ("imgsearch_",))})
        if s == 15:  # one failed scrape in the middle: skipped, not a zero
            lines.append({"t": T0 + s + 0.5, "target": "triton", "ok": False, "error": "timed out"})
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return rows


def test_totals_and_percentiles_are_exact(tmp_path):
    rows = write_run(tmp_path)
    s = analyse(tmp_path, Slo(p99_ms=100))
    t = s["totals"]
    ok_ms = np.array([float(r[1]) for r in rows if r[5] == "ok"])
    assert t["requests"] == len(rows) and t["ok"] == len(ok_ms) and t["shed"] == 30 and t["failed"] == 6
    assert t["failure_ratio"] == pytest.approx(6 / len(rows)) and t["shed_ratio"] == pytest.approx(30 / len(rows))
    assert t["p99_ms"] == np.sort(ok_ms)[-(-len(ok_ms) * 99 // 100) - 1]  # nearest rank: the ceil(0.99 n)-th
    assert t["p50_ms"] <= t["p95_ms"] <= t["p99_ms"] <= t["max_ms"]
    names = {r["name"]: r for r in s["by_name"]}
    assert set(names) == {"POST /v1/search", "GET /v1/images/[id]/similar"}  # shed folds into its request
    assert names["POST /v1/search"]["shed"] == 30
    mix = {(m["outcome"], m["status"]): m["count"] for m in s["outcome_mix"]}
    assert mix == {("shed", 503): 30, ("fail", 500): 6}


def test_levels_and_knee(tmp_path):
    write_run(tmp_path)
    s = analyse(tmp_path, Slo(p99_ms=100))
    levels = {lv["users"]: lv for lv in s["levels"]}
    assert sorted(levels) == [2, 4, 6]
    for users, (rps, ms) in LEVELS.items():
        assert levels[users]["window_s"] == pytest.approx(STEP_S, abs=0.2)
        assert levels[users]["ok_rps"] == pytest.approx(rps, rel=0.03)
        assert ms <= levels[users]["p50_ms"] <= levels[users]["p99_ms"] <= ms * 1.2
        assert ms <= levels[users]["search"]["p50_ms"] <= levels[users]["search"]["p99_ms"] <= ms * 1.2
        assert levels[users]["search_ok_rps"] == pytest.approx(rps * 2 / 3, rel=0.05)  # 2 in 3 are searches
    # 6 users serves a little more but its p99 (~480 ms) breaks 100 ms: the knee is 4 users
    assert s["knee"]["users"] == 4 and s["knee"]["ok_rps"] == pytest.approx(40, rel=0.03)
    assert s["knee"]["avg_batch"] == pytest.approx(3.0)
    # with a looser p99 the top step is the knee, unless its failures break the failure limit
    assert analyse(tmp_path, Slo(p99_ms=1000))["knee"]["users"] == 6
    assert analyse(tmp_path, Slo(p99_ms=1000, max_failure_ratio=0.001))["knee"]["users"] == 4
    assert analyse(tmp_path, Slo(p99_ms=1))["knee"] is None


def test_find_knee_ignores_short_ramp_levels():
    levels = [{"users": 3, "window_s": 0.4, "slowest": {"p99_ms": 5.0}, "failure_ratio": 0.0, "ok_rps": 999.0},
              {"users": 4, "window_s": 10.0, "slowest": {"p99_ms": 50.0}, "failure_ratio": 0.0, "ok_rps": 40.0}]
    assert find_knee(levels, 100, None)["users"] == 4


def test_triton_and_gateway_from_scrapes(tmp_path):
    write_run(tmp_path)
    s = analyse(tmp_path)
    tr = s["triton"]
    assert tr["model"] == "resnet152" and tr["scrapes_failed"] == 1
    assert tr["avg_batch"] == pytest.approx(3.0) and tr["queue_ms"] == pytest.approx(2.0)
    assert tr["compute_ms"] == pytest.approx(20.0) and tr["requests"] == 30 * 3 * STEP_S
    assert all(r["avg_batch"] == pytest.approx(3.0) for r in tr["series"])
    gw = s["gateway"]
    assert gw["stage_ms"] == pytest.approx({"decode": 4.0, "infer": 50.0, "search": 2.0})
    assert gw["shed_by_reason"] == {"inflight": 3 * STEP_S} and gw["max_inflight"] == 5


def test_unknown_model_falls_back_to_the_busiest(tmp_path):
    write_run(tmp_path)
    assert analyse(tmp_path, model="nope")["triton"]["model"] == "resnet152"


def test_slo_violations_name_what_broke(tmp_path):
    write_run(tmp_path)
    s = analyse(tmp_path, Slo(p95_ms=1e6, p99_ms=50, max_failure_ratio=0.5, max_shed_ratio=0.001))
    assert [c["name"].split()[0] for c in s["checks"]] == ["p95", "p99", "failure", "shed"]
    assert [c["ok"] for c in s["checks"]] == [True, False, True, False]
    assert len(s["violations"]) == 2
    assert s["violations"][0].startswith("p99 of ") and s["violations"][0].endswith("> 50.0 ms")
    assert s["violations"][1].startswith("shed ratio ")
    assert analyse(tmp_path, Slo())["violations"] == []


def test_build_report_writes_plots_html_and_summary(tmp_path):
    write_run(tmp_path)
    s = build_report(tmp_path, Slo(p95_ms=500, p99_ms=100))
    for png in ("latency.png", "throughput.png", "outcomes.png", "triton.png", "stages.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (tmp_path / "report.html").read_text()
    assert "FAIL" in html and "test box" in html and "Knee:" in html
    assert json.loads((tmp_path / "summary.json").read_text())["knee"]["users"] == s["knee"]["users"] == 4


def test_report_without_metrics_still_renders(tmp_path):
    write_run(tmp_path, with_metrics=False)
    s = build_report(tmp_path)
    assert s["triton"]["model"] is None and s["gateway"]["scrapes_ok"] == 0
    assert "avg_batch" not in s["triton"]
    assert (tmp_path / "triton.png").read_bytes()[:4] == b"\x89PNG"
    html = (tmp_path / "report.html").read_text()
    assert "PASS" in html and "0 scrapes ok" in html


def test_missing_or_empty_request_log_is_a_report_error(tmp_path):
    with pytest.raises(ReportError, match="missing"):
        analyse(tmp_path)
    (tmp_path / "requests.csv").write_text("end,ms,users,method,name,outcome,status,error\n")
    with pytest.raises(ReportError, match="no request"):
        analyse(tmp_path)


def test_percentiles_of_nothing_are_none():
    assert percentiles(np.array([]))["p99_ms"] is None


def test_levels_of_a_constant_run_after_its_ramp():
    from imgsearch.loadtest.analysis import RequestLog

    end = np.array([0.1, 0.2, 0.3, 1.0, 2.0, 3.0, 4.0, 5.0])
    users = np.array([1, 2, 2, 4, 4, 4, 4, 4])
    obj = lambda v: np.array([v] * 8, dtype=object)  # noqa: E731
    log = RequestLog(end, np.full(8, 5.0), users, obj("GET /"), obj("ok"), np.full(8, 200), obj(""), obj("running"))
    levels = {lv["users"]: lv for lv in users_levels(log, t_end=6.0)}
    assert levels[1]["window_s"] == pytest.approx(0.1) and levels[2]["window_s"] == pytest.approx(0.8)
    assert levels[4]["window_s"] == pytest.approx(5.0) and levels[4]["requests"] == 5
    assert levels[2]["segments"] == [[0.2, 1.0]]


def test_requests_answered_while_stopping_belong_to_no_level():
    from imgsearch.loadtest.analysis import RequestLog

    # 4 users run until t=10; then Locust stops them: 3, 2, 1 users left, slow answers drain
    end = np.array([1.0, 4.0, 7.0, 9.0, 10.5, 11.0, 11.5])
    users = np.array([4, 4, 4, 4, 3, 2, 1])
    state = np.array(["running"] * 4 + ["stopping"] * 3, dtype=object)
    obj = lambda v: np.array([v] * 7, dtype=object)  # noqa: E731
    log = RequestLog(end, np.full(7, 5.0), users, obj("GET /"), obj("ok"), np.full(7, 200), obj(""), state)
    levels = users_levels(log, t_end=12.0)
    assert [lv["users"] for lv in levels] == [4]
    assert levels[0]["requests"] == 4 and levels[0]["window_s"] == pytest.approx(9.5)  # until the stop began


def test_a_cheap_endpoint_cannot_hide_a_slow_one(tmp_path):
    """150 fast /similar answers per search: all-requests p99 is fast, the search p99 is not."""
    rows = []
    for i in range(2000):
        end = T0 + i * 0.005
        if i % 150 == 0:
            rows.append([f"{end:.4f}", "1500.00", 2, "POST", "/v1/search", "ok", 200, ""])
        else:
            rows.append([f"{end:.4f}", "3.00", 2, "GET", "/v1/images/[id]/similar", "ok", 200, ""])
    with (tmp_path / "requests.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["end", "ms", "users", "method", "name", "outcome", "status", "error"])
        w.writerows(rows)
    s = analyse(tmp_path, Slo(p99_ms=500))
    assert s["totals"]["p99_ms"] == 3.0  # under 1 % of requests are searches
    assert s["totals"]["slowest"] == {"p95_ms": 1500.0, "p95_name": "POST /v1/search",
                                      "p99_ms": 1500.0, "p99_name": "POST /v1/search"}
    assert s["violations"] == ["p99 of POST /v1/search 1500.0 ms > 500.0 ms"]
    assert s["knee"] is None  # and the only level breaks the limit through its searches
