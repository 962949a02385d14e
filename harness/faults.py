"""Fault and overload scenarios over a running gateway, and what a client sees of them.

Each function drives the real gateway over HTTP (and kills, restarts or locks what the
caller hands it) and returns its figures: the reliability tests assert bounds on them, and
``python -m bench.flood`` records them (docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from harness.drive import drive
from harness.stack import GatewayProc, rss_tree_bytes
from imgsearch.loadtest.scenario import multipart_body
from imgsearch.stats import percentile
from imgsearch.triton_metrics import metric_sum

# --- what a client sees -----------------------------------------------------------------

@dataclass
class Reply:
    status: int  # 0: no HTTP answer at all (refused, reset)
    latency_s: float  # from the (scheduled) send time to the answer
    code: str | None  # error.code of a JSON error body
    retry_after: str | None
    sent_at: float  # time.monotonic()
    done_at: float
    message: str | None = None  # error.message, or the transport error


def _reply(status: int, sent: float, body: bytes | None, retry_after: str | None, err: str | None = None) -> Reply:
    code = message = None
    if status != 200 and body:
        with contextlib.suppress(Exception):
            e = json.loads(body)["error"]
            code, message = e["code"], e["message"]
    done = time.monotonic()
    return Reply(status, done - sent, code, retry_after, sent, done, message or err)


def make_client(url: str, connections: int = 64, timeout_s: float = 60.0) -> httpx.AsyncClient:
    # trust_env=False: a developer's HTTP(S)_PROXY must not route loopback traffic elsewhere
    return httpx.AsyncClient(base_url=url, trust_env=False, timeout=httpx.Timeout(timeout_s, pool=None),
                             limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections))


async def search_once(c: httpx.AsyncClient, data: bytes, sent_at: float | None = None) -> Reply:
    sent = sent_at if sent_at is not None else time.monotonic()
    try:
        r = await c.post("/v1/search", params={"top_k": 5}, files={"file": ("q.jpg", data, "image/jpeg")})
    except httpx.HTTPError as e:
        return _reply(0, sent, None, None, f"{type(e).__name__}: {e}")
    return _reply(r.status_code, sent, r.content, r.headers.get("retry-after"))


async def closed_loop(url: str, data: bytes, concurrency: int, duration_s: float) -> tuple[list[Reply], float]:
    """``concurrency`` clients, each sending its next search when the last one is answered."""
    start = time.monotonic()
    async with make_client(url, concurrency) as c:
        # search_once answers every HTTP failure as a Reply: anything raised is a bug, and ends the run
        load = await drive(lambda i: search_once(c, data), concurrency=concurrency, seconds=duration_s,
                           raise_errors=True)
    return [call.result for call in load.calls], time.monotonic() - start


async def open_loop(url: str, data: bytes, rate: float, duration_s: float,
                    connections: int = 512) -> tuple[list[Reply], float, float]:
    """Send at ``rate`` per second whatever the answers (a flood does not wait for them).

    Latency counts from the scheduled send time, so a client that falls behind shows up
    as latency, not as a lower offered load. Returns (replies, send seconds, stop time).
    """
    tasks: list[asyncio.Task] = []
    async with make_client(url, connections) as c:
        start = time.monotonic()
        i = 0
        while i / rate < duration_s:
            t = start + i / rate
            delay = t - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(search_once(c, data, sent_at=t)))
            i += 1
        stopped = time.monotonic()
        replies = list(await asyncio.gather(*tasks))
    return replies, stopped - start, stopped


async def burst(url: str, data: bytes, n: int) -> list[Reply]:
    async with make_client(url, n) as c:
        return (await drive(lambda i: search_once(c, data), concurrency=n, requests=n,
                            raise_errors=True)).results()


def ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000.0, 1)


def summarize(replies: list[Reply]) -> dict[str, Any]:
    ok = [r.latency_s for r in replies if r.status == 200]
    shed = [r for r in replies if r.status == 503]
    return {
        "requests": len(replies),
        "by_status": dict(sorted(Counter(str(r.status) for r in replies).items())),
        "by_code": dict(sorted(Counter(r.code for r in replies if r.code).items())),
        "accepted": len(ok),
        "accepted_p50_ms": ms(percentile(ok, 50)),
        "accepted_p99_ms": ms(percentile(ok, 99)),
        "accepted_max_ms": ms(max(ok) if ok else None),
        "shed_p99_ms": ms(percentile([r.latency_s for r in shed], 99)),
        "503_without_retry_after": sum(1 for r in shed if not r.retry_after),
    }


# --- the gateway's memory and metrics ---------------------------------------------------

class RssSampler:
    """Samples a process's RSS every ``interval_s`` in a thread: baseline (first sample) and peak."""

    def __init__(self, pid: int, interval_s: float = 0.02) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.baseline = rss_tree_bytes(pid)
        self.peak = self.baseline
        self.samples = 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = rss_tree_bytes(self.pid)
            except Exception:  # noqa: BLE001 - the process went away: keep what we have
                return
            self.peak = max(self.peak, rss)
            self.samples += 1
            self._stop.wait(self.interval_s)

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.baseline) / 2**20

    def figures(self) -> dict[str, float]:
        return {"rss_baseline_mib": round(self.baseline / 2**20, 1), "rss_peak_mib": round(self.peak / 2**20, 1),
                "rss_growth_mib": round(self.growth_mib, 1), "rss_samples": self.samples}

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


