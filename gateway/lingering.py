"""Lingering close: an answer given before the request body was read stays readable.

Most clients (urllib, requests, httpx, browsers) send the whole body before they read
anything, and do not ask ``Expect: 100-continue``. When the server answers early (413, 401,
415, shed 503) and closes with body bytes still unread, the client's kernel gets a reset
and the client reports "connection reset", never the JSON error. So the answer goes out at
once (a client that watches the socket stops sending), then the rest of the body is read
and dropped, up to ``max_bytes`` and ``max_s``, and only then is the connection closed
(``Connection: close``: the same connection never serves another request after an
unread body).
"""

from __future__ import annotations

import asyncio
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class LingeringClose:
    def __init__(self, app: ASGIApp, max_bytes: int, max_s: float) -> None:
        self.app = app
        self.max_bytes = max(0, int(max_bytes))
        self.max_s = max(0.0, float(max_s))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_done = False
        early = False  # answering with the request body not (all) read

        async def receive_wrapper() -> Message:
            nonlocal body_done
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                body_done = True
            return message

        async def send_wrapper(message: Message) -> None:
            nonlocal early
            if message["type"] == "http.response.start" and not body_done and has_body(scope):
                early = True
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            elif early and message["type"] == "http.response.body" and not message.get("more_body", False):
                await send({**message, "more_body": True})  # the whole answer is out: Content-Length
                await self._drain(receive)
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app(scope, receive_wrapper, send_wrapper)

    async def _drain(self, receive: Receive) -> None:
        """Read and drop the rest of the body, within the bounds; then the connection closes."""
        deadline = time.monotonic() + self.max_s
        read = 0
        while read <= self.max_bytes:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                message = await asyncio.wait_for(receive(), left)
            except asyncio.TimeoutError:
                return
            if message["type"] != "http.request":
                return
            read += len(message.get("body", b""))
            if not message.get("more_body", False):
                return


def has_body(scope: Scope) -> bool:
    headers = dict(scope.get("headers") or [])
    length = headers.get(b"content-length")
    if length is not None:
        return length.strip() not in (b"", b"0")
    return b"chunked" in headers.get(b"transfer-encoding", b"").lower()
