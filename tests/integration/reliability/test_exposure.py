"""What the public sees when a backend fails, and who may read /metrics: the real gateway over
the session Triton and a Milvus server (milvus-lite's server mode) that is killed."""

from __future__ import annotations

import httpx
import pytest

from harness.data import jpeg_bytes, make_dataset, shape_image
from harness.stack import MilvusServer, gateway_env, index_images, start_gateway

pytestmark = pytest.mark.integration
TOKEN = "metrics-token-0123456789"


def test_errors_and_readyz_keep_addresses_and_backend_text_in_the_log(tmp_path, triton, repo18):
    root = tmp_path / "images"
    make_dataset(root, classes=2, per_class=2, seed=61)
    milvus = MilvusServer(tmp_path / "milvus-data", log_path=tmp_path / "milvus.log").start()
    gw = None
    try:
        index_images(root, milvus.uri, triton.grpc_url, repo18)
        gw = start_gateway(gateway_env(repo18, triton.grpc_url, milvus.uri, root, metrics_token=TOKEN,
                                       milvus_timeout_s=3), log_level="warning", log_path=tmp_path / "gw.log")
        with httpx.Client(base_url=gw.url, timeout=60) as c:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                r = c.get("/metrics", headers=headers)
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", headers
            r = c.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 200 and "imgsearch_requests_total" in r.text

            milvus.kill()
            data = jpeg_bytes(shape_image(1, 6100))
            r = c.post("/v1/search", files={"file": ("q.jpg", data, "image/jpeg")})
            ready = c.get("/readyz")
        secrets = ("127.0.0.1", f":{milvus.port}", "Exception", "grpc", "Fail", "http://")
        for resp in (r, ready):
            assert resp.status_code == 503, resp.text
            leaked = [s for s in secrets if s in resp.text]
            assert not leaked, (leaked, resp.text)
        assert r.json()["error"]["code"] == "milvus_unavailable" and "Milvus" in r.json()["error"]["message"]
        assert ready.json()["checks"]["milvus"] is False and "milvus" in ready.json()["detail"]
        assert milvus.uri in gw.log_text()  # the operator still has the whole story
    finally:
        if gw is not None:
            gw.stop()
        milvus.stop()


def test_readyz_with_triton_unreachable_names_no_address(tmp_path, repo18):
    """The Triton side of the same rule: its check's detail (model, address) goes to the log only."""
    from imgsearch.triton_server import free_port

    url = f"127.0.0.1:{free_port()}"  # nothing listens there: connections are refused
    gw = start_gateway(gateway_env(repo18, url, tmp_path / "empty.db", tmp_path), log_level="warning",
                       log_path=tmp_path / "gw.log")
    try:
        with httpx.Client(base_url=gw.url, timeout=60) as c:
            ready = c.get("/readyz")
    finally:
        gw.stop()
    assert ready.status_code == 503 and ready.json()["checks"]["triton"] is False, ready.text
    leaked = [s for s in (url, url.split(":")[1], "127.0.0.1", "grpc", "refused") if s in ready.text]
    assert not leaked, (leaked, ready.text)
    assert ready.json()["detail"]["triton"] == "Triton (the model server) is not ready"
    assert url in gw.log_text()  # the operator's side keeps the address
