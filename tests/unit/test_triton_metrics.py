"""The Prometheus text parser that the benches, the flood figures and the load-test scrape share."""

from __future__ import annotations

from imgsearch.triton_metrics import metric_sum, model_stats, parse_prometheus

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
