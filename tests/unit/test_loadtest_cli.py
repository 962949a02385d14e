"""``imgsearch loadtest`` end to end against a stand-in gateway (a thread on loopback).

The stand-in speaks the gateway contract and sheds / fails on a fixed schedule, and its
Triton-style metrics batch exactly two images per execution: the report must find those
numbers. The real stack (tritonserver + Milvus Lite + uvicorn) is exercised in
tests/integration/loadtest/.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from harness.data import jpeg_bytes, make_dataset, shape_image
from imgsearch.cli import main
from imgsearch.loadtest.scenario import classify, multipart_body

THUMB = jpeg_bytes(shape_image(1, 1, 64))


class StubGateway:
    """Every 5th search is shed (503 + Retry-After), every 7th fails (500), every 11th is a 429
    without Retry-After (a failure: the client cannot know when to retry)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.searches = 0
        self.shed = 0
        self.served = 0
        self.bad_bodies = 0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *a):  # quiet
                pass

            def _send(self, status, body: bytes, ctype="application/json", headers=None):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _results(self):
                return json.dumps({"results": [{"id": str(1000 + i), "label": "x", "score": 0.9, "path": "a.jpg",
                                                "url": f"/v1/images/{1000 + i}",
                                                "thumb_url": f"/v1/images/{1000 + i}/thumb"} for i in range(5)],
                                   "breed_guess": None, "timings_ms": {}, "model": {}}).encode()

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if not self.path.startswith("/v1/search"):
                    return self._send(404, b"{}")
                with stub.lock:
                    stub.searches += 1
                    n = stub.searches
                    ok_body = b'name="file"' in body and b"\xff\xd8" in body  # a JPEG in a file field
                    stub.bad_bodies += not ok_body
                if n % 5 == 0:
                    with stub.lock:
                        stub.shed += 1
                    return self._send(503, b'{"error": {"code": "overloaded", "message": "busy"}}',
                                      headers={"Retry-After": "1"})
                if n % 7 == 0:
                    return self._send(500, b'{"error": {"code": "internal", "message": "boom"}}')
                if n % 11 == 0:
                    return self._send(429, b'{"error": {"code": "slow_down", "message": "no hint"}}')
                with stub.lock:
                    stub.served += 1
                self._send(200, self._results())

            def do_GET(self):
                p = self.path
                if p == "/healthz":
                    return self._send(200, b'{"status": "ok"}')
                if p == "/":
                    return self._send(200, b"<html>imgsearch</html>", "text/html")
                if re.fullmatch(r"/v1/images/\d+/thumb", p):
                    return self._send(200, THUMB, "image/jpeg")
                if re.match(r"/v1/images/\d+/similar", p):
                    return self._send(200, self._results())
                if p == "/metrics":
                    with stub.lock:
                        s = stub.served
                    text = "".join(
                        f'imgsearch_stage_duration_seconds_sum{{stage="{st}"}} {s * sec}\n'
                        f'imgsearch_stage_duration_seconds_count{{stage="{st}"}} {s}\n'
                        for st, sec in (("decode", 0.002), ("infer", 0.010), ("search", 0.001)))
                    text += f'imgsearch_inflight_requests 1.0\nimgsearch_shed_total{{reason="inflight"}} {stub.shed}\n'
                    return self._send(200, text.encode(), "text/plain")
                if p == "/triton-metrics":
                    with stub.lock:
                        s = stub.served
                    lab = '{model="resnet152",version="1"}'
                    text = (f"nv_inference_request_success{lab} {s}\nnv_inference_count{lab} {s}\n"
                            f"nv_inference_exec_count{lab} {s / 2}\nnv_inference_queue_duration_us{lab} {s * 500}\n"
                            f"nv_inference_compute_infer_duration_us{lab} {s * 8000}\n")
                    return self._send(200, text.encode(), "text/plain")
                self._send(404, b'{"error": {"code": "not_found", "message": "?"}}')

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_classify_shed_needs_retry_after():
    assert classify(503, {"Retry-After": "1"}) == "shed"
    assert classify(429, {"Retry-After": "2"}) == "shed"
    assert classify(503, {}) == "fail"
    assert classify(500, {"Retry-After": "1"}) == "fail"
    assert classify(200, {}) == "ok"
    assert classify(404, {}) == "fail"


def test_multipart_body_is_one_file_field():
    body, ctype = multipart_body("a.jpg", b"\xff\xd8data", "image/jpeg")
    boundary = ctype.split("boundary=")[1]
    assert body.startswith(f"--{boundary}\r\n".encode()) and body.endswith(f"--{boundary}--\r\n".encode())
    assert b'name="file"; filename="a.jpg"' in body and b"\xff\xd8data" in body


@pytest.fixture(scope="module")
def stub_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lt")
    images = root / "images"
    make_dataset(images, classes=3, per_class=3)
    out = root / "out"
    with StubGateway() as stub:
        rc = main(["loadtest", "--host", stub.url, "--users", "4", "--spawn-rate", "4", "--run-time", "5s",
                   "--images", str(images), "--out", str(out), "--triton-metrics", stub.url + "/triton-metrics",
                   "--max-failure-ratio", "0.5"])
    return rc, out, stub


