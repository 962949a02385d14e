"""Read Triton's Prometheus metrics: executions vs requests, queue and compute time."""

from __future__ import annotations

import re
import time
import urllib.request
from dataclasses import dataclass

# labels are optional (a gauge like ``imgsearch_inflight_requests 3.0`` has none); a label
# value may hold "}" (the gateway's route="/v1/images/{id}") or escaped quotes; a trailing
# timestamp is allowed; the value may be NaN or +Inf
_VALUE = r'"(?:[^"\\]|\\.)*"'
_LINE = re.compile(r'^([a-zA-Z_:][\w:]*)(?:\{((?:[^"}]|' + _VALUE + r')*)\})?\s+(\S+)(?:\s+-?\d+)?$')
_LABEL = re.compile(r'(\w+)=(' + _VALUE + ')')


def parse_prometheus(text: str) -> dict[tuple[str, frozenset], float]:
    out: dict[tuple[str, frozenset], float] = {}
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if m:
            try:
                value = float(m.group(3))
            except ValueError:
                continue
            labels = frozenset((k, v[1:-1]) for k, v in _LABEL.findall(m.group(2) or ""))
            out[(m.group(1), labels)] = value
    return out


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when absent)."""
    return sum(v for (n, have), v in parse_prometheus(text).items()
               if n == name and all(dict(have).get(k) == want for k, want in labels.items()))


@dataclass
class ModelStats:
    requests: float = 0.0  # successful inference requests
    failures: float = 0.0
    executions: float = 0.0  # model executions (batches)
    inferences: float = 0.0  # images (batch elements)
    queue_us: float = 0.0
    compute_us: float = 0.0

    @property
    def avg_batch(self) -> float:
        return self.inferences / self.executions if self.executions else 0.0

    def __sub__(self, other: "ModelStats") -> "ModelStats":
        return ModelStats(*(getattr(self, f) - getattr(other, f) for f in self.__dataclass_fields__))


def model_stats(text: str, model: str) -> ModelStats:
    names = {
        "nv_inference_request_success": "requests",
        "nv_inference_request_failure": "failures",
        "nv_inference_exec_count": "executions",
        "nv_inference_count": "inferences",
        "nv_inference_queue_duration_us": "queue_us",
        "nv_inference_compute_infer_duration_us": "compute_us",
    }
    stats = ModelStats()
    for (name, labels), value in parse_prometheus(text).items():
        if name in names and dict(labels).get("model") == model:
            setattr(stats, names[name], getattr(stats, names[name]) + value)
    return stats


def fetch_model_stats(metrics_url: str, model: str, timeout: float = 5.0) -> ModelStats:
    with urllib.request.urlopen(metrics_url, timeout=timeout) as r:
        return model_stats(r.read().decode(), model)


def stats_since(metrics_url: str, model: str, before: ModelStats, requests: int,
                timeout: float = 10.0) -> ModelStats:
    """The change in ``model``'s counters since ``before``, read once ``requests`` more successful
    requests are counted, or at ``timeout``.

    Triton counts a request when the backend releases it, after the response has gone out, so
    a client that reads the metrics as soon as it has its answer can still see the old count.
    """
    deadline = time.monotonic() + timeout
    while True:
        delta = fetch_model_stats(metrics_url, model) - before
        if delta.requests >= requests or time.monotonic() >= deadline:
            return delta
        time.sleep(0.02)
