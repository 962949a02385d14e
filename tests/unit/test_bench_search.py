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
