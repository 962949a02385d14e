"""In-flight limit: past ``IMGSEARCH_MAX_INFLIGHT`` concurrent expensive requests, shed at once.

No queue: a request over the limit gets 503 + ``Retry-After``, so an overload costs the
gateway little and the client learns it immediately. Queueing would only move the wait (and
the memory) into the gateway while latency grows without bound. The counters are plain
ints: the event loop is single-threaded.

A slot is real work (decode, model, Milvus), so a request with a body takes its slot only once
the body has arrived: clients sending slowly cannot hold the slots that searches need. Bodies
being read have their own bound, ``IMGSEARCH_MAX_READING`` (over it: 503 before reading), and
a deadline (``IMGSEARCH_BODY_TIMEOUT_S``, in :mod:`imgsearch.gateway.uploads`).
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .lingering import has_body
from .metrics import Metrics

# (method, path predicate): the routes that decode, run the model or write
LIMITED = (
    ("POST", lambda p: p == "/v1/search"),
    ("POST", lambda p: p == "/v1/images"),
    ("GET", lambda p: p.startswith("/v1/images/") and p.endswith("/similar")),
)


# cheap routes that still use the file, decode and Milvus pools: bounded on their own, so a
# flood of them sheds instead of queueing searches behind it
LIGHT = (
    ("GET", lambda p: p.startswith("/v1/images/") and not p.endswith("/similar")),
    ("GET", lambda p: p == "/readyz"),
)


def is_limited(method: str, path: str) -> bool:
    return any(method == m and pred(path) for m, pred in LIMITED)


def is_light(method: str, path: str) -> bool:
    return any(method == m and pred(path) for m, pred in LIGHT)


class _SlotsTaken(Exception):
    """Raised out of ``receive`` when a body has arrived and no slot is free."""


class InflightLimiter:
    def __init__(self, app: ASGIApp, limit: int, metrics: Metrics, retry_after_s: int = 1,
                 max_reading: int = 64, max_light: int = 64) -> None:
        self.app = app
        self.max_light = max(1, int(max_light))
        self.light = 0
        self.limit = max(1, int(limit))
        self.max_reading = max(1, int(max_reading))
        self.metrics = metrics
        self.retry_after_s = max(1, int(retry_after_s))
        self.inflight = 0
        self.reading = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_light(scope["method"], scope["path"]):
            await self._light(scope, receive, send)
            return
        if scope["type"] != "http" or not is_limited(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        if not has_body(scope):
            if not self._take():
                await self._shed(send, "inflight")
                return
            try:
                await self.app(scope, receive, send)
            finally:
                self._give()
            return
        if self.reading >= self.max_reading:
            await self._shed(send, "reading", f"{self.max_reading} uploads are being received")
            return
        self.reading += 1
        self.metrics.receiving.inc()
        state = {"reading": True, "slot": False}

        def done_reading() -> None:
            state["reading"] = False
            self.reading -= 1
            self.metrics.receiving.dec()

        async def receive_then_take_a_slot() -> Message:
            message = await receive()
            if state["reading"] and (message["type"] != "http.request" or not message.get("more_body", False)):
                done_reading()
                if message["type"] == "http.request":
                    if not self._take():
                        raise _SlotsTaken
                    state["slot"] = True
            return message

        shed = False
        try:
            await self.app(scope, receive_then_take_a_slot, send)
        except _SlotsTaken:
            shed = True  # answered below, once the exception (whose frames hold the body) is gone
        finally:
            if state["reading"]:
                done_reading()
            if state["slot"]:
                self._give()
        if shed:
            await self._shed(send, "inflight")

    async def _light(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.light >= self.max_light:
            await self._shed(send, "light", f"{self.max_light} image and readiness requests are being served")
            return
        self.light += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.light -= 1

    def _take(self) -> bool:
        if self.inflight >= self.limit:
            return False
        self.inflight += 1
        self.metrics.inflight.inc()
        return True

    def _give(self) -> None:
        self.inflight -= 1
        self.metrics.inflight.dec()

    async def _shed(self, send: Send, reason: str, what: str = "") -> None:
        self.metrics.shed.labels(reason=reason).inc()
        self.metrics.errors.labels(code="overloaded").inc()
        what = what or f"{self.limit} requests are in flight"
        body = json.dumps({"error": {
            "code": "overloaded",
            "message": f"the gateway is at its limit ({what}); retry shortly",
        }}).encode()
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(self.retry_after_s).encode()),
        ]})
        await send({"type": "http.response.body", "body": body})
