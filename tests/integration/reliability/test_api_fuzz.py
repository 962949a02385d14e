"""schemathesis against the live /openapi.json: no 5xx, and nothing the schema does not promise.

Every operation gets generated requests, valid ones and deliberately invalid ones (wrong
types, out-of-range values, missing fields, bodies that are not multipart). The checks:
no server error, every status documented for the operation, the body matching the
documented schema and content type, the documented headers (Retry-After on 503) present.
The write endpoints are called with the right key, so they are fuzzed past the key check.

Requests that are not HTTP at all (control characters in a header field) never reach the
app: uvicorn's parser answers them with a plain-text 400. Generated headers of that kind
are dropped from the cases here, and one such request is sent on purpose in
test_invalid_http_is_refused_by_the_server_and_it_stays_up.
"""

from __future__ import annotations

import re
import socket

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import DataGenerationMethod
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.integration

# FastAPI writes OpenAPI 3.1; schemathesis 3.x reads it behind this switch
schemathesis.experimental.OPEN_API_3_1.enable()

CHECKS = (not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance)


@pytest.fixture
def api_schema(main_gw):
    return schemathesis.from_uri(
        main_gw.url + "/openapi.json", base_url=main_gw.url,
        data_generation_methods=[DataGenerationMethod.positive, DataGenerationMethod.negative])


schema = schemathesis.from_pytest_fixture("api_schema")

TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 field-name
FIELD_VALUE = re.compile(r"^[\t\x20-\x7e\x80-\xff]*$")  # no control characters


def valid_http_headers(headers: dict[str, str] | None) -> dict[str, str] | None:
    if headers is None:
        return None
    return {k: v for k, v in headers.items() if TOKEN.match(k) and FIELD_VALUE.match(v)}


@schema.parametrize()
@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_every_operation_answers_only_what_it_documents(case, api_key):
    case.headers = valid_http_headers(case.headers)
    case.call_and_validate(checks=CHECKS, headers={"Authorization": f"Bearer {api_key}"}, timeout=60)


def test_invalid_http_is_refused_by_the_server_and_it_stays_up(main_gw):
    host, port = main_gw.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"DELETE /v1/images/1 HTTP/1.1\r\nHost: x\r\nX-Bad: a\x1fb\r\n\r\n")
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:100]
    assert httpx.get(main_gw.url + "/healthz", trust_env=False).status_code == 200
