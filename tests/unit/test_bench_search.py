"""The batching benchmark's verdicts: a target counts only when both compared runs answered every request."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from bench.search import verdicts

RESULTS = Path(__file__).resolve().parents[2] / "bench/results/search-batching.json"


def test_the_committed_results_give_the_committed_verdicts():
    res = json.loads(RESULTS.read_text())
    assert verdicts(res, res["config"]["window_ms"]) == res["verdicts"]


def test_errors_on_either_side_make_a_verdict_false():
    res = json.loads(RESULTS.read_text())
    window = res["config"]["window_ms"]
    assert all(verdicts(res, window).values())
    at_load = {"similar_rps_ratio_ge_3", "similar_p99_lower_on"}
    for where, side, falsified in [("at_clients", "on", at_load), ("at_clients", "off", at_load),
                                   ("at_1_client", "on", {"similar_1_client_p50_rise_le_window"})]:
        bad = copy.deepcopy(res)
        bad["similar"][where][side]["errors"] = 3
        got = verdicts(bad, window)
        assert {k for k, ok in got.items() if not ok} == falsified, (where, side)
    bad = copy.deepcopy(res)
    bad["search"]["steps"][-1]["off"]["errors"] = 1  # a timed-out unbatched run decides no knee
    assert verdicts(bad, window)["search_knee_on_ge_off"] is False


def test_the_baseline_is_compared_and_its_errors_count_too():
    res = json.loads(RESULTS.read_text())
    window = res["config"]["window_ms"]
    today = {"search_knee_on_ge_today", "search_1_client_p50_rise_vs_today_le_window"}
    assert today <= set(verdicts(res, window)), "the committed run has no baseline gateway"
    bad = copy.deepcopy(res)
    bad["search"]["steps"][0]["today"]["errors"] = 2  # the 1-client step
    got = verdicts(bad, window)
    assert {k for k, ok in got.items() if not ok} == today  # on against off compares two clean runs still
    slower = copy.deepcopy(res)
    for step in slower["search"]["steps"]:
        step["today"]["throughput_rps"] = step["on"]["throughput_rps"] * 1.01
    slower["search"]["knee"]["today"]["throughput_rps"] = max(s["today"]["throughput_rps"]
                                                              for s in slower["search"]["steps"])
    assert verdicts(slower, window)["search_knee_on_ge_today"] is False
