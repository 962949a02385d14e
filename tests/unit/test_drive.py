"""The benchmarks' closed-loop driver: what it sends, how it stops, how it counts (never timing)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from harness.drive import drive, drive_threads


class Busy(Exception):
    pass


def test_request_count_sequence_numbers_and_concurrency():
    seen: list[int] = []
    inflight = peak = 0

    async def call(i: int) -> int:
        nonlocal inflight, peak
        seen.append(i)
        inflight += 1
        peak = max(peak, inflight)
        await asyncio.sleep(0.005)
        inflight -= 1
        return i * 10

    load = asyncio.run(drive(call, concurrency=3, requests=10))
    assert sorted(seen) == list(range(10))
    assert load.requests == 10 and load.ok_count == 10 and load.error_count == 0 and load.errors == {}
    assert peak == 3
    assert load.results() == [i * 10 for i in range(10)]
    assert len(load.latencies_s) == 10 and all(x > 0 for x in load.latencies_s)
    assert load.wall_s > 0 and load.ended_at >= load.started_at


def test_errors_by_label_and_by_exception():
    async def call(i: int) -> str:
        await asyncio.sleep(0)
        if i % 4 == 0:
            raise Busy(f"request {i}")
        return "503" if i % 4 == 1 else "200"

    load = asyncio.run(drive(call, concurrency=2, requests=12, outcome=str, ok="200"))
    assert load.requests == 12
    assert load.ok_count == 6 and load.error_count == 6
    assert load.errors == {"Busy": 3, "503": 3}
    assert load.counts == {"Busy": 3, "503": 3, "200": 6}
    assert len(load.ok_latencies_s) == 6 and len(load.latencies_s) == 12
    failed = {c.index for c in load.calls if not c.ok}
    assert failed == {i for i in range(12) if i % 4 in (0, 1)}
    assert all(c.result is None for c in load.calls if c.label == "Busy")


def test_without_outcome_every_return_succeeds_and_results_can_be_dropped():
    async def call(i: int) -> None:
        return None

    load = asyncio.run(drive(call, concurrency=4, requests=9, keep_results=False))
    assert load.ok_count == 9 and load.counts == {"ok": 9}


def test_raise_errors_ends_the_run_at_the_first_exception():
    seen: list[int] = []

    async def call(i: int) -> None:
        seen.append(i)
        if i == 3:
            raise Busy("stop")

    with pytest.raises(Busy):
        asyncio.run(drive(call, concurrency=1, requests=10, raise_errors=True))
    assert seen == [0, 1, 2, 3]


def test_stop_rules():
    async def call(i: int) -> None:
        await asyncio.sleep(0)

    # a duration already over sends nothing; a count stops the run long before a long duration
    assert asyncio.run(drive(call, concurrency=2, seconds=0)).requests == 0
    assert asyncio.run(drive(call, concurrency=2, seconds=600, requests=5)).requests == 5
    with pytest.raises(ValueError):
        asyncio.run(drive(call, concurrency=2))
    with pytest.raises(ValueError):
        asyncio.run(drive(call, concurrency=0, requests=1))


def test_threads_send_each_sequence_number_once_and_count_errors():
    seen: list[int] = []
    lock = threading.Lock()

    def call(i: int) -> str:
        with lock:
            seen.append(i)
        if i % 5 == 0:
            raise Busy("no")
        return "fine"

    load = drive_threads(call, concurrency=4, requests=40, outcome=lambda r: r, ok="fine")
    assert sorted(seen) == list(range(40))
    assert load.requests == 40 and load.errors == {"Busy": 8} and load.ok_count == 32
    assert load.results() == [None if i % 5 == 0 else "fine" for i in range(40)]


def test_one_thread_runs_in_the_callers_thread():
    threads: set[str] = set()

    def call(i: int) -> None:
        threads.add(threading.current_thread().name)

    load = drive_threads(call, concurrency=1, requests=3)
    assert load.requests == 3 and threads == {threading.current_thread().name}
