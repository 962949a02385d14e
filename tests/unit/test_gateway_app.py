"""App wiring without backends (Starlette's TestClient, lifespan not run): CORS, the last-resort 500."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from imgsearch.errors import ModelRepositoryError
from imgsearch.gateway.app import create_app
from imgsearch.settings import Settings


def make(**kw) -> TestClient:
    return TestClient(create_app(Settings(triton_url="127.0.0.1:1", _env_file=None, **kw)),
                      raise_server_exceptions=False)


def test_cors_is_off_by_default_and_on_for_configured_origins(settings_env):
    pre = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    off = make().options("/v1/search", headers=pre)
    assert "access-control-allow-origin" not in off.headers
    on = make(cors_origins=["https://app.example"])
    r = on.options("/v1/search", headers=pre)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    other = on.options("/v1/search", headers={**pre, "Origin": "https://evil.example"})
    assert other.headers.get("access-control-allow-origin") != "https://evil.example"


def test_a_bug_is_a_json_500_with_the_security_headers_and_counted(settings_env):
    client = make()

    @client.app.get("/boom")
    async def boom():
        raise RuntimeError("secret internals")

    r = client.get("/boom")
    assert r.status_code == 500
    assert r.json() == {"error": {"code": "internal", "message": "internal error"}}
    assert r.headers["x-content-type-options"] == "nosniff"
    text = client.app.state.metrics.render().decode()
    assert 'imgsearch_errors_total{code="internal"} 1.0' in text
    assert 'imgsearch_requests_total{route="/boom",status="500"} 1.0' in text


def test_the_app_needs_a_triton_url_unless_given_an_encoder(settings_env):
    with pytest.raises(ModelRepositoryError, match="IMGSEARCH_TRITON_URL"):
        create_app(Settings(_env_file=None))
    assert create_app(Settings(_env_file=None), encoder=object()) is not None


def test_static_paths_with_a_nul_byte_are_404(settings_env):
    client = make()
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/%00x").status_code == 404
    assert client.get("/static/../gateway/app.py").status_code == 404
