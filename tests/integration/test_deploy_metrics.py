"""The Grafana dashboard's Triton queries (and the HPA's adapter rule, the Prometheus rules)
read metrics a real tritonserver exports.

The local server (the nvidia-pytriton wheel's Triton 2.51, the release the compose file's
24.10 container ships) serves the test model; its /metrics lists the nv_inference_*
families with their labels. GPU metrics are checked in tests/unit/test_deploy.py against
Triton's documented list (a CPU server does not export them).
"""

from __future__ import annotations

import asyncio
import re
import urllib.request
from pathlib import Path

import numpy as np

from harness.data import load_module
from imgsearch.triton_client import TritonEncoder
from imgsearch.triton_metrics import fetch_model_stats, stats_since

MODEL = "resnet152"
_UNIT = Path(__file__).resolve().parents[1] / "unit" / "test_deploy.py"


def _deploy_checks():
    """The dashboard parsing helpers of the unit test module (one parser, not two)."""
    return load_module(_UNIT, "deploy_checks")


def exported(metrics_url: str) -> dict[str, set[str]]:
    """metric sample name -> label names, from a live /metrics page."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    out: dict[str, set[str]] = {}
    for name, labels in re.findall(r"^(\w+)(?:\{([^}]*)\})?\s", text, re.M):
        out.setdefault(name, set()).update(re.findall(r'(\w+)="', labels or ""))
    return out


def test_dashboard_triton_inference_metrics_exist_in_a_running_triton(triton):
    async def one_request():
        enc = TritonEncoder(triton.grpc_url, MODEL)
        try:
            await enc.encode(np.zeros((2, 224, 224, 3), np.uint8))
        finally:
            await enc.close()

    before = fetch_model_stats(triton.metrics_url, MODEL)
    asyncio.run(one_request())  # the counters move, so the page shows the model's families with values
    assert stats_since(triton.metrics_url, MODEL, before, 1).inferences == 2

    live = exported(triton.metrics_url)
    d = _deploy_checks()
    used = {m for m in d.dashboard_metric_names() if m.startswith("nv_inference_")}
    assert {"nv_inference_queue_duration_us", "nv_inference_request_success", "nv_inference_count",
            "nv_inference_exec_count"} <= used
    missing = used - set(live)
    assert not missing, f"the dashboard reads Triton metrics this Triton does not export: {sorted(missing)}"
    # the Triton autoscaler's custom metric (deploy/helm/prometheus-adapter-values.yaml) and the
    # Prometheus rules too (the gateway's names are checked in tests/unit/test_deploy.py)
    rules = d.yaml.safe_load(d.ADAPTER_VALUES.read_text())["rules"]["custom"]
    queries = [r["seriesQuery"] + r["metricsQuery"] for r in rules] + [r["expr"] for r in d.rule_list()]
    triton_reads = [{n for n in d._METRIC.findall(q) if n.startswith("nv_inference_")} for q in queries]
    assert any(triton_reads), "no adapter rule or alert reads a Triton inference metric"
    for names in triton_reads:
        assert names <= set(live), f"a rule reads {sorted(names - set(live))}"
    for expr, legend in d.dashboard_exprs():
        names = [m for m in d._METRIC.findall(expr) if m.startswith("nv_inference_")]
        if names:
            have = set().union(*(live[n] for n in names))
            assert d.expr_labels(expr, legend) <= have, f"labels {d.expr_labels(expr, legend) - have} in {expr}"
    # the dashboard's model variable picks label values of a metric that carries `model`
    assert "model" in live["nv_inference_count"]
    # the project's contract names (docs/design.md) are all on the page too
    contract = {m for m in d.TRITON_CONTRACT if m.startswith("nv_inference_")}
    assert contract <= set(live)
