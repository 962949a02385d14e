"""Dynamic batching of Milvus calls: concurrent requests share one multi-vector call.

One Milvus search of 32 vectors costs a few times one search of 1 (the scan of the
collection is memory-bound and a batch shares it), so under load the gateway gathers the
requests that arrive within ``IMGSEARCH_SEARCH_BATCH_MS`` into one call, like Triton's
dynamic batcher does for the model. A batch goes out when its window has passed, when it
holds ``IMGSEARCH_SEARCH_BATCH_MAX`` requests, or (``IMGSEARCH_SEARCH_BATCH_IDLE_SEND``,
on by default) at once when no call of its kind is in flight: waiting then only adds
latency, as nobody else is using Milvus; the requests that arrive during that call form
the next batch, sent when it returns. So a lone client pays nothing, and under load the
batch grows to what arrives during one Milvus call, capped by the window. Window 0:
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
    items: list[Q] = field(default_factory=list)
    futures: list[asyncio.Future] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


class MicroBatcher(Generic[Q, R]):
    """Merge concurrent ``submit(key, item)`` calls with equal keys into one ``run(key, items)``.

    ``run`` returns one result per item, in order. If it raises, every request of the batch
    gets that error. ``observe(n, waits)`` is told each call's size and how long each of its
    requests waited for the call to start (the metrics).
    """

    def __init__(self, run: RunBatch, window_s: float, max_batch: int, observe: Observe | None = None,
                 send_when_idle: bool = True) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self._run = run
        self.window_s = max(0.0, window_s)
        self.max_batch = max_batch
        self.send_when_idle = send_when_idle
        self._in_flight = 0
        self._observe = observe or (lambda n, waits: None)
        self._pending: dict[Hashable, _Pending[Q]] = {}
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
        batch = self._pending.get(key)
        if batch is None:
            batch = self._pending[key] = _Pending()
            batch.timer = loop.call_later(self.window_s, self._dispatch, key, batch)
        batch.items.append(item)
        batch.futures.append(fut)
        batch.arrived.append(time.perf_counter())
        if len(batch.items) >= self.max_batch or (self.send_when_idle and not self._in_flight):
            self._dispatch(key, batch)
        return await fut

    def _dispatch(self, key: Hashable, batch: _Pending[Q]) -> None:
        if self._pending.get(key) is not batch:
            return  # already sent (full before its timer fired)
        del self._pending[key]
        if batch.timer is not None:
            batch.timer.cancel()
        now = time.perf_counter()
        self._observe(len(batch.items), [now - t for t in batch.arrived])
        self._in_flight += 1
        task = asyncio.get_running_loop().create_task(self._call(key, batch))
        self._tasks.add(task)  # the loop holds tasks weakly
        task.add_done_callback(self._tasks.discard)

    async def _call(self, key: Hashable, batch: _Pending[Q]) -> None:
        try:
            await self._answer(key, batch)
        finally:
            self._in_flight -= 1
            if self.send_when_idle and not self._in_flight:
                for k, b in list(self._pending.items()):  # gathered during the call: send now
                    self._dispatch(k, b)

    async def _answer(self, key: Hashable, batch: _Pending[Q]) -> None:
        try:
            results = await self._run(key, batch.items)
            if len(results) != len(batch.items):
                raise RuntimeError(f"batched call returned {len(results)} results for {len(batch.items)} requests")
        except BaseException as e:  # noqa: BLE001 - handed to every waiting request
            for f in batch.futures:
                if not f.done():  # a request whose client went away is cancelled already
                    f.set_exception(e)
            if isinstance(e, asyncio.CancelledError):
                raise
            return
        for f, r in zip(batch.futures, results):
            if not f.done():
                f.set_result(r)

    async def close(self) -> None:
        """Send what is pending now and wait for the calls in flight (shutdown)."""
        for key, batch in list(self._pending.items()):
            self._dispatch(key, batch)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
