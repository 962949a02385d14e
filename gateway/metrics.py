"""Prometheus metrics of the gateway. The names are fixed (dashboards and the load-test report read them).

Each app gets its own registry, so tests can build several apps in one process. With
``--workers N`` every worker has its own numbers (scrape each, or run one worker per
container as the compose file does).
"""

from __future__ import annotations

import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.process_collector import ProcessCollector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

disable_created_metrics()  # the *_created series double the output and nobody reads them

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# search on CPU lands in 20 ms - 2 s; on GPU 2 - 50 ms
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
WAIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)  # RSS, CPU, open fds: memory stays visible
        self.request_duration = Histogram(
            "imgsearch_request_duration_seconds", "whole request, by route template, method and status",
            ["route", "method", "status"], buckets=REQUEST_BUCKETS, registry=self.registry)
        self.stage_duration = Histogram(
            "imgsearch_stage_duration_seconds", "per stage of a search: decode | infer | search",
            ["stage"], buckets=STAGE_BUCKETS, registry=self.registry)
        self.inflight = Gauge(
            "imgsearch_inflight_requests", "requests inside the in-flight limit (search, similar, add)",
            registry=self.registry)
        self.receiving = Gauge(
            "imgsearch_receiving_requests", "uploads whose body is still arriving (they hold no in-flight slot)",
            registry=self.registry)
        self.requests = Counter(
            "imgsearch_requests_total", "requests by route template and status", ["route", "status"],
            registry=self.registry)
        self.errors = Counter("imgsearch_errors_total", "error responses by error code", ["code"],
                              registry=self.registry)
        self.shed = Counter(
            "imgsearch_shed_total", "requests refused with 503 because of load or a dead backend",
            ["reason"], registry=self.registry)
        self.readiness_checks = Counter(
            "imgsearch_readiness_checks_total", "backend checks made for /readyz (the probes of one second share one)",
            registry=self.registry)

        self.memory_budget = Gauge(
            "imgsearch_memory_budget_bytes", "what this gateway's settings let it hold at once (uploads, connections, "
            "decodes, thumbnails, the process): its container's memory limit should be at least this",
            registry=self.registry)
        self.milvus_batch = Histogram(
            "imgsearch_milvus_batch_size", "requests per Milvus call: vectors per search, ids per lookup",
            ["op"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.milvus_batch_wait = Histogram(
            "imgsearch_milvus_batch_wait_seconds", "time a request waited in the batcher before its Milvus call",
            ["op"], buckets=WAIT_BUCKETS, registry=self.registry)
        # label children by value: .labels() builds and locks a lookup on every call, per request
        self._children: dict[tuple, object] = {}

    def batch_observer(self, op: str):
        """``observe(n, waits)`` for a :class:`imgsearch.gateway.batching.MicroBatcher` of this op."""
        size, wait = self.milvus_batch.labels(op=op), self.milvus_batch_wait.labels(op=op)

        def observe(n: int, waits) -> None:
            size.observe(n)
            for w in waits:
                wait.observe(w)

        return observe

    def child(self, metric, *values: str):
        key = (id(metric), *values)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*values)
        return c

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.child(self.stage_duration, stage).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def route_template(scope: Scope) -> str:
    """The route's path template (``/v1/images/{id}``): bounded label cardinality."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if path:
        return path
    p = scope.get("path", "")
    if p.startswith("/static/"):
        return "/static"
    # shed by the in-flight limiter before routing: name the limited routes anyway
    if p == "/v1/search" or p == "/v1/images":
        return p
    if p.startswith("/v1/images/") and p.endswith("/similar"):
        return "/v1/images/{id}/similar"
    return "unmatched"


class MetricsMiddleware:
    """Times every HTTP request and counts it by route template and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = route_template(scope)
            code = str(status["code"])
            m = self.metrics
            m.child(m.request_duration, route, scope["method"], code).observe(time.perf_counter() - start)
            m.child(m.requests, route, code).inc()
