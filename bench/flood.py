"""Overload and fault figures: a flood at 10x capacity, Triton's bounded queue, Triton killed,
Milvus down or locked, and SIGTERM with requests in flight. The numbers in docs/reliability.md.

Each scenario drives the real gateway over HTTP and measures what a client sees:

  flood          capacity first (closed loop, concurrency 1 then 2), then an open-loop flood at
                 --factor x capacity for --flood-s seconds: answers by status, p50/p99 of the
                 accepted (200) requests, 503s without Retry-After, the gateway's RSS peak
                 over its baseline, and how long after the flood stops a search is normal again
  triton_queue   a gateway with a high in-flight limit over a Triton whose queue holds 2:
                 a burst of 40 -> 200 or 503 "overloaded", counted in imgsearch_shed_total
  triton_kill    SIGKILL Triton under load: first 503 and /readyz 503 after the kill, then
                 restart it on the same ports: seconds until searches succeed again
  milvus_down    the same with Milvus as a server URI (``milvus-lite server`` in its own process)
  milvus_locked  the gateway starts while another process holds the Milvus Lite file's lock
                 (as `imgsearch index` would): 503 with the reason, then the lock goes away
  shutdown       SIGTERM to `imgsearch serve` while 8 uploads are half sent: all must end 200

Without --host the script builds its own stack on loopback ports: resnet18 with random
weights exported into a temp dir (or --model-repository), the local tritonserver, a few
dozen generated images indexed into Milvus Lite, and one uvicorn gateway per scenario.
The flood gets a backend-bound stack of its own, as the test does: ResNet-152 served by
one ONNX Runtime thread (~9 searches/s on a 2-core box), so that 10x capacity is a load one
Python client can offer rather than a measure of the client.
With --host it runs the flood only (it cannot kill what it did not start).

The tests in tests/integration/reliability/ call the same functions and assert bounds.

examples:
  python -m bench.flood                                    # every scenario, own stack (~2 min)
  python -m bench.flood --scenarios flood,triton_kill --out loadtest/out/flood.json
  python -m bench.flood --model-repository /tmp/repo18 --outage-s 20   # reuse an export
  python -m bench.flood --host http://127.0.0.1:8000 --query dog.jpg  # flood a running gateway
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from harness.drive import drive
from harness.stack import (
    GatewayProc,
    LockHolder,
    MilvusServer,
    backend_bound_repo,
    copy_db,
    export_repo,
    gateway_env,
    index_images,
    make_images,
    rss_tree_bytes,
    shape_jpeg,
    start_gateway,
)
from imgsearch.loadtest.scenario import multipart_body
from imgsearch.stats import percentile
from imgsearch.triton_metrics import metric_sum

SCENARIOS = ("flood", "triton_queue", "triton_kill", "milvus_down", "milvus_locked", "shutdown")


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


async def graceful_shutdown(gw: "GatewayProc", data: bytes, n: int = 8, hold_s: float = 1.0,
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


# --- the command ------------------------------------------------------------------------

def public(res: dict[str, Any]) -> dict[str, Any]:
    """The figures of a scenario without the raw replies."""
    return {k: v for k, v in res.items() if "replies" not in k and not k.startswith("_")}


def run_own_stack(args: argparse.Namespace, wanted: list[str]) -> dict[str, Any]:
    from imgsearch.triton_server import LocalTriton

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="imgsearch-flood-") as tmp_s, contextlib.ExitStack() as stack:
        tmp = Path(tmp_s)
        t0 = time.monotonic()
        repo = Path(args.model_repository) if args.model_repository else export_repo(tmp / "repo")
        print(f"model repository {repo} ({time.monotonic() - t0:.0f}s)", file=sys.stderr)
        triton = stack.enter_context(LocalTriton(repo, "cpu", exit_timeout_s=2))
        images = tmp / "images"
        make_images(images)
        template = tmp / "template.db"
        index_images(images, str(template), triton.grpc_url, repo)
        query = args.query.read_bytes() if args.query else shape_jpeg(1, 424242)
        n = 0

        def gateway(triton_url: str, milvus_uri: str | None = None, **extra: object) -> GatewayProc:
            nonlocal n
            n += 1
            uri = milvus_uri or str(copy_db(template, tmp / f"gw{n}.db"))
            gw = start_gateway(gateway_env(repo, triton_url, uri, images, **extra), log_path=tmp / f"gw{n}.log")
            stack.callback(gw.stop)
            return gw

        for name in wanted:
            print(f"-- {name}", file=sys.stderr)
            if name == "flood":
                # the backend the test floods too: capacity set by the model, not by this box's last cycle
                t0 = time.monotonic()
                slow_repo = backend_bound_repo(tmp / "slow152")
                slow = stack.enter_context(LocalTriton(slow_repo, "cpu", exit_timeout_s=2))
                db = tmp / "flood152.db"
                index_images(images, str(db), slow.grpc_url, slow_repo)
                print(f"flood backend: ResNet-152, one ONNX Runtime thread ({time.monotonic() - t0:.0f}s)",
                      file=sys.stderr)
                n += 1
                gw = start_gateway(gateway_env(slow_repo, slow.grpc_url, str(db), images,
                                               max_inflight=args.max_inflight), log_path=tmp / f"gw{n}.log")
                stack.callback(gw.stop)
                results[name] = {"max_inflight": args.max_inflight, "backend": "resnet152, 1 ORT thread",
                                 **public(asyncio.run(flood(gw.url, query, gw.pid, factor=args.factor,
                                                            flood_s=args.flood_s)))}
            elif name == "triton_queue":
                tq = export_repo(tmp / "tinyq", "--max-queue-size", "2", "--max-batch-size", "1",
                                 "--queue-delay-us", "0")
                small = stack.enter_context(LocalTriton(tq, "cpu", exit_timeout_s=2))
                gw = gateway(small.grpc_url, max_inflight=64)
                results[name] = {"triton_max_queue_size": 2, "max_inflight": 64,
                                 **public(asyncio.run(triton_queue(gw.url, query, 40)))}
            elif name == "triton_kill":
                own = LocalTriton(repo, "cpu", exit_timeout_s=2)
                stack.enter_context(own)
                gw = gateway(own.grpc_url)
                results[name] = public(asyncio.run(outage(gw.url, query, own.kill, own.start, down_s=args.outage_s)))
            elif name == "milvus_down":
                server = MilvusServer(copy_db(template, tmp / "server.db"), log_path=tmp / "milvus.log").start()
                stack.callback(server.stop)
                gw = gateway(triton.grpc_url, server.uri)
                results[name] = public(asyncio.run(outage(gw.url, query, server.kill, server.start,
                                                          down_s=args.outage_s)))
            elif name == "milvus_locked":
                db = copy_db(template, tmp / "locked.db")
                holder = LockHolder(db).start()
                stack.callback(holder.release)
                gw = gateway(triton.grpc_url, str(db))
                results[name] = public(asyncio.run(locked_then_released(gw.url, query, holder.release)))
            elif name == "shutdown":
                n += 1
                gw = start_gateway(gateway_env(repo, triton.grpc_url, str(copy_db(template, tmp / f"gw{n}.db")),
                                               images, max_inflight=16, graceful_shutdown_s=args.grace_s),
                                   serve_cli=True, log_path=tmp / f"gw{n}.log")
                stack.callback(gw.stop)
                results[name] = {"graceful_shutdown_s": args.grace_s,
                                 **public(asyncio.run(graceful_shutdown(gw, query)))}
    return results


def table(results: dict[str, Any]) -> str:
    lines = []
    for name, r in results.items():
        lines.append(f"{name}:")
        for k, v in r.items():
            lines.append(f"  {k:34s} {json.dumps(v)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.flood", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", help="flood this running gateway (e.g. http://127.0.0.1:8000) instead of a stack of our own")
    p.add_argument("--pid", type=int, help="with --host: the gateway's pid, to sample its RSS")
    p.add_argument("--query", type=Path, help="query image (default: a generated JPEG)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma list of: " + ", ".join(SCENARIOS))
    p.add_argument("--model-repository", help="reuse an exported model repository (served name resnet152)")
    p.add_argument("--factor", type=float, default=10.0, help="flood rate / measured capacity (default: %(default)s)")
    p.add_argument("--flood-s", type=float, default=4.0, help="flood duration (default: %(default)s)")
    p.add_argument("--max-inflight", type=int, default=4, help="own stack's IMGSEARCH_MAX_INFLIGHT for the flood")
    p.add_argument("--outage-s", type=float, default=1.0, help="seconds a killed backend stays down before restart")
    p.add_argument("--grace-s", type=float, default=10.0, help="IMGSEARCH_GRACEFUL_SHUTDOWN_S for the shutdown run")
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = p.parse_args(argv)
    wanted = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(wanted) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    if args.host:
        if wanted != ["flood"] and set(wanted) != set(SCENARIOS):
            p.error("--host runs the flood only: the fault scenarios need a stack this script started")
        query = args.query.read_bytes() if args.query else shape_jpeg(1, 424242)
        results = {"flood": public(asyncio.run(flood(args.host.rstrip("/"), query, args.pid, factor=args.factor,
                                                     flood_s=args.flood_s)))}
    else:
        results = run_own_stack(args, wanted)
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
            "python": platform.python_version(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(table(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
