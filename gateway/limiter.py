"""In-flight limit: past ``IMGSEARCH_MAX_INFLIGHT`` concurrent expensive requests, shed at once.

No queue: a request over the limit gets 503 + ``Retry-After`` before its body is read,
so an overload costs the gateway almost nothing and the client learns it immediately.
Queueing would only move the wait (and the memory) into the gateway while latency grows
without bound. The counter is a plain int: the event loop is single-threaded.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Receive, Scope, Send

from .metrics import Metrics

# (method, path predicate): the routes that decode, run the model or write
LIMITED = (
    ("POST", lambda p: p == "/v1/search"),
    ("POST", lambda p: p == "/v1/images"),
    ("GET", lambda p: p.startswith("/v1/images/") and p.endswith("/similar")),
)


def is_limited(method: str, path: str) -> bool:
    return any(method == m and pred(path) for m, pred in LIMITED)


class InflightLimiter:
    def __init__(self, app: ASGIApp, limit: int, metrics: Metrics, retry_after_s: int = 1) -> None:
        self.app = app
        self.limit = max(1, int(limit))
        self.metrics = metrics
        self.retry_after_s = max(1, int(retry_after_s))
        self.inflight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_limited(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        if self.inflight >= self.limit:
            self.metrics.shed.labels(reason="inflight").inc()
            self.metrics.errors.labels(code="overloaded").inc()
            await self._shed(send)
            return
        self.inflight += 1
        self.metrics.inflight.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight -= 1
            self.metrics.inflight.dec()

    async def _shed(self, send: Send) -> None:
        body = json.dumps({"error": {
            "code": "overloaded",
            "message": f"the gateway is at its limit of {self.limit} requests in flight; retry shortly",
        }}).encode()
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(self.retry_after_s).encode()),
        ]})
        await send({"type": "http.response.body", "body": body})
