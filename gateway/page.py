"""The web page (``GET /``) and the API docs (``GET /docs``), both served from this package.

No build step and nothing from a CDN (the CSP allows this origin only). The page's HTML
is a file in ``static/`` with a few placeholders filled once at startup: the model name
and whether the "untrained demo weights" banner shows. Swagger UI comes from the
``swagger-ui-bundle-v2`` wheel; without it /docs links to /openapi.json.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
router = APIRouter(include_in_schema=False)

# Swagger UI sets style attributes from script; its own stylesheet is still 'self'.
DOCS_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


def swagger_dir() -> Path | None:
    try:
        import swagger_ui_bundle
    except ImportError:
        return None
    path = Path(swagger_ui_bundle.swagger_ui_path)
    return path if (path / "swagger-ui-bundle.js").exists() else None


def render_index(model_name: str, arch: str, weights: str, untrained: bool, max_upload_bytes: int) -> str:
    text = (STATIC / "index.html").read_text()
    return (text.replace("{{MODEL}}", html.escape(f"{model_name} ({arch}, {weights})"))
                .replace("{{BANNER_HIDDEN}}", "" if untrained else "hidden")
                .replace("{{UNTRAINED}}", "true" if untrained else "false")
                .replace("{{MAX_UPLOAD_BYTES}}", str(int(max_upload_bytes))))


@router.get("/", response_class=HTMLResponse)
async def index(request: Request) -> HTMLResponse:
    return HTMLResponse(request.app.state.index_html, headers={"Cache-Control": "no-cache"})


@router.get("/docs", response_class=HTMLResponse)
async def docs(request: Request) -> HTMLResponse:
    if swagger_dir() is None:
        return HTMLResponse('<!doctype html><title>imgsearch API</title><p>Swagger UI is not installed '
                            '(pip install swagger-ui-bundle-v2). The API description is at '
                            '<a href="/openapi.json">/openapi.json</a>.</p>')
    page = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>imgsearch API</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/docs-assets/swagger-ui.css">
<link rel="icon" href="/docs-assets/favicon-32x32.png"></head>
<body><div id="swagger-ui"></div>
<script src="/docs-assets/swagger-ui-bundle.js"></script>
<script src="/static/docs.js"></script></body></html>"""
    return HTMLResponse(page, headers={"Content-Security-Policy": DOCS_CSP})


class Assets(StaticFiles):
    """StaticFiles, but a NUL byte in the path is a 404: Starlette's os.stat raised
    ValueError("embedded null byte") on ``/static/%00x``, a 500 (found by the reliability tests)."""

    def lookup_path(self, path: str) -> tuple[str, os.stat_result | None]:
        if "\x00" in path:
            return "", None
        return super().lookup_path(path)


def mount(app: FastAPI) -> None:
    """The static folders (the page's routes are in ``router``)."""
    app.mount("/static", Assets(directory=STATIC), name="static")
    sw = swagger_dir()
    if sw is not None:
        app.mount("/docs-assets", Assets(directory=sw), name="docs-assets")
