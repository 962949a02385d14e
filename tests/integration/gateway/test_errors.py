"""Every documented error status over real HTTP, its JSON shape, and the headers on every answer."""

from __future__ import annotations

import io
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image

from harness.data import bomb_png, jpeg_bytes, shape_image, truncated_jpeg
from harness.gateway import MAX_UPLOAD
from imgsearch.gateway.memory import memory_budget
from imgsearch.settings import Settings
from imgsearch.triton_metrics import metric_sum

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(gw):
    with httpx.Client(base_url=gw.url, timeout=60) as c:
        yield c


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code:
        assert body["error"]["code"] == code, body
    if status in (429, 503):
        assert int(r.headers["retry-after"]) >= 1
    return body


def upload(client, data: bytes, name: str = "q.jpg", ctype: str = "image/jpeg", **params):
    return client.post("/v1/search", params=params, files={"file": (name, data, ctype)})


def tiff_bytes() -> bytes:
    buf = io.BytesIO()
    shape_image(1, 1).save(buf, "TIFF")
    return buf.getvalue()


NOT_IMAGES = {
    "text": b"just some text, MARKER-7f3a9 not an image\n",
    "html": b"<!doctype html><html><body><script>alert(1)</script></body></html>",
    "svg": b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
           b'<rect width="10" height="10"/></svg>',
    "pdf": b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n",
    "tiff": None,  # made at run time
}


@pytest.mark.parametrize("kind", sorted(NOT_IMAGES))
def test_415_for_content_that_is_not_an_allowed_image(client, kind):
    data = NOT_IMAGES[kind] if NOT_IMAGES[kind] is not None else tiff_bytes()
    # named and typed as a JPEG: only the content counts
    assert_error(upload(client, data, "photo.jpg", "image/jpeg"), 415, "unsupported_media_type")


def test_content_decides_not_the_name_or_the_declared_type(gw, client):
    data = gw.image(sorted(gw.ids)[0])
    r = upload(client, data, "../../etc/passwd.txt", "text/plain", top_k=1)
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["score"] >= 0.99


def test_415_for_a_body_that_is_not_multipart(client):
    r = client.post("/v1/search", content=jpeg_bytes(shape_image(0, 1)), headers={"content-type": "image/jpeg"})
    assert_error(r, 415, "unsupported_content_type")


@pytest.mark.parametrize("case", ["truncated", "bomb", "empty", "one_pixel_ok"])
def test_422_for_undecodable_and_bombs(client, case):
    if case == "one_pixel_ok":  # 1x1 is odd but valid: it must be served, not refused
        buf = io.BytesIO()
        Image.new("RGB", (1, 1), (200, 10, 10)).save(buf, "PNG")
        assert upload(client, buf.getvalue(), ctype="image/png").status_code == 200
        return
    data = {"truncated": truncated_jpeg(), "bomb": bomb_png(10000, 10000), "empty": b""}[case]
    code = {"truncated": "undecodable_image", "bomb": "image_too_large", "empty": "undecodable_image"}[case]
    assert_error(upload(client, data), 422, code)


def test_422_for_missing_file_and_bad_parameters(client):
    assert_error(client.post("/v1/search", files={"label": (None, "x")}), 422, "missing_file")
    assert_error(client.post("/v1/search"), 422, "missing_file")
    data = jpeg_bytes(shape_image(2, 3))
    for params in ({"top_k": 0}, {"top_k": 101}, {"top_k": "ten"}, {"min_score": 2}, {"min_score": "nan"}):
        assert_error(upload(client, data, **params), 422, "invalid_request")
    r = client.post("/v1/search", data={"top_k": "500"}, files={"file": ("q.jpg", data, "image/jpeg")})
    assert_error(r, 422, "invalid_request")
    assert_error(client.get("/v1/images/not-a-number"), 422, "invalid_request")
    assert_error(client.get("/v1/images/-5/thumb"), 422, "invalid_request")


def test_404_for_unknown_ids_and_routes(client):
    assert_error(client.get("/v1/images/987654321"), 404, "not_found")
    assert_error(client.get("/v1/images/987654321/thumb"), 404, "not_found")
    assert_error(client.get("/nope"), 404, "not_found")


def test_413_when_the_declared_length_is_over_the_limit(client):
    big = b"\xff\xd8\xff" + b"\0" * (MAX_UPLOAD + 100_000)
    assert_error(upload(client, big), 413, "payload_too_large")