def test_run_writes_csvs_report_and_plots(stub_run):
    rc, out, stub = stub_run
    assert rc == 0, (out / "locust.log").read_text() if (out / "locust.log").exists() else "no log"
    for name in ("locust_stats.csv", "locust_stats_history.csv", "locust.html", "report.html", "summary.json",
                 "requests.csv", "metrics.jsonl", "run.json", "latency.png", "throughput.png", "outcomes.png",
                 "triton.png", "stages.png"):
        assert (out / name).stat().st_size > 0, name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stub.bad_bodies == 0  # every search carried a JPEG in the multipart 'file' field


def test_shed_is_its_own_row_not_a_failure(stub_run):
    _, out, stub = stub_run
    rows = {r["Name"]: r for r in csv.DictReader((out / "locust_stats.csv").open())}
    assert "shed:/v1/search" in rows
    assert int(rows["shed:/v1/search"]["Failure Count"]) == 0
    assert int(rows["shed:/v1/search"]["Request Count"]) == stub.shed
    fails = {r["Error"] for r in csv.DictReader((out / "locust_failures.csv").open())}
    assert any("HTTP 500 internal" in e for e in fails), fails
    assert any("429" in e and "without Retry-After" in e for e in fails), fails
    s = json.loads((out / "summary.json").read_text())
    t = s["totals"]
    assert t["shed"] == stub.shed and t["requests"] == t["ok"] + t["shed"] + t["failed"]
    # the request log and Locust's own count agree
    assert s["locust"]["aggregated"]["requests"] == t["requests"]
    outcomes = {(m["outcome"], m["status"]) for m in s["outcome_mix"]}
    assert {("shed", 503), ("fail", 500), ("fail", 429)} <= outcomes


def test_report_reads_the_scraped_metrics(stub_run):
    _, out, _ = stub_run
    s = json.loads((out / "summary.json").read_text())
    assert s["triton"]["avg_batch"] == pytest.approx(2.0, rel=0.05)
    assert s["triton"]["queue_ms"] == pytest.approx(0.5, rel=0.05)
    stage = s["gateway"]["stage_ms"]
    assert stage["decode"] == pytest.approx(2.0, rel=0.01) and stage["infer"] == pytest.approx(10.0, rel=0.01)
    assert s["gateway"]["shed_by_reason"]["inflight"] > 0
    t = s["totals"]
    assert 0 < t["p50_ms"] <= t["p95_ms"] <= t["p99_ms"] <= t["max_ms"]
    html = (out / "report.html").read_text()
    for png in ("latency.png", "throughput.png", "outcomes.png", "triton.png", "stages.png"):
        assert f'src="{png}"' in html


def test_broken_limit_exits_1_with_one_line(stub_run, capsys):
    _, out, _ = stub_run
    capsys.readouterr()
    rc = main(["loadtest", "--report-only", "--out", str(out), "--max-failure-ratio", "0",
               "--slo-p99-ms", "0.0001"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 1 and err[0].startswith("SLO broken:")
    assert "p99" in err[0] and "failure ratio" in err[0]


def test_unreachable_gateway_is_a_run_error(tmp_path, capsys):
    images = tmp_path / "images"
    make_dataset(images, classes=1, per_class=1)
    from imgsearch.triton_server import free_port

    rc = main(["loadtest", "--host", f"http://127.0.0.1:{free_port()}", "--images", str(images),
               "--out", str(tmp_path / "out"), "--run-time", "2s"])
    assert rc == 3
    assert "not reachable" in capsys.readouterr().err
    assert not (tmp_path / "out" / "report.html").exists()


def test_locust_command_loads_shape_only_for_step(tmp_path):
    from imgsearch.loadtest.cli import add_arguments, locust_command

    p = argparse.ArgumentParser()
    add_arguments(p)
    const = locust_command(p.parse_args(["--images", "x"]), Path(tmp_path))
    step = locust_command(p.parse_args(["--images", "x", "--shape", "step", "--users", "6"]), Path(tmp_path))
    assert "shapes.py" not in const[const.index("-f") + 1]
    assert step[step.index("-f") + 1].endswith("shapes.py") and "--headless" in step
    assert "--users" not in const and "--run-time" not in const  # locust.conf supplies them
    # a step run lasts its steps (3 x 20 s), not locust.conf's run-time
    assert step[step.index("--run-time") + 1] == "61s"
    from imgsearch.loadtest.cli import LOCUSTFILE, SCENARIOS

    source = LOCUSTFILE.read_text()
    assert all(f"class {cls}(GatewayUser)" in source for cls in SCENARIOS.values())
    only = locust_command(p.parse_args(["--images", "x", "--only", "search,page"]), Path(tmp_path))
    assert only[-2:] == ["SearchUser", "PageUser"]
    with pytest.raises(ValueError, match="unknown scenario"):
        locust_command(p.parse_args(["--images", "x", "--only", "serch"]), Path(tmp_path))