async def scrape(url: str) -> str:
    async with make_client(url, 1, 10) as c:
        return (await c.get("/metrics")).text


async def until(check: Callable[[], Awaitable[bool]] | Callable[[], bool], limit_s: float,
                step_s: float = 0.05) -> float | None:
    """Poll ``check`` until true; the monotonic time it became true, or None after ``limit_s``."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        res = check()
        if asyncio.iscoroutine(res):
            res = await res
        if res:
            return time.monotonic()
        await asyncio.sleep(step_s)
    return None


# --- scenarios --------------------------------------------------------------------------

async def flood(url: str, data: bytes, pid: int | None = None, factor: float = 10.0, probe_s: float = 2.0,
                capacity_s: float = 3.0, flood_s: float = 4.0, recover_limit_s: float = 30.0) -> dict[str, Any]:
    """Capacity first, then ``factor`` x capacity open loop; then time until a normal search."""
    single, _ = await closed_loop(url, data, 1, probe_s)
    single_ok = [r.latency_s for r in single if r.status == 200]
    if not single_ok:
        raise RuntimeError(f"no search succeeded before the flood: {summarize(single)}")
    l1 = percentile(single_ok, 50)
    cap, cap_s = await closed_loop(url, data, 2, capacity_s)
    capacity = sum(1 for r in cap if r.status == 200) / cap_s
    rate = factor * max(capacity, 1.0)
    normal_s = max(2 * l1, l1 + 0.25)  # "normal latency" after the flood
    sampler = RssSampler(pid) if pid else None
    with sampler or contextlib.nullcontext():
        replies, send_s, stopped = await open_loop(url, data, rate, flood_s)
        recovered_at = None
        async with make_client(url, 1) as c:
            deadline = stopped + recover_limit_s
            while time.monotonic() < deadline:
                r = await search_once(c, data)
                if r.status == 200 and r.latency_s <= normal_s:
                    recovered_at = r.done_at
                    break
                await asyncio.sleep(0.05)
    out = {
        "single_p50_ms": ms(l1), "single_requests": len(single),
        "capacity_rps": round(capacity, 2), "factor": factor, "offered_rps": round(rate, 1),
        "sent_rps": round(len(replies) / send_s, 1), "flood_s": round(send_s, 2),
        **summarize(replies),
        "normal_latency_ms": ms(normal_s),
        "recovered_after_s": None if recovered_at is None else round(max(0.0, recovered_at - stopped), 2),
        "replies": replies,
    }
    if sampler:
        out.update(sampler.figures())
    return out


async def triton_queue(url: str, data: bytes, n: int = 40) -> dict[str, Any]:
    """A burst of ``n`` searches against a gateway whose in-flight limit is above n."""
    before = await scrape(url)
    replies = await burst(url, data, n)
    after = await scrape(url)

    def delta(name: str, **labels: str) -> float:
        return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

    return {**summarize(replies),
            "shed_triton_overloaded": delta("imgsearch_shed_total", reason="triton_overloaded"),
            "shed_inflight": delta("imgsearch_shed_total", reason="inflight"),
            "errors_overloaded": delta("imgsearch_errors_total", code="overloaded"),
            "replies": replies}


async def outage(url: str, data: bytes, kill: Callable[[], object], restart: Callable[[], object], *,
                 warm_s: float = 1.0, down_s: float = 1.0, concurrency: int = 2,
                 limit_s: float = 60.0, pace_s: float = 0.05) -> dict[str, Any]:
    """Searches in a loop; ``kill`` a backend, watch the gateway say so; ``restart`` it, time the return.

    ``restart`` returns once the backend itself answers again; recovery is counted from
    then to the first search answered 200 (the gateway is never restarted).
    """
    replies: list[Reply] = []
    stop = asyncio.Event()
    readyz: list[tuple[float, int]] = []
    async with make_client(url, concurrency + 2) as c:
        async def worker() -> None:
            while not stop.is_set():
                r = await search_once(c, data)
                replies.append(r)
                if r.status != 200:
                    await asyncio.sleep(pace_s)  # a 503 is fast: do not spin

        async def ready_is(status: int) -> bool:
            try:
                got = (await c.get("/readyz")).status_code
            except httpx.HTTPError:
                got = 0
            readyz.append((time.monotonic(), got))
            return got == status

        workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
        try:
            await asyncio.sleep(warm_s)
            t_kill = time.monotonic()
            await asyncio.to_thread(kill)
            t_readyz = await until(lambda: ready_is(503), limit_s)
            t_503 = await until(lambda: any(r.status == 503 and r.done_at > t_kill for r in replies), limit_s)
            await asyncio.sleep(down_s)
            t_restart = time.monotonic()
            await asyncio.to_thread(restart)
            t_back = time.monotonic()
            t_ok = await until(lambda: any(r.status == 200 and r.done_at > t_back for r in replies), limit_s, 0.01)
            t_ready = await until(lambda: ready_is(200), limit_s)
        finally:
            stop.set()
            await asyncio.gather(*workers)
    end = t_ok if t_ok is not None else time.monotonic()
    during = [r for r in replies if t_kill < r.done_at < end]
    first_503 = next((r for r in replies if r.status == 503 and r.done_at > t_kill), None)

    def since(t: float | None, t0: float) -> float | None:
        return None if t is None else round(max(0.0, t - t0), 3)

    return {
        "before": summarize([r for r in replies if r.done_at <= t_kill]),
        "during": summarize(during),
        "after": summarize([r for r in replies if r.done_at >= end]),
        "first_503_after_kill_s": since(t_503, t_kill),
        "readyz_503_after_kill_s": since(t_readyz, t_kill),
        "outage_s": round(t_back - t_kill, 2),
        "backend_restart_s": round(t_back - t_restart, 2),
        "recovered_after_backend_back_s": since(t_ok, t_back),
        "readyz_200_after_backend_back_s": since(t_ready, t_back),
        "first_503_message": first_503.message if first_503 else None,
        "replies": replies, "during_replies": during,
        "_t_kill": t_kill, "_t_restart": t_restart, "_t_back": t_back, "_t_recovered": t_ok,  # monotonic, for slicing replies
    }


async def locked_then_released(url: str, data: bytes, release: Callable[[], object],
                               limit_s: float = 60.0) -> dict[str, Any]:
    """A gateway that started while its Milvus Lite file was held elsewhere; then the holder goes."""
    async with make_client(url, 2) as c:
        locked = await search_once(c, data)
        ready = await c.get("/readyz")
        t_release = time.monotonic()
        await asyncio.to_thread(release)
        t_released = time.monotonic()
        after: list[Reply] = []

        async def ok() -> bool:
            after.append(await search_once(c, data))
            return after[-1].status == 200

        t_ok = await until(ok, limit_s, 0.05)
    return {
        "locked": {"status": locked.status, "code": locked.code, "message": locked.message,
                   "retry_after": locked.retry_after},
        "readyz_while_locked": ready.status_code, "readyz_detail": ready.json().get("detail"),
        "release_s": round(t_released - t_release, 2),
        "recovered_after_release_s": None if t_ok is None else round(t_ok - t_released, 3),
        "after": summarize(after), "after_replies": after,
    }


async def _half_sent_search(host: str, port: int, data: bytes, sent: asyncio.Event, go: asyncio.Event,
                            timeout_s: float) -> Reply:
    """Headers and half the body now, the rest once ``go`` is set; then read the whole answer."""
    body, ctype = multipart_body("q.jpg", data, "image/jpeg")
    head = (f"POST /v1/search?top_k=3 HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    t0 = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(head + body[: len(body) // 2])
        await writer.drain()
        sent.set()
        await go.wait()
        writer.write(body[len(body) // 2:])
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout_s)  # Connection: close -> EOF ends it
        writer.close()
    except (OSError, asyncio.TimeoutError) as e:
        sent.set()
        return _reply(0, t0, None, None, f"{type(e).__name__}: {e}")
    if not raw.startswith(b"HTTP/1.1 "):
        return _reply(0, t0, None, None, f"no HTTP answer ({len(raw)} bytes)")
    head_b, _, payload = raw.partition(b"\r\n\r\n")
    status = int(head_b.split(b" ", 2)[1])
    retry = next((ln.split(b":", 1)[1].strip().decode() for ln in head_b.split(b"\r\n")
                  if ln.lower().startswith(b"retry-after:")), None)
    return _reply(status, t0, payload, retry)


async def graceful_shutdown(gw: GatewayProc, data: bytes, n: int = 8, hold_s: float = 1.0,
                            exit_limit_s: float = 60.0) -> dict[str, Any]:
    """SIGTERM while ``n`` uploads are half sent (so certainly accepted and in flight).

    After the signal: a new connection is tried (refusal is fine), then the uploads finish.
    Every one of them must be answered 200, and the process must exit by itself.
    """
    host, port = "127.0.0.1", gw.port
    go = asyncio.Event()
    sent = [asyncio.Event() for _ in range(n)]
    tasks = [asyncio.create_task(_half_sent_search(host, port, data, s, go, exit_limit_s)) for s in sent]
    await asyncio.gather(*[s.wait() for s in sent])
    # accepted: receiving its body (no in-flight slot until the body is in), or in flight
    inflight = 0.0

    async def all_inside() -> bool:
        nonlocal inflight
        text = await scrape(gw.url)
        inflight = metric_sum(text, "imgsearch_inflight_requests") + metric_sum(text, "imgsearch_receiving_requests")
        return inflight >= n

    await until(all_inside, 10.0)
    t_term = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    try:
        _, w = await asyncio.wait_for(asyncio.open_connection(host, port), 2.0)
        w.close()
        new_conn = "accepted"
    except ConnectionRefusedError:
        new_conn = "refused"
    except (OSError, asyncio.TimeoutError) as e:
        new_conn = type(e).__name__
    await asyncio.sleep(max(0.0, hold_s - 0.3))  # the uploads stay half sent a while after SIGTERM
    go.set()
    replies = list(await asyncio.gather(*tasks))
    t_answered = time.monotonic()
    code = await asyncio.to_thread(_wait_exit, gw.proc, exit_limit_s)
    t_exit = time.monotonic()
    return {
        "in_flight_at_sigterm": int(inflight), **summarize(replies),
        "all_answered_after_sigterm_s": round(t_answered - t_term, 2),
        "exit_after_sigterm_s": round(t_exit - t_term, 2), "exit_code": code,
        "new_connection_after_sigterm": new_conn, "replies": replies,
    }


def _wait_exit(proc: subprocess.Popen, limit_s: float) -> int | None:
    try:
        return proc.wait(limit_s)
    except subprocess.TimeoutExpired:
        return None


def public(res: dict[str, Any]) -> dict[str, Any]:
    """The figures of a scenario without the raw replies."""
    return {k: v for k, v in res.items() if "replies" not in k and not k.startswith("_")}
