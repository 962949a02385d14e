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

import pytest

from harness.gateway import MAX_UPLOAD
from imgsearch.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.alone]  # bounds in wall-clock time
BOUNDARY = "b0undary"
LINGER_BYTES = Settings.model_fields["lingering_close_bytes"].default  # the gw stack runs the defaults
LINGER_S = Settings.model_fields["lingering_close_s"].default


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
    read them for ever."""
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
                        time.sleep(0.5)
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
            if stall:
                assert took >= LINGER_S  # it waited the configured time for the rest ...
            else:
                assert sent >= LINGER_BYTES  # ... and read the configured amount before closing
