"""schemathesis against the live /openapi.json: no 5xx, no undocumented status, bodies match the schema."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

pytestmark = pytest.mark.integration

CHECKS = ",".join([
    "not_a_server_error",           # zero 5xx
    "status_code_conformance",      # every status the API returns is documented
    "content_type_conformance",
    "response_headers_conformance",  # e.g. Retry-After on 503
    "response_schema_conformance",  # bodies match the models (errors included)
    "ignored_auth",                 # write endpoints really refuse requests without the key
])


def st_command() -> list[str]:
    exe = Path(sys.executable).parent / "st"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("st")
    if found:
        return [found]
    return [sys.executable, "-m", "schemathesis.cli"]


def test_schemathesis_finds_no_server_errors_and_no_undocumented_status(gw, tmp_path):
    cmd = st_command() + [
        "run", f"{gw.url}/openapi.json", "--experimental", "openapi-3.1", "--checks", CHECKS,
        "--hypothesis-max-examples", "25", "--hypothesis-derandomize", "--hypothesis-deadline", "None",
        "--request-timeout", "30000", "--workers", "2", "--no-color", "--show-trace",
        "--generation-allow-x00", "false", "--data-generation-method", "all",  # valid and invalid inputs
        "--cassette-path", str(tmp_path / "cassette.yaml"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420,
                          env={"SCHEMATHESIS_HOOKS": "st_hooks", "PYTHONPATH": str(Path(__file__).parent),
                               "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    # the run really exercised the API: every route, many cases
    m = re.search(r"not_a_server_error\s+(\d+) / (\d+) passed", out)
    assert m and int(m.group(1)) == int(m.group(2)) >= 100, out[-3000:]
    # which routes were called is read from the cassette (every request sent), not from the
    # console, which names a route only when it printed a warning about it
    import yaml

    calls = {(i["request"]["method"].upper(), urlsplit(i["request"]["uri"]).path)
             for i in yaml.safe_load((tmp_path / "cassette.yaml").read_text())["http_interactions"]}
    for method, pattern in (("POST", r"/v1/search"), ("GET", r"/v1/images/[^/]+/similar"),
                            ("POST", r"/v1/images"), ("DELETE", r"/v1/images/[^/]+")):
        assert any(m == method and re.fullmatch(pattern, path) for m, path in calls), (method, pattern, sorted(calls)[:20])