def test_413_for_a_chunked_body_without_length(client):
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"q.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()

    def body():  # a generator: httpx sends it chunked, no Content-Length
        yield head + b"\xff\xd8\xff"
        for _ in range(MAX_UPLOAD // 16384 + 4):
            yield b"\0" * 16384
        yield f"\r\n--{boundary}--\r\n".encode()

    r = client.post("/v1/search", content=body(), headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert_error(r, 413, "payload_too_large")


def test_413_is_decided_while_reading_not_after_buffering(gw):
    """A chunked upload that claims to go on for ever: the answer comes before the body ends."""
    u = urlsplit(gw.url)
    boundary = "xyz"
    with socket.create_connection((u.hostname, u.port), timeout=20) as s:
        s.sendall((f"POST /v1/search HTTP/1.1\r\nHost: {u.netloc}\r\nTransfer-Encoding: chunked\r\n"
                   f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode())

        def chunk(b: bytes) -> None:
            s.sendall(f"{len(b):x}\r\n".encode() + b + b"\r\n")

        chunk(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n\r\n".encode())
        sent = 0
        while sent <= MAX_UPLOAD + 65536:  # just past the limit, then stop sending (no final chunk)
            chunk(b"\xab" * 32768)
            sent += 32768
        start = time.monotonic()
        s.settimeout(15)
        reply = b""
        while b"}}" not in reply:  # the JSON body ends with }}
            got = s.recv(65536)
            if not got:
                break
            reply += got
        assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
        assert time.monotonic() - start < 15
        assert b'"payload_too_large"' in reply


def test_security_headers_on_every_kind_of_answer(gw, client):
    jpeg = jpeg_bytes(shape_image(0, 0))
    answers = [client.get("/"), client.get("/healthz"), client.get("/nope"), client.get("/static/app.js"),
               upload(client, b"text"), upload(client, jpeg), client.get("/openapi.json")]
    for r in answers:
        h = r.headers
        assert "default-src 'self'" in h["content-security-policy"], r.url
        assert "frame-ancestors 'none'" in h["content-security-policy"]
        assert h["x-content-type-options"] == "nosniff"
        assert h["x-frame-options"] == "DENY"
        assert h["referrer-policy"] == "no-referrer"
        assert "access-control-allow-origin" not in h  # CORS is off unless configured
    csp = answers[0].headers["content-security-policy"]
    assert "http" not in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
    pre = client.options("/v1/search", headers={"Origin": "https://evil.example",
                                                 "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in pre.headers


def test_page_loads_only_same_origin_assets(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "untrained demo weights: results show the plumbing, not quality" in html
    assert 'id="banner"' in html and 'id="banner" class="banner" role="note" hidden' not in html
    assert "//" not in html.split("<body")[1].replace("http://www.w3.org", "")  # no absolute URLs in the body
    for asset in ("/static/app.js", "/static/style.css"):
        assert asset in html and client.get(asset).status_code == 200


def test_openapi_documents_every_error_status(client):
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    want = {
        ("post", "/v1/search"): {"200", "413", "415", "422", "503"},
        ("get", "/v1/images/{id}/similar"): {"200", "404", "422", "503"},
        ("get", "/v1/images/{id}"): {"200", "403", "404", "422", "503"},
        ("get", "/v1/images/{id}/thumb"): {"200", "403", "404", "422", "503"},
        ("post", "/v1/images"): {"201", "200", "401", "403", "413", "415", "422", "503"},
        ("delete", "/v1/images/{id}"): {"200", "401", "403", "404", "422", "503"},
        ("get", "/readyz"): {"200", "503"},
    }
    for (method, path), statuses in want.items():
        got = paths[path][method]["responses"]
        assert statuses <= set(got), (method, path, sorted(got))
        if "503" in got:
            assert "Retry-After" in got["503"]["headers"]
        for s in statuses - {"200", "201"}:
            schema = got[s]["content"]["application/json"]["schema"]
            assert schema["$ref"].endswith(("/ErrorBody", "/NotReady")), (path, s, schema)
    body = paths["/v1/search"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["required"] == ["file"] and body["properties"]["file"]["format"] == "binary"
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in docs.text
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200


def test_metrics_names_and_counts(gw, client, settings_env):
    upload(client, b"not an image at all")
    upload(client, gw.image(sorted(gw.ids)[0]))
    client.get("/v1/images/987654321")
    text = client.get("/metrics").text
    for name in ("imgsearch_request_duration_seconds_bucket", "imgsearch_stage_duration_seconds_bucket",
                 "imgsearch_inflight_requests", "imgsearch_requests_total", "imgsearch_errors_total",
                 "# TYPE imgsearch_shed_total counter"):
        assert name in text, name
    for stage in ("decode", "infer", "search"):
        assert f'imgsearch_stage_duration_seconds_count{{stage="{stage}"}}' in text
    assert 'imgsearch_errors_total{code="unsupported_media_type"}' in text
    assert 'imgsearch_requests_total{route="/v1/search",status="415"}' in text
    assert 'imgsearch_requests_total{route="/v1/images/{id}",status="404"}' in text  # templates, not raw ids
    assert "987654321" not in text
    # what its settings let it hold, for a dashboard to set beside the container's limit
    for k, v in gw.env.items():
        settings_env.setenv(k, v)
    budget = memory_budget(Settings(_env_file=None))
    assert metric_sum(text, "imgsearch_memory_budget_bytes") == budget.total


def test_logs_never_hold_upload_bytes(gw, client):
    upload(client, NOT_IMAGES["text"], "MARKER-name.jpg")
    upload(client, b"\xff\xd8\xff" + b"MARKER-7f3a9" * 10)
    time.sleep(0.2)
    log = gw.gw.log_text()
    assert "MARKER-7f3a9" not in log
