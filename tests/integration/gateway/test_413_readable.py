"""A 413 that ordinary clients can read, against the real gateway (uvicorn) of the ``gw`` stack.

Python's urllib (like requests, httpx and browsers) sends the whole body before it reads the
answer, without ``Expect: 100-continue``. A server that answers early and closes makes the
client's kernel see unread data refused: "connection reset", never the JSON error.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from harness.gateway import MAX_UPLOAD
from imgsearch.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.alone]  # bounds in wall-clock time
BOUNDARY = "b0undary"
LINGER_BYTES = Settings.model_fields["lingering_close_bytes"].default  # the gw stack runs the defaults
LINGER_S = Settings.model_fields["lingering_close_s"].default
STALL_S = 0.5  # the trickling client's pause between bytes
# what the server may have taken in beyond the bytes it drained: uvicorn pauses reading past 64 KiB
# of unread body, its transport reads at most 256 KiB at a time, the drain stops one message past
# the bound
SERVER_READ_AHEAD = 2**20


def tcp_buffer_max(which: str) -> int:
    """The most Linux lets one TCP socket's ``which`` ("rmem", "wmem") buffer grow to (autotuning)."""
    return int(Path(f"/proc/sys/net/ipv4/tcp_{which}").read_text().split()[2])


def body_of(size: int) -> bytes:
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + b"\xff\xd8\xff\xe0"
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    return head + b"\0" * (size - len(head) - len(tail)) + tail


@pytest.mark.parametrize("size", [4 * MAX_UPLOAD, 32 * MAX_UPLOAD])
def test_a_client_that_sends_everything_first_reads_the_413(gw, size):
    req = urllib.request.Request(gw.url + "/v1/search", data=body_of(size), method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=60)
    assert err.value.code == 413
    assert json.loads(err.value.read())["error"]["code"] == "payload_too_large"


def test_draining_is_bounded_in_bytes_and_time(gw):
    """A body far over the drain bound, and one that stalls, are cut off: the server does not
    read them for ever. What the client got to send past the byte bound is at most what the
    sockets between them hold (the server's receive buffer, the client's send buffer, the
    server's read-ahead); the trickle is cut off at the time bound, seen by the client at its
    second byte after the close at the latest (the first is answered by a reset)."""
    host, port = gw.url.removeprefix("http://").split(":")
    endless = 10**12
    for stall in (False, True):
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall((f"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Length: {endless}\r\n"
                       f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n").encode())
            t0, sent, closed = time.monotonic(), 0, False
            block = b"\0" * 65536
            while time.monotonic() - t0 < 60:
                try:
                    if stall:
                        time.sleep(STALL_S)
                        s.sendall(b"\0")
                    else:
                        s.sendall(block)
                        sent += len(block)
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
            took = time.monotonic() - t0
            print(f"stall={stall}: cut off after {took:.1f}s, {sent / 2**20:.1f} MiB sent")
            assert closed, (stall, sent)
            if stall:  # it waited the configured time for the rest, and no longer (2 s: scheduling)
                assert LINGER_S <= took <= LINGER_S + 2 * STALL_S + 2.0, took
            else:  # ... and read the configured amount before closing, and no more
                in_buffers = tcp_buffer_max("rmem") + tcp_buffer_max("wmem") + SERVER_READ_AHEAD
                assert LINGER_BYTES <= sent <= LINGER_BYTES + in_buffers, (sent, in_buffers)
