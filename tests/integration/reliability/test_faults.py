"""Faults: a dependency dies under load and comes back; the gateway says so (503, /readyz)
and recovers by itself. SIGTERM drains what was accepted.

- Triton: SIGKILL of its process group while searches run, restart on the same ports.
- Milvus as a server URI: ``milvus-lite server`` in its own process, SIGKILL, restart.
- Milvus Lite file: held by another process (its flock, as a running indexer holds it)
  when the gateway starts, then released. Moving the .db away from a running gateway was
  tried too: Milvus Lite 3 runs inside the gateway process and keeps serving from memory,
  so that does not take it down (checked below: never a 5xx other than a clean 503).
- SIGTERM to `imgsearch serve` (which started its own tritonserver) while 8 uploads are
  half sent: all 8 answered 200, new connections refused, the process and its Triton exit.

The indexer's faults (SIGKILL x5, Triton dying mid-index) are in tests/integration/indexer/.
"""

from __future__ import annotations

import asyncio
import os
import time

import psutil
import pytest

from harness.data import jpeg_bytes, shape_image
from harness.faults import (
    graceful_shutdown,
    locked_then_released,
    make_client,
    outage,
    search_once,
)
from harness.stack import LockHolder, MilvusServer, copy_db, free_port
from imgsearch.triton_server import LocalTriton

pytestmark = [pytest.mark.integration, pytest.mark.alone]  # bounds in wall-clock time

QUERY = jpeg_bytes(shape_image(1, 4242))


def check_outage(res: dict, code: str, gw) -> None:
    shown = {k: v for k, v in res.items() if "replies" not in k and not k.startswith("_")}
    print("\n" + "\n".join(f"  {k:34s} {v}" for k, v in shown.items()))
    assert res["before"]["by_status"] == {"200": res["before"]["requests"]} and res["before"]["requests"] > 0
    assert res["first_503_after_kill_s"] is not None and res["first_503_after_kill_s"] <= 2.0, shown
    assert res["readyz_503_after_kill_s"] is not None and res["readyz_503_after_kill_s"] <= 2.0, shown
    # a search that was already answered by the backend may still arrive just after the kill;
    # from 0.5 s after it until its restart begins, every answer is a 503 naming the backend
    # (not until restart() returns: it polls, so the backend may serve a search before it does)
    down = [r for r in res["replies"] if res["_t_kill"] + 0.5 < r.done_at < res["_t_restart"]]
    assert down and {r.status for r in down} == {503}, {r.status for r in down}
    assert {r.code for r in down} == {code}
    assert all(r.retry_after and int(r.retry_after) >= 1 for r in down)
    assert {r.status for r in res["replies"]} <= {200, 503}
    # back without restarting the gateway
    assert res["recovered_after_backend_back_s"] is not None and res["recovered_after_backend_back_s"] <= 10.0
    assert res["readyz_200_after_backend_back_s"] is not None
    assert res["after"]["requests"] == 0 or res["after"]["by_status"].get("200", 0) > 0
    assert gw.proc.poll() is None


def test_triton_killed_under_load_503_then_recovers_without_gateway_restart(launch, repo18):
    with LocalTriton(repo18, "cpu", exit_timeout_s=2) as own:
        gw = launch(own.grpc_url)
        res = asyncio.run(outage(gw.url, QUERY, own.kill, own.start, warm_s=1.0, down_s=1.0))
        check_outage(res, "triton_unavailable", gw)
        assert "Triton" in res["first_503_message"]


def test_milvus_server_down_503_with_a_clear_message_then_recovers(launch, rel_data, tmp_path):
    server = MilvusServer(copy_db(rel_data.template, tmp_path / "server.db"), log_path=tmp_path / "milvus.log").start()
    try:
        gw = launch(milvus_uri=server.uri)
        res = asyncio.run(outage(gw.url, QUERY, server.kill, server.start, warm_s=1.0, down_s=1.0))
        check_outage(res, "milvus_unavailable", gw)
        assert "Milvus" in res["first_503_message"]
        assert f":{server.port}" not in res["first_503_message"]  # the address is for the log only
        assert server.uri in gw.log_text()
    finally:
        server.stop()


def test_milvus_lite_file_locked_by_another_process_then_released(launch, rel_data, tmp_path):
    db = copy_db(rel_data.template, tmp_path / "locked.db")
    holder = LockHolder(db).start()
    try:
        gw = launch(milvus_uri=str(db))  # starts anyway: /readyz says what is missing
        res = asyncio.run(locked_then_released(gw.url, QUERY, holder.release))
    finally:
        holder.release()
    print({k: v for k, v in res.items() if "replies" not in k})
    locked = res["locked"]
    assert locked["status"] == 503 and locked["code"] == "milvus_unavailable", locked
    assert int(locked["retry_after"]) >= 1
    assert "Milvus" in locked["message"] and str(db) not in locked["message"], locked["message"]
    assert str(db) in gw.log_text() and "another process" in gw.log_text()  # the why is in the log
    assert res["readyz_while_locked"] == 503 and "milvus" in res["readyz_detail"]
    assert res["recovered_after_release_s"] is not None and res["recovered_after_release_s"] <= 10.0
    assert res["after"]["by_status"].get("200") == 1

    # moving the .db away from the running gateway: served from memory, or a clean 503
    moved = tmp_path / "moved.db"
    os.rename(db, moved)
    try:
        async def three():
            async with make_client(gw.url, 1) as c:
                return [await search_once(c, QUERY) for _ in range(3)]

        answers = asyncio.run(three())
    finally:
        os.rename(moved, db)
    print("moved away:", [(r.status, r.code) for r in answers])
    assert all(r.status == 200 or (r.status == 503 and r.code == "milvus_unavailable") for r in answers)
    assert asyncio.run(three())[-1].status == 200


def test_sigterm_drains_accepted_requests_and_stops_its_triton(launch):
    ports = {f"local_triton_{k}_port": free_port() for k in ("http", "grpc", "metrics")}
    grace = 10
    # no IMGSEARCH_TRITON_URL: `imgsearch serve` starts its own tritonserver (repo18)
    gw = launch(triton_url="", serve_cli=True, max_inflight=16, graceful_shutdown_s=grace, **ports)
    children = psutil.Process(gw.pid).children(recursive=True)
    assert any(ch.name() == "tritonserver" for ch in children), [ch.name() for ch in children]
    res = asyncio.run(graceful_shutdown(gw, QUERY, n=8, hold_s=1.0, exit_limit_s=grace + 20))
    print({k: v for k, v in res.items() if "replies" not in k})
    assert res["in_flight_at_sigterm"] == 8
    assert res["by_status"] == {"200": 8}, [(r.status, r.message) for r in res["replies"]]
    assert all(r.status == 200 for r in res["replies"])
    assert res["new_connection_after_sigterm"] == "refused"
    assert res["exit_code"] is not None and res["exit_after_sigterm_s"] <= grace + 15
    assert res["exit_code"] == 143  # SystemExit(128 + SIGTERM) after the drain, not killed mid-way
    log = gw.log_text()
    assert "Application shutdown complete" in log and "Finished server process" in log
    def running(ch: psutil.Process) -> bool:
        try:
            return ch.is_running() and ch.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 5  # Triton's Python stubs end right after the server
    while any(running(ch) for ch in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = [ch for ch in children if running(ch)]
    assert not alive, f"left running after SIGTERM: {[(ch.pid, ch.name()) for ch in alive]}"
