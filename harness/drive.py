"""The closed-loop load driver every benchmark uses.

``concurrency`` clients each send their next request as soon as their last one is
answered, for ``seconds`` and/or until ``requests`` have been sent, whichever comes first.
A request is ``call(i)``: ``i`` is its sequence number over all clients (0, 1, 2, ...), for
the caller to pick its input with. Every answered call is kept as a :class:`Call`: its
latency (the call alone, on ``time.perf_counter``), the label ``outcome`` gives what it
returned, and whether that label is the one that means success. A call that raises is
labelled with the exception's type name and counted as an error, so a benchmark goes on
through a failing backend; ``raise_errors`` makes the first exception end the run instead.

:func:`drive` runs async calls as tasks of the running loop; :func:`drive_threads` runs
blocking calls on ``concurrency`` threads (inline when it is 1, so that a sequential
benchmark times no thread hand-offs). Percentiles of the latencies: :mod:`imgsearch.stats`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

OK = "ok"


@dataclass(slots=True)
class Call:
    index: int  # the request's sequence number, what ``call`` was given
    latency_s: float
    label: str  # outcome(result), or the exception's type name
    ok: bool
    result: Any = None  # what the call returned (None when it raised, or when results are not kept)


@dataclass
class Load:
    """What a run saw; ``calls`` in the order they were answered."""

    calls: list[Call] = field(default_factory=list)
    wall_s: float = 0.0  # first request sent to last answer
    started_at: float = 0.0  # time.time() as the first request went out
    ended_at: float = 0.0  # time.time() once every client stopped

    @property
    def requests(self) -> int:
        return len(self.calls)

    @property
    def latencies_s(self) -> list[float]:
        """Every answered call's latency, errors included."""
        return [c.latency_s for c in self.calls]

    @property
    def ok_latencies_s(self) -> list[float]:
        return [c.latency_s for c in self.calls if c.ok]

    @property
    def ok_count(self) -> int:
        return sum(1 for c in self.calls if c.ok)

    @property
    def error_count(self) -> int:
        return self.requests - self.ok_count

    @property
    def counts(self) -> dict[str, int]:
        """Calls per label, success included, in the order each label was first seen."""
        out: dict[str, int] = {}
        for c in self.calls:
            out[c.label] = out.get(c.label, 0) + 1
        return out

    @property
    def errors(self) -> dict[str, int]:
        """Failed calls per label."""
        out: dict[str, int] = {}
        for c in self.calls:
            if not c.ok:
                out[c.label] = out.get(c.label, 0) + 1
        return out

    @property
    def throughput(self) -> float:
        """Successful calls per second of wall time."""
        return self.ok_count / self.wall_s if self.wall_s > 0 else 0.0

    def results(self) -> list[Any]:
        """What each call returned, in sequence-number order."""
        return [c.result for c in sorted(self.calls, key=lambda c: c.index)]


class _Run:
    """The stop rule and the record, shared by the async and the thread flavour."""

    def __init__(self, concurrency: int, seconds: float | None, requests: int | None,
                 outcome: Callable[[Any], str] | None, ok: str, keep_results: bool) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        if seconds is None and requests is None:
            raise ValueError("give seconds, requests or both: a closed loop needs a stop")
        self.seconds, self.limit = seconds, requests
        self.outcome, self.ok, self.keep = outcome, ok, keep_results
        self.load = Load()
        self.deadline = float("inf")
        self._next = 0
        self._lock = threading.Lock()
        self._aborted = False

    def start(self) -> None:
        self.load.started_at = time.time()
        self._t0 = time.perf_counter()
        if self.seconds is not None:
            self.deadline = self._t0 + self.seconds

    def claim(self) -> int | None:
        """The next sequence number, or None once the run is over."""
        if self._aborted or time.perf_counter() >= self.deadline:
            return None
        with self._lock:
            i = self._next
            if self.limit is not None and i >= self.limit:
                return None
            self._next += 1
        return i

    def answered(self, i: int, latency_s: float, result: Any) -> None:
        label = self.outcome(result) if self.outcome else OK
        self.load.calls.append(Call(i, latency_s, label, label == self.ok, result if self.keep else None))

    def raised(self, i: int, latency_s: float, e: Exception, raise_errors: bool) -> None:
        if raise_errors:
            self._aborted = True  # the other clients send nothing more
            raise e
        self.load.calls.append(Call(i, latency_s, type(e).__name__, False))

    def finish(self) -> Load:
        self.load.wall_s = time.perf_counter() - self._t0
        self.load.ended_at = time.time()
        return self.load


async def drive(call: Callable[[int], Awaitable[T]], *, concurrency: int, seconds: float | None = None,
                requests: int | None = None, outcome: Callable[[T], str] | None = None, ok: str = OK,
                start_at: float | None = None, raise_errors: bool = False, keep_results: bool = True) -> Load:
    """Closed-loop load of async ``call`` (see the module).

    ``outcome`` labels a returned value (after its latency is taken); the call succeeded when
    the label is ``ok``. Without ``outcome`` every return is a success. ``start_at`` (a
    ``time.time()``) holds the first request back until then, so that client processes
    started one after another load the server together.
    """
    run = _Run(concurrency, seconds, requests, outcome, ok, keep_results)
    if start_at is not None:
        await asyncio.sleep(max(0.0, start_at - time.time()))

    async def client() -> None:
        while (i := run.claim()) is not None:
            t = time.perf_counter()
            try:
                result = await call(i)
            except Exception as e:
                run.raised(i, time.perf_counter() - t, e, raise_errors)
            else:
                run.answered(i, time.perf_counter() - t, result)

    run.start()
    await asyncio.gather(*[client() for _ in range(concurrency)])
    return run.finish()


def drive_threads(call: Callable[[int], T], *, concurrency: int, seconds: float | None = None,
                  requests: int | None = None, outcome: Callable[[T], str] | None = None, ok: str = OK,
                  start_at: float | None = None, raise_errors: bool = False, keep_results: bool = True) -> Load:
    """Closed-loop load of blocking ``call`` on ``concurrency`` threads; arguments as :func:`drive`."""
    run = _Run(concurrency, seconds, requests, outcome, ok, keep_results)
    if start_at is not None:
        time.sleep(max(0.0, start_at - time.time()))

    def client() -> None:
        while (i := run.claim()) is not None:
            t = time.perf_counter()
            try:
                result = call(i)
            except Exception as e:
                run.raised(i, time.perf_counter() - t, e, raise_errors)
            else:
                run.answered(i, time.perf_counter() - t, result)

    run.start()
    if concurrency == 1:
        client()
    else:
        with ThreadPoolExecutor(concurrency, thread_name_prefix="drive") as pool:
            for f in [pool.submit(client) for _ in range(concurrency)]:
                f.result()
    return run.finish()
