"""uvicorn's HTTP protocol with a deadline on each request's head (request line and headers).

uvicorn bounds an idle keep-alive connection, and the gateway bounds a body
(``IMGSEARCH_BODY_TIMEOUT_S``), but nothing bounds the time between a connection opening, or
a request's first byte, and the end of its headers: a client sending one header byte every
few seconds holds a connection, and a place under ``IMGSEARCH_MAX_CONNECTIONS``, for as long
as it likes. Here each connection must deliver a complete request head within
``IMGSEARCH_HEADER_TIMEOUT_S`` of opening, and each later request within that time of its first
byte (what nginx's ``client_header_timeout`` does). A client that has started a request gets a
408 with the project's error body before the connection closes; one that sent nothing is
closed.

uvicorn takes it as ``http="imgsearch.gateway.protocol:HeadDeadlineProtocol"``: an import
string, so every worker process loads it. The deadline comes from the environment's settings,
as the app factory's do.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from imgsearch.settings import get_settings

log = logging.getLogger(__name__)

HEAD_DEADLINE_PROTOCOL = "imgsearch.gateway.protocol:HeadDeadlineProtocol"


def _timeout_response() -> bytes:
    body = json.dumps({"error": {"code": "header_timeout",
                                 "message": "the request's headers did not arrive in time"}}).encode()
    head = ("HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode()
    return head + body


TIMEOUT_RESPONSE = _timeout_response()


class HeadDeadlineProtocol(HttpToolsProtocol):
    """httptools' protocol, plus a timer from a connection's (or request's) start to its headers' end."""

    def __init__(self, *args: Any, head_timeout_s: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_timeout_s = head_timeout_s if head_timeout_s is not None else get_settings().header_timeout_s
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_begun = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_begun = True
        if self._head_timer is None:  # a later request on a kept-alive (or pipelining) connection
            self._arm()

    def on_headers_complete(self) -> None:
        self._head_begun = False
        self._disarm()
        super().on_headers_complete()

    def _arm(self) -> None:
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete and not self._head_begun:
            return  # a response is being produced and no further request has started
        log.info("%s: no complete request head within %.1fs: closing", _peer(self.client), self.head_timeout_s)
        if self._head_begun:
            self.transport.write(TIMEOUT_RESPONSE)
        self.transport.close()


def _peer(client: tuple[str, int] | None) -> str:
    return "%s:%d" % client if client else "a client"
