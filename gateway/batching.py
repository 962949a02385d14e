"""Dynamic batching of Milvus calls: concurrent requests share one multi-vector call.

One Milvus search of 32 vectors costs a few times one search of 1 (the scan of the
collection is memory-bound and a batch shares it), so under load the gateway gathers the
requests that arrive within ``IMGSEARCH_SEARCH_BATCH_MS`` into one call, like Triton's
dynamic batcher does for the model. At most ``IMGSEARCH_SEARCH_BATCH_CALLS`` calls of a
kind are in flight (Triton's model instances); a batch goes out when a call slot is free
and it is full (``IMGSEARCH_SEARCH_BATCH_MAX``), its window has passed, or (the default,
``IMGSEARCH_SEARCH_BATCH_IDLE_SEND``) at once: with a slot free, waiting only adds latency.
So a lone client pays nothing, and under load the requests that arrive while the slots
are busy form the next batch: it grows with the load, and Milvus' scan of the collection
(memory-bound, so shared by a batch) is paid once per batch. Sending more calls than
slots would only queue them in the store's thread pool as many small ones. Window 0:
every request makes its own call, at once.

Requests are grouped by a key: only those that can share one Milvus call (the same
filter expression, the same search parameters) are merged; what differs per request
(top_k, min_score, the excluded id) is applied when the answer is split back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Q = TypeVar("Q")
R = TypeVar("R")

RunBatch = Callable[[Hashable, Sequence[Q]], Awaitable[Sequence[R]]]
Observe = Callable[[int, Sequence[float]], None]


@dataclass
class _Pending(Generic[Q]):
    key: Hashable
    items: list[Q] = field(default_factory=list)
    futures: list[asyncio.Future] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None
    expired: bool = False  # its window has passed


class MicroBatcher(Generic[Q, R]):
    """Merge concurrent ``submit(key, item)`` calls with equal keys into one ``run(key, items)``.

    ``run`` returns one result per item, in order. If it raises, every request of the batch
    gets that error. ``observe(n, waits)`` is told each call's size and how long each of its
    requests waited for the call to start (the metrics).
    """

    def __init__(self, run: RunBatch, window_s: float, max_batch: int, observe: Observe | None = None,
                 send_when_idle: bool = True, max_calls: int = 1) -> None:
        if max_batch < 1 or max_calls < 1:
            raise ValueError("max_batch and max_calls must be >= 1")
        self._run = run
        self.window_s = max(0.0, window_s)
        self.max_batch = max_batch
        self.max_calls = max_calls
        self.send_when_idle = send_when_idle
        self._observe = observe or (lambda n, waits: None)
        self._queue: list[_Pending[Q]] = []  # oldest first
        self._open: dict[Hashable, _Pending[Q]] = {}  # the batch of each key still taking requests
        self._in_flight = 0
        self._tasks: set[asyncio.Task] = set()

    @property
    def enabled(self) -> bool:
        return self.window_s > 0 and self.max_batch > 1

    async def submit(self, key: Hashable, item: Q) -> R:
        if not self.enabled:
            self._observe(1, (0.0,))
            return (await self._run(key, [item]))[0]
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        batch = self._open.get(key)
        if batch is None:
            batch = self._open[key] = _Pending(key)
            self._queue.append(batch)
            batch.timer = loop.call_later(self.window_s, self._expire, batch)
        batch.items.append(item)
        batch.futures.append(fut)
        batch.arrived.append(time.perf_counter())
        if len(batch.items) >= self.max_batch:
            del self._open[key]  # full: the next request of this key starts another batch
        self._pump()
        return await fut

    def _ready(self, batch: _Pending[Q]) -> bool:
        return self.send_when_idle or batch.expired or len(batch.items) >= self.max_batch

    def _expire(self, batch: _Pending[Q]) -> None:
        batch.expired = True
        self._pump()

    def _pump(self, force: bool = False) -> None:
        """Send ready batches, oldest first, while a call slot is free (``force``: all, now)."""
        while self._queue and (force or self._in_flight < self.max_calls):
            batch = next((b for b in self._queue if force or self._ready(b)), None)
            if batch is None:
                return
            self._send(batch)

    def _send(self, batch: _Pending[Q]) -> None:
        self._queue.remove(batch)
        if self._open.get(batch.key) is batch:
            del self._open[batch.key]
        if batch.timer is not None:
            batch.timer.cancel()
        now = time.perf_counter()
        self._observe(len(batch.items), [now - t for t in batch.arrived])
        self._in_flight += 1
        task = asyncio.get_running_loop().create_task(self._call(batch))
        self._tasks.add(task)  # the loop holds tasks weakly
        task.add_done_callback(self._tasks.discard)

    async def _call(self, batch: _Pending[Q]) -> None:
        try:
            results = await self._run(batch.key, batch.items)
            if len(results) != len(batch.items):
                raise RuntimeError(f"batched call returned {len(results)} results for {len(batch.items)} requests")
        except BaseException as e:  # noqa: BLE001 - handed to every waiting request
            for f in batch.futures:
                if not f.done():  # a request whose client went away is cancelled already
                    f.set_exception(e)
            if isinstance(e, asyncio.CancelledError):
                raise
            return
        else:
            for f, r in zip(batch.futures, results):
                if not f.done():
                    f.set_result(r)
        finally:
            self._in_flight -= 1
            self._pump()

    async def close(self) -> None:
        """Send what is pending now and wait for the calls in flight (shutdown)."""
        self._pump(force=True)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
