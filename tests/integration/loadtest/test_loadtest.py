"""``imgsearch loadtest`` against the real stack: tritonserver + Milvus Lite + uvicorn(gateway).

The gateway runs with a small in-flight limit, so these runs also see real sheds
(503 + Retry-After) and check they are counted apart from failures.
"""

from __future__ import annotations

import csv
import json

import pytest

from imgsearch.cli import main

pytestmark = pytest.mark.integration

PLOTS = ("latency.png", "throughput.png", "outcomes.png", "triton.png", "stages.png")


def loadtest(stack, out, *extra: str) -> int:
    return main(["loadtest", "--host", stack.url, "--images", str(stack.queries), "--out", str(out),
                 "--triton-metrics", stack.triton_metrics, *extra])


@pytest.fixture(scope="module")
def headless(stack, tmp_path_factory):
    out = tmp_path_factory.mktemp("headless")
    # Users join one every 2 s, in Locust's weighted order (search, similar, search, search, page,
    # similar, search). For the first 6 s at most 3 users send searches or similar requests, each
    # one at a time: within the in-flight limit of 3, so the similar scenario is served however
    # slow the searches are here. From then on closed-loop search users hold the slots and the
    # gateway sheds. All 7 at once let the searches hold every slot from the start, and a busy
    # run once served no similar request at all.
    rc = loadtest(stack, out, "--users", "7", "--spawn-rate", "0.5", "--run-time", "15s", "--think-ms", "40",
                  "--max-failure-ratio", "0.01")
    return rc, out


def test_headless_run_writes_csv_report_and_plots(headless, stack):
    rc, out = headless
    assert rc == 0, (out / "locust.log").read_text()[-3000:] + stack.log_path.read_text()[-3000:]
    for name in ("locust_stats.csv", "locust_stats_history.csv", "locust.html", "report.html", "summary.json",
                 *PLOTS):
        assert (out / name).stat().st_size > 0, name
    for png in PLOTS:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f'src="{png}"' in (out / "report.html").read_text()

    rows = {r["Name"]: r for r in csv.DictReader((out / "locust_stats.csv").open())}
    agg = rows["Aggregated"]
    assert int(agg["Request Count"]) > 0
    assert float(agg["50%"]) <= float(agg["95%"]) <= float(agg["99%"])
    # every scenario ran: search, more-like-this, the page and its thumbnails
    assert {"/v1/search", "/v1/images/[id]/similar", "/", "/v1/images/[id]/thumb"} <= set(rows)
    assert int(rows["/v1/search"]["Request Count"]) > 0

    s = json.loads((out / "summary.json").read_text())
    t = s["totals"]
    assert t["ok"] > 0 and t["failed"] == 0
    assert 0 < t["p50_ms"] <= t["p95_ms"] <= t["p99_ms"] <= t["max_ms"]
    assert s["locust"]["aggregated"]["requests"] == t["requests"]  # request log == Locust's count
    tr = s["triton"]
    assert tr["model"] == "resnet152" and tr["requests"] > 0 and tr["avg_batch"] >= 1.0
    assert tr["queue_ms"] >= 0 and tr["compute_ms"] > 0
    stages = s["gateway"]["stage_ms"]
    assert all(stages[k] > 0 for k in ("decode", "infer", "search")), stages


def test_sheds_are_counted_apart_from_failures(headless):
    _, out = headless
    s = json.loads((out / "summary.json").read_text())
    shed = s["totals"]["shed"]
    assert shed > 0, "7 users against an in-flight limit of 3 should be shed sometimes"
    # what Locust saw as shed is exactly what the gateway counted (scraped before and after the run)
    assert s["gateway"]["shed_by_reason"]["inflight"] == shed
    rows = {r["Name"]: r for r in csv.DictReader((out / "locust_stats.csv").open())}
    shed_rows = [r for name, r in rows.items() if name.startswith("shed:")]
    assert sum(int(r["Request Count"]) for r in shed_rows) == shed
    assert all(int(r["Failure Count"]) == 0 for r in shed_rows)
    assert all(m["outcome"] == "shed" and m["status"] == 503 for m in s["outcome_mix"])


def test_impossible_slo_exits_nonzero_with_one_line(stack, tmp_path, capsys):
    rc = loadtest(stack, tmp_path, "--users", "2", "--spawn-rate", "2", "--run-time", "5s",
                  "--slo-p99-ms", "0.001")
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 1
    broken = [line for line in err if line.startswith("SLO broken:")]
    assert len(broken) == 1 and err[-1] == broken[0]
    assert "p99" in broken[0] and "> 0.001 ms" in broken[0]
    assert (tmp_path / "report.html").exists()


def test_step_shape_steps_users_up(stack, tmp_path, capsys):
    rc = loadtest(stack, tmp_path, "--shape", "step", "--users", "6", "--step-users", "2", "--step-time", "6",
                  "--spawn-rate", "10")
    out = capsys.readouterr().out
    assert rc == 0, out
    users = [int(r["User Count"]) for r in csv.DictReader((tmp_path / "locust_stats_history.csv").open())
             if r["Name"] == "Aggregated"]
    running = users[:users.index(6) + 1] if 6 in users else users
    assert {2, 4, 6} <= set(users), users
    assert running == sorted(running), users  # never steps down while running
    s = json.loads((tmp_path / "summary.json").read_text())
    measured = [lv["users"] for lv in s["levels"] if lv["window_s"] >= 3]
    assert measured == [2, 4, 6], s["levels"]
    assert "knee:" in out
