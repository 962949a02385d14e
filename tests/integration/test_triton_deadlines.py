"""Every call the Triton client makes has a deadline: against a hung Triton (a real socket that
accepts connections and never answers, as a paused process or a cut network looks), each one
gives up within its deadline instead of waiting for ever.
"""

from __future__ import annotations

import asyncio
import socket
import time

import numpy as np
import pytest

from imgsearch.errors import TritonError, TritonUnavailable
from imgsearch.triton_client import TritonEncoder

pytestmark = [pytest.mark.integration, pytest.mark.alone]  # bounds in wall-clock time
DEADLINE_S = 1.0
HANG_LIMIT_S = 15.0  # a call still waiting this long has no deadline at all


@pytest.fixture
def hung_url():
    """A listening socket whose connections are accepted by the kernel and never read or answered."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    yield f"127.0.0.1:{s.getsockname()[1]}"
    s.close()


async def _timed(coro):
    t0 = time.monotonic()
    try:
        result = await asyncio.wait_for(coro, HANG_LIMIT_S)
    except asyncio.TimeoutError:
        pytest.fail(f"the call was still waiting after {HANG_LIMIT_S}s: no deadline")
    except TritonError as e:
        return e, time.monotonic() - t0
    return result, time.monotonic() - t0


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_every_call_gives_up_on_a_hung_triton(hung_url, protocol):
    async def run():
        enc = TritonEncoder(hung_url, "resnet152", protocol, timeout_s=DEADLINE_S)
        try:
            pixels = np.zeros((1, 8, 8, 3), np.uint8)
            # the first call also sets the client up; the rest go at once, each timed on its own, so
            # the test waits for the longest deadline rather than their sum
            out = {"is_ready": await _timed(enc.is_ready())}
            calls = {
                "has_ensemble": enc.has_ensemble(),
                "has_probs": enc.has_probs(),
                "model_config": enc.model_config("resnet152"),
                "encode": enc.encode(pixels),
                "encode_bytes": enc.encode_bytes([b"\xff\xd8"]),
            }
            out.update(zip(calls, await asyncio.gather(*(_timed(c) for c in calls.values()))))
        finally:
            await enc.close()
        return out

    out = asyncio.run(run())
    assert out["is_ready"][0] is False and out["has_ensemble"][0] is False
    for name in ("has_probs", "encode", "encode_bytes"):
        assert isinstance(out[name][0], TritonUnavailable), (name, out[name])
        assert out[name][1] <= DEADLINE_S + 2.0, (name, out[name][1])
    assert isinstance(out["model_config"][0], TritonError), out["model_config"]
    for name, (_, took) in out.items():
        assert took <= 5.0 + 2.0, (name, took)  # the health and config calls have their own fixed deadlines
