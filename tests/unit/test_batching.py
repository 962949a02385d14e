"""The micro-batcher's logic, with a recording stand-in for the Milvus call."""

from __future__ import annotations

import asyncio

import pytest

from imgsearch.gateway.batching import MicroBatcher


class Recorder:
    """Answers item * 10 per item, records each call's key and items; can be held open or fail."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list[tuple[object, list[int]]] = []
        self.sizes: list[int] = []
        self.waits: list[float] = []
        self.fail = fail
        self.gate: asyncio.Event | None = None

    async def run(self, key, items):
        self.calls.append((key, list(items)))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return [i * 10 for i in items]

    def observe(self, n, waits):
        self.sizes.append(n)
        self.waits.extend(waits)


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_with_one_key_share_one_call_and_get_their_own_answers():
    rec = Recorder()

    async def main():
        b = MicroBatcher(rec.run, window_s=0.05, max_batch=64, observe=rec.observe, send_when_idle=False)
        return await asyncio.gather(*[b.submit("k", i) for i in range(10)])

    assert run(main()) == [i * 10 for i in range(10)]
    assert rec.calls == [("k", list(range(10)))]
    assert rec.sizes == [10]
    assert len(rec.waits) == 10 and all(0 <= w < 5 for w in rec.waits)


def test_different_keys_never_share_a_call():
    rec = Recorder()

    async def main():
        b = MicroBatcher(rec.run, window_s=0.05, max_batch=64, observe=rec.observe, send_when_idle=False)
        return await asyncio.gather(*[b.submit(i % 3, i) for i in range(9)])

    assert run(main()) == [i * 10 for i in range(9)]
    assert sorted((k, items) for k, items in rec.calls) == [(0, [0, 3, 6]), (1, [1, 4, 7]), (2, [2, 5, 8])]


def test_a_full_batch_goes_at_once_without_waiting_for_the_window():
    rec = Recorder()

    async def main():
        b = MicroBatcher(rec.run, window_s=30.0, max_batch=4, observe=rec.observe, send_when_idle=False)
        # a 30 s window: only the size limit can send these in time
        return await asyncio.wait_for(asyncio.gather(*[b.submit("k", i) for i in range(8)]), 5.0)

    assert run(main()) == [i * 10 for i in range(8)]
    assert [items for _, items in rec.calls] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_window_zero_makes_one_call_per_request():
    rec = Recorder()

    async def main():
        b = MicroBatcher(rec.run, window_s=0.0, max_batch=64, observe=rec.observe, send_when_idle=False)
        assert not b.enabled
        return await asyncio.gather(*[b.submit("k", i) for i in range(5)])

    assert run(main()) == [i * 10 for i in range(5)]
    assert len(rec.calls) == 5 and rec.sizes == [1] * 5


def test_a_request_arriving_after_its_batch_left_starts_the_next_one():
    rec = Recorder()

    async def main():
        b = MicroBatcher(rec.run, window_s=0.01, max_batch=64, observe=rec.observe, send_when_idle=False)
        first = await b.submit("k", 1)
        second = await b.submit("k", 2)
        return first, second

    assert run(main()) == (10, 20)
    assert [items for _, items in rec.calls] == [[1], [2]]


def test_a_failed_call_fails_every_request_of_its_batch_and_only_those():
    rec = Recorder(fail=RuntimeError("milvus down"))

    async def main():
        b = MicroBatcher(rec.run, window_s=0.02, max_batch=64, observe=rec.observe, send_when_idle=False)
        return await asyncio.gather(*[b.submit("k", i) for i in range(3)], return_exceptions=True)

    out = run(main())
    assert len(out) == 3 and all(isinstance(e, RuntimeError) and str(e) == "milvus down" for e in out)
    assert len(rec.calls) == 1


def test_a_cancelled_request_leaves_the_rest_of_its_batch_answered():
    rec = Recorder()

    async def main():
        rec.gate = asyncio.Event()
        b = MicroBatcher(rec.run, window_s=0.01, max_batch=64, observe=rec.observe, send_when_idle=False)
        tasks = [asyncio.create_task(b.submit("k", i)) for i in range(3)]
        while not rec.calls:  # the batch is in its Milvus call
            await asyncio.sleep(0.005)
        tasks[1].cancel()  # its client went away
        rec.gate.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    out = run(main())
    assert out[0] == 0 and out[2] == 20 and isinstance(out[1], asyncio.CancelledError)


def test_a_result_count_mismatch_is_an_error_not_a_misrouted_answer():
    async def short(key, items):
        return [1]

    async def main():
        b = MicroBatcher(short, window_s=0.01, max_batch=64, send_when_idle=False)
        return await asyncio.gather(*[b.submit("k", i) for i in range(2)], return_exceptions=True)

    out = run(main())
    assert all(isinstance(e, RuntimeError) for e in out)


def test_close_sends_what_is_pending():
    rec = Recorder()

    async def main():
        b = MicroBatcher(rec.run, window_s=30.0, max_batch=64, observe=rec.observe, send_when_idle=False)
        task = asyncio.create_task(b.submit("k", 7))
        await asyncio.sleep(0)  # queued, its 30 s window running
        await b.close()
        return await asyncio.wait_for(task, 5.0)

    assert run(main()) == 70


def test_a_lone_request_does_not_wait_the_window_when_milvus_is_idle():
    rec = Recorder()

    async def main():
        b = MicroBatcher(rec.run, window_s=30.0, max_batch=64, observe=rec.observe)
        return await asyncio.wait_for(b.submit("k", 3), 5.0)

    assert run(main()) == 30
    assert rec.sizes == [1]


def test_requests_arriving_during_a_call_form_the_next_batch_sent_when_it_returns():
    rec = Recorder()

    async def main():
        rec.gate = asyncio.Event()
        b = MicroBatcher(rec.run, window_s=30.0, max_batch=64, observe=rec.observe)
        first = asyncio.create_task(b.submit("k", 0))
        while not rec.calls:
            await asyncio.sleep(0.001)
        rest = [asyncio.create_task(b.submit(k, i)) for k, i in (("k", 1), ("k", 2), ("j", 3), ("k", 4))]
        await asyncio.sleep(0.02)
        assert len(rec.calls) == 1  # Milvus busy: they wait (the 30 s window is not what sends them)
        rec.gate.set()
        return await asyncio.wait_for(asyncio.gather(first, *rest), 5.0)

    assert run(main()) == [0, 10, 20, 30, 40]
    assert sorted(rec.calls, key=lambda c: c[1]) == [("k", [0]), ("k", [1, 2, 4]), ("j", [3])]


def test_no_more_calls_in_flight_than_the_slots_and_a_full_batch_is_not_overfilled():
    rec = Recorder()
    live = {"now": 0, "most": 0}

    async def tracked(key, items):
        live["now"] += 1
        live["most"] = max(live["most"], live["now"])
        try:
            return await rec.run(key, items)
        finally:
            live["now"] -= 1

    async def main():
        rec.gate = asyncio.Event()
        b = MicroBatcher(tracked, window_s=0.001, max_batch=3, max_calls=2)
        tasks = [asyncio.create_task(b.submit("k", i)) for i in range(10)]
        await asyncio.sleep(0.05)  # windows long past: still only two calls may run
        assert len(rec.calls) == 2
        rec.gate.set()
        return await asyncio.wait_for(asyncio.gather(*tasks), 5.0)

    assert run(main()) == [i * 10 for i in range(10)]
    assert live["most"] == 2
    assert all(len(items) <= 3 for _, items in rec.calls)
    assert sorted(i for _, items in rec.calls for i in items) == list(range(10))


def test_max_batch_below_one_is_refused():
    with pytest.raises(ValueError):
        MicroBatcher(Recorder().run, window_s=0.01, max_batch=0)
    with pytest.raises(ValueError):
        MicroBatcher(Recorder().run, window_s=0.01, max_batch=4, max_calls=0)
