"""The Prometheus text parser that the benches, the flood figures and the load-test scrape share."""

from __future__ import annotations

from imgsearch.triton_metrics import ModelStats, metric_sum, model_stats, parse_prometheus, stats_since

TEXT = """# HELP imgsearch_requests_total Requests.
# TYPE imgsearch_requests_total counter
imgsearch_requests_total{route="/v1/images/{id}",status="200"} 4.0
imgsearch_requests_total{route="/v1/search",status="200"} 2.0
imgsearch_requests_total{route="/v1/search",status="503"} 1.0
imgsearch_inflight_requests 3.0
odd{path="a\\"b}c"} 7
nv_inference_count{model="resnet152",version="1"} 96 1700000000000
nv_inference_exec_count{model="resnet152",version="1"} 12
nv_inference_count{model="other",version="1"} 5
nv_gpu_utilization{gpu_uuid="GPU-1"} NaN
"""


def test_label_values_with_braces_and_escaped_quotes_are_read():
    samples = parse_prometheus(TEXT)
    assert samples[("imgsearch_requests_total", frozenset({("route", "/v1/images/{id}"), ("status", "200")}))] == 4.0
    assert samples[("odd", frozenset({("path", 'a\\"b}c')}))] == 7.0
    assert samples[("imgsearch_inflight_requests", frozenset())] == 3.0
    assert len(samples) == 9  # comments skipped, NaN kept as a float


def test_metric_sum_adds_the_samples_whose_labels_match():
    assert metric_sum(TEXT, "imgsearch_requests_total") == 7.0
    assert metric_sum(TEXT, "imgsearch_requests_total", status="200") == 6.0
    assert metric_sum(TEXT, "imgsearch_requests_total", route="/v1/images/{id}") == 4.0
    assert metric_sum(TEXT, "imgsearch_requests_total", route="/nowhere") == 0.0


def test_model_stats_takes_one_model_and_a_timestamp_in_its_stride():
    s = model_stats(TEXT, "resnet152")
    assert (s.inferences, s.executions, s.avg_batch) == (96.0, 12.0, 8.0)


def _serve_counts(counts: list[int]):
    """A loopback /metrics whose success counter for resnet152 steps through ``counts``."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            n = counts.pop(0) if len(counts) > 1 else counts[0]
            body = f'nv_inference_request_success{{model="resnet152",version="1"}} {n}\n'.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/metrics"


def test_stats_since_waits_for_requests_that_triton_counts_after_answering():
    server, url = _serve_counts([5, 5, 5, 7])
    try:
        before = ModelStats(requests=5)
        assert stats_since(url, "resnet152", before, requests=2).requests == 2
    finally:
        server.shutdown()


def test_stats_since_gives_the_change_so_far_at_its_timeout():
    server, url = _serve_counts([5, 6])
    try:
        delta = stats_since(url, "resnet152", ModelStats(requests=5), requests=3, timeout=0.2)
        assert delta.requests == 1
    finally:
        server.shutdown()
