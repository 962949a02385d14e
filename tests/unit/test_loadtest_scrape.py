"""The metrics scraper: what it keeps, what it writes, how a dead endpoint shows up."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from imgsearch.loadtest.scrape import Scraper, load_scrapes, select_samples
from imgsearch.triton_server import free_port

TRITON_PAGE = """# HELP nv_inference_count Number of inferences performed
# TYPE nv_inference_count counter
nv_inference_count{model="resnet152",version="1"} 40
nv_inference_exec_count{model="resnet152",version="1"} 10
nv_gpu_utilization{gpu_uuid="GPU-1"} 0.5
nv_inference_request_duration_us_bucket{model="resnet152",le="100"} 3
process_cpu_seconds_total 12.5
"""

GATEWAY_PAGE = """imgsearch_inflight_requests 2.0
imgsearch_stage_duration_seconds_sum{stage="decode"} 1.5
imgsearch_stage_duration_seconds_bucket{stage="decode",le="0.01"} 3.0
imgsearch_stage_duration_seconds_created{stage="decode"} 1.7e9
python_gc_objects_collected_total{generation="0"} 9.0
"""


def test_select_samples_keeps_the_report_families_only():
    tri = select_samples(TRITON_PAGE, ("nv_inference_", "nv_gpu_"))
    assert [s[0] for s in tri] == ["nv_gpu_utilization", "nv_inference_count", "nv_inference_exec_count"]
    assert tri[1] == ["nv_inference_count", {"model": "resnet152", "version": "1"}, 40.0]
    gw = select_samples(GATEWAY_PAGE, ("imgsearch_",))
    # an unlabelled gauge is kept; histogram buckets and _created are not
    assert gw == [["imgsearch_inflight_requests", {}, 2.0],
                  ["imgsearch_stage_duration_seconds_sum", {"stage": "decode"}, 1.5]]


class CountingMetrics:
    def __init__(self) -> None:
        self.hits = 0
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                outer.hits += 1
                body = f'nv_inference_count{{model="m"}} {outer.hits * 4}\n'.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_scraper_writes_one_line_per_target_and_tick(tmp_path):
    live = CountingMetrics()
    dead = f"http://127.0.0.1:{free_port()}/metrics"
    path = tmp_path / "m.jsonl"
    sc = Scraper({"triton": live.url, "gateway": dead, "skipped": ""}, path, interval_s=0.25, timeout_s=1)
    sc.start()
    time.sleep(1.1)
    sc.stop()
    live.server.shutdown()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert {x["target"] for x in lines} == {"triton", "gateway"}  # an empty URL is not scraped
    tri = [x for x in lines if x["target"] == "triton"]
    gw = [x for x in lines if x["target"] == "gateway"]
    assert len(tri) >= 4 and len(tri) == len(gw)  # every tick + the final scrape at stop
    assert all(x["ok"] for x in tri) and not any(x["ok"] for x in gw)
    assert gw[0]["error"] and sc.failed["gateway"] == len(gw) and sc.ok["triton"] == len(tri)
    loaded = load_scrapes(path)
    values = [s.value("nv_inference_count", model="m") for s in loaded["triton"]]
    assert values == sorted(values) and values[0] > 0
    assert [s.t for s in loaded["triton"]] == sorted(s.t for s in loaded["triton"])


def test_load_scrapes_skips_a_torn_last_line(tmp_path):
    p = tmp_path / "m.jsonl"
    good = {"t": 1.0, "target": "triton", "ok": True, "samples": [["nv_inference_count", {"model": "m"}, 3.0]]}
    p.write_text(json.dumps(good) + "\n" + '{"t": 2.0, "target": "tri')
    got = load_scrapes(p)
    assert len(got["triton"]) == 1 and got["triton"][0].value("nv_inference_count") == 3.0
    assert load_scrapes(tmp_path / "absent.jsonl") == {}
