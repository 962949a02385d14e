"""Security: the API key, image serving that never leaves the root, CORS and page headers,
pinned dependencies past known advisories, and Triton without remote model control.

(Query images never stored and logs free of upload bytes: test_hostile_input.py.)
"""

from __future__ import annotations

import ast
import re
import socket
import tomllib
from importlib.metadata import version
from pathlib import Path

import httpx
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from harness.data import jpeg_bytes, shape_image
from harness.deps import read_export

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[3]
CORS_ORIGIN = "https://ok.example"
# fixed versions: python-multipart 0.0.18 (CVE-2024-53981, DoS by boundary/preamble bytes);
# Starlette 0.47.2 (CVE-2025-54121, event loop blocked by large multipart files) and
# 0.49.1 (CVE-2025-62727, quadratic Range header parsing in FileResponse)
FIXED = {"python-multipart": Version("0.0.18"), "starlette": Version("0.49.1")}


def client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=30, trust_env=False)


def raw_get(url: str, path: str) -> tuple[int, bytes]:
    """GET ``path`` byte for byte (no client-side normalisation of dots or escapes)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


# --- API key ----------------------------------------------------------------------------------

def test_writes_are_disabled_without_a_configured_key(sec_gw):
    with client(sec_gw.url) as c:
        files = {"file": ("a.jpg", jpeg_bytes(shape_image(0, 1)), "image/jpeg")}
        for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "Bearer anything"}):
            r = c.post("/v1/images", data={"label": "x"}, files=files, headers=headers)
            assert r.status_code == 403 and r.json()["error"]["code"] == "writes_disabled", r.text
            r = c.delete(f"/v1/images/{sec_gw.ids['inside']}", headers=headers)
            assert r.status_code == 403 and r.json()["error"]["code"] == "writes_disabled", r.text
        assert c.get(f"/v1/images/{sec_gw.ids['inside']}").status_code == 200  # nothing was deleted


def test_wrong_or_missing_key_is_401_and_the_right_key_works(main_gw, api_key):
    img = jpeg_bytes(shape_image(3, 31337))
    wrong = [None, "Bearer", f"Bearer {api_key[:-1]}", f"Bearer {api_key}x", f"Bearer {api_key.upper()}",
             f"Bearer {'x' * len(api_key)}", api_key]
    with client(main_gw.url) as c:
        for auth in wrong:
            headers = {} if auth is None else {"Authorization": auth}
            r = c.post("/v1/images", data={"label": "sec"}, files={"file": ("a.jpg", img, "image/jpeg")},
                       headers=headers)
            assert r.status_code == 401, (auth, r.text)
            assert r.json()["error"]["code"] == "unauthorized" and r.headers["www-authenticate"] == "Bearer"
            assert c.delete("/v1/images/1", headers=headers).status_code == 401
        # the key under another scheme is not a bearer token
        r = c.delete("/v1/images/1", headers={"Authorization": f"Basic {api_key}"})
        assert r.status_code == 401
        auth = {"Authorization": f"Bearer {api_key}"}
        r = c.post("/v1/images", data={"label": "sec"}, files={"file": ("a.jpg", img, "image/jpeg")}, headers=auth)
        assert r.status_code in (200, 201), r.text
        id_ = r.json()["id"]
        assert c.delete(f"/v1/images/{id_}", headers=auth).status_code == 200


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Attribute) and f.attr == name) or (isinstance(f, ast.Name) and f.id == name):
                out.append(node)
    return out


def test_the_key_is_compared_in_constant_time():
    """Source check: hmac/secrets.compare_digest, and no ==/!= on anything holding the key."""
    src = (REPO_ROOT / "gateway" / "security.py").read_text()
    tree = ast.parse(src)
    funcs = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    # check_api_key (and the /metrics token) compare through check_bearer
    assert _calls(funcs["check_api_key"], "check_bearer"), "check_api_key must compare through check_bearer"
    fn = funcs["check_bearer"]
    digests = _calls(fn, "compare_digest")
    assert digests, "check_bearer must use hmac.compare_digest / secrets.compare_digest"
    for call in digests:
        assert isinstance(call.func, ast.Attribute) and isinstance(call.func.value, ast.Name)
        assert call.func.value.id in ("hmac", "secrets"), ast.unparse(call)
    secretish = re.compile(r"key|given|expected|token|secret|credential", re.I)
    for node in ast.walk(fn):
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
            sides = [node.left, *node.comparators]
            if any(isinstance(s, ast.Constant) for s in sides):
                continue  # against a literal ("bearer", ""): leaks nothing about the key
            assert not any(secretish.search(ast.unparse(s)) for s in sides), \
                f"non-constant-time compare: {ast.unparse(node)}"


# --- image serving ----------------------------------------------------------------------------

@pytest.mark.parametrize("entry,status", [("dir_symlink", 403), ("loop", 403), ("dotdot", 403),
                                          ("absolute", 403), ("backslash", 403), ("encoded", 404)])
def test_indexed_paths_that_leave_the_root_are_refused(sec_gw, entry, status):
    with client(sec_gw.url) as c:
        for route in (f"/v1/images/{sec_gw.ids[entry]}", f"/v1/images/{sec_gw.ids[entry]}/thumb"):
            r = c.get(route)
            assert r.status_code == status, (route, r.status_code, r.text[:200])
            assert r.json()["error"]["code"] in ("forbidden_path", "not_found")
            assert sec_gw.secret not in r.content
        ok = c.get(f"/v1/images/{sec_gw.ids['inside']}")  # the route itself works
        assert ok.status_code == 200 and ok.content == sec_gw.inside


TRAVERSALS = [
    "/v1/images/../../../../etc/passwd", "/v1/images/..%2f..%2f..%2fetc%2fpasswd",
    "/v1/images/%2e%2e/%2e%2e/etc/passwd", "/v1/images/1/../../../pyproject.toml",
    "/static/../../pyproject.toml", "/static/..%2f..%2fpyproject.toml", "/static/%2e%2e/%2e%2e/pyproject.toml",
    "/static//etc/passwd", "/static/..\\..\\pyproject.toml", "/docs-assets/../../../pyproject.toml",
    "/docs-assets/..%2f..%2f..%2fpyproject.toml", "//etc/passwd", "/static/%00../pyproject.toml",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_no_route_serves_files_from_outside_its_folder(sec_gw, path):
    status, body = raw_get(sec_gw.url, path)
    assert status < 500, (path, status)
    assert b"[build-system]" not in body and b"root:x:0:0" not in body and sec_gw.secret not in body, path


# --- browser side -----------------------------------------------------------------------------

def _assert_page_headers(h: httpx.Headers) -> None:
    csp = h["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, csp
    assert h["x-content-type-options"] == "nosniff"


def test_cors_is_off_unless_configured(main_gw):
    with client(main_gw.url) as c:
        for origin in (CORS_ORIGIN, "https://evil.example", "null"):
            r = c.get("/healthz", headers={"Origin": origin})
            assert "access-control-allow-origin" not in r.headers
            pre = c.options("/v1/search", headers={"Origin": origin, "Access-Control-Request-Method": "POST"})
            assert "access-control-allow-origin" not in pre.headers
            assert "access-control-allow-methods" not in pre.headers
        _assert_page_headers(c.get("/").headers)


def test_cors_allows_only_the_configured_origin(sec_gw):
    with client(sec_gw.url) as c:
        r = c.get("/healthz", headers={"Origin": CORS_ORIGIN})
        assert r.headers["access-control-allow-origin"] == CORS_ORIGIN  # that origin, never "*"
        assert "access-control-allow-credentials" not in r.headers
        pre = c.options("/v1/search", headers={"Origin": CORS_ORIGIN, "Access-Control-Request-Method": "POST"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == CORS_ORIGIN
        for evil in ("https://evil.example", "https://ok.example.evil.example", "http://ok.example", "null"):
            r = c.get("/healthz", headers={"Origin": evil})
            assert "access-control-allow-origin" not in r.headers, evil
            pre = c.options("/v1/search", headers={"Origin": evil, "Access-Control-Request-Method": "POST"})
            assert "access-control-allow-origin" not in pre.headers, evil
        # the headers hold on every kind of answer, CORS or not
        for r in (c.get("/"), c.get("/docs"), c.get("/nope"), c.get("/healthz", headers={"Origin": CORS_ORIGIN})):
            _assert_page_headers(r.headers)


# --- dependencies and shipped configs -------------------------------------------------------------

@pytest.mark.parametrize("dist", sorted(FIXED))
def test_installed_and_pinned_versions_are_past_the_fixed_advisories(dist):
    assert Version(version(dist)) >= FIXED[dist], f"installed {dist} {version(dist)}"
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    reqs = [Requirement(d) for d in deps if Requirement(d).name == dist]
    assert reqs, f"pyproject.toml does not pin {dist}"
    for req in reqs:
        floor = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
        assert floor and max(floor) >= FIXED[dist], f"pyproject.toml: {req} allows a vulnerable {dist}"
    # the lock, and the gateway image's export of it, install exact versions
    lock = tomllib.loads((REPO_ROOT / "uv.lock").read_text())
    locked = [Version(p["version"]) for p in lock["package"] if p["name"] == dist]
    assert locked and locked[0] >= FIXED[dist], f"uv.lock: {dist} {locked}"
    image = REPO_ROOT / "requirements" / "gateway.txt"
    pins = {name: req for name, (req, _) in read_export(image, here=False).items()}
    pinned = [Version(s.version) for s in pins[dist].specifier if s.operator == "=="]
    assert pinned and pinned[0] >= FIXED[dist], f"requirements/gateway.txt: {pins[dist]}"


def _control_mode(args: list[str]) -> list[str]:
    out = []
    for i, a in enumerate(args):
        if a.startswith("--model-control-mode="):
            out.append(a.split("=", 1)[1])
        elif a == "--model-control-mode" and i + 1 < len(args):
            out.append(args[i + 1])
    return out


def test_local_triton_runs_without_remote_model_control(tmp_path):
    from imgsearch.triton_server import LocalTriton, TritonPaths

    t = LocalTriton(tmp_path)
    fake = TritonPaths(tmp_path / "tritonserver", tmp_path, tmp_path, tmp_path / "stub")
    cmd = t.command(fake, tmp_path / "backends")
    assert _control_mode(cmd) == ["none"], cmd


def _yaml_commands(doc: object) -> list[list[str]]:
    """Every command/args list (compose or Kubernetes) that runs tritonserver."""
    found = []
    if isinstance(doc, dict):
        cmd = list(doc.get("command") or []) if isinstance(doc.get("command"), list) else \
            str(doc.get("command") or "").split()
        args = doc.get("args") if isinstance(doc.get("args"), list) else []
        full = [str(x) for x in cmd + args]
        if any(x == "tritonserver" or x.endswith("/tritonserver") for x in full):
            found.append(full)
        for v in doc.values():
            found += _yaml_commands(v)
    elif isinstance(doc, list):
        for v in doc:
            found += _yaml_commands(v)
    return found


def _shipped(*patterns: str) -> list[Path]:
    skip = {".venv", ".git", "node_modules", "tests"}
    return sorted(p for pat in patterns for p in REPO_ROOT.rglob(pat)
                  if not skip & set(p.relative_to(REPO_ROOT).parts) and p.is_file())


def test_every_shipped_triton_config_disables_remote_model_control():
    commands = []
    for path in _shipped("*.yml", "*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            commands += [(path, c) for c in _yaml_commands(doc)]
    shell = []
    for path in _shipped("*.sh", "Dockerfile", "Makefile", "*.mk"):
        text = path.read_text().replace("\\\n", " ")
        shell += [(path, ln.split()) for ln in text.splitlines()
                  if re.search(r"(^|[\s/\"'])tritonserver\s+--", ln)]
    assert any(p.name == "docker-compose.yml" for p, _ in commands), "docker-compose.yml runs no tritonserver?"
    for path, cmd in commands + shell:
        assert _control_mode(cmd) == ["none"], f"{path.relative_to(REPO_ROOT)}: {' '.join(cmd)}"
    print(f"\nchecked: {sorted({str(p.relative_to(REPO_ROOT)) for p, _ in commands + shell})} + LocalTriton")
