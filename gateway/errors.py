"""Errors -> HTTP: one table from the project's exceptions to a status and a JSON body.

Every error is ``{"error": {"code", "message"}}``. Overload and dead backends are 503
with ``Retry-After`` (the client should come back, not give up); bad input is 4xx, never
500. The same table produces the ``responses=`` of each route, so /openapi.json documents
exactly what the handlers return.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imgsearch.errors import (
    CollectionMismatch,
    CorruptImage,
    DecodeBusy,
    EntryRefused,
    ImageTooLarge,
    ImgsearchError,
    ModelRepositoryError,
    NotFound,
    StoreUnavailable,
    TritonInvalidInput,
    TritonOverloaded,
    TritonUnavailable,
    UnsupportedImage,
    UploadTooLarge,
)

from .schemas import ErrorBody

log = logging.getLogger("imgsearch.gateway.errors")


class ApiError(Exception):
    """An HTTP-level error of the gateway itself (auth, path checks, malformed requests)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


# (exception type, status, shed reason for imgsearch_shed_total or None); first match wins
STATUS_TABLE: list[tuple[type[ImgsearchError], int, str | None]] = [
    (UploadTooLarge, 413, None),
    (UnsupportedImage, 415, None),
    (CorruptImage, 422, None),
    (ImageTooLarge, 422, None),
    (NotFound, 404, None),
    (EntryRefused, 422, None),  # the entry's own fault (name, label), not Milvus being down
    (DecodeBusy, 503, "decode_memory"),
    (TritonOverloaded, 503, "triton_overloaded"),
    (TritonUnavailable, 503, "triton_unavailable"),
    (StoreUnavailable, 503, "milvus_unavailable"),
    (CollectionMismatch, 503, None),
    (ModelRepositoryError, 503, None),
    # Triton refusing a tensor we built is our bug or a model/config mismatch, not the client's
    (TritonInvalidInput, 502, None),
]


# What the public reads for a server-side error, or for a client error a backend told in its own
# words: never a backend's address or its error text (the log has both). Codes not listed here
# are the client's own errors in the gateway's words, told as they are.
PUBLIC_MESSAGES: dict[str, str] = {
    "entry_refused": "the index refused this entry: its label or stored path does not fit the collection's "
                     "schema (too long in UTF-8 bytes, or not valid UTF-8); use a shorter label",
    "triton_unavailable": "Triton (the model server) is unavailable; retry shortly",
    "milvus_unavailable": "Milvus (the vector database) is unavailable; retry shortly",
    "collection_mismatch": "the index was built by another model than the one served (see the gateway log)",
    "bad_model_repository": "the model repository is misconfigured (see the gateway log)",
    "invalid_inference_input": "the model server refused the request the gateway built (see the gateway log)",
    "triton_error": "the model server failed (see the gateway log)",
    "store_error": "the vector database failed (see the gateway log)",
}


def told_in_public_words(exc: ImgsearchError, status: int) -> bool:
    """Whether the public reads less than the error says (the log then has the detail)."""
    return status >= 500 or exc.code in PUBLIC_MESSAGES


def public_message(exc: ImgsearchError, status: int) -> str:
    if not told_in_public_words(exc, status):
        return str(exc)
    if exc.code == "overloaded":
        return "the service is overloaded; retry shortly"
    return PUBLIC_MESSAGES.get(exc.code, "internal error (see the gateway log)")


def classify(exc: ImgsearchError) -> tuple[int, str | None]:
    for typ, status, reason in STATUS_TABLE:
        if isinstance(exc, typ):
            return status, reason
    return 500, None


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None,
                   retry_after_s: int | None = None) -> JSONResponse:
    h = dict(headers or {})
    if status in (429, 503) and "Retry-After" not in h:
        h["Retry-After"] = str(retry_after_s or 1)
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=h)


def _count(request: Request, code: str, reason: str | None = None) -> None:
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.errors.labels(code=code).inc()
        if reason:
            metrics.shed.labels(reason=reason).inc()


def _retry_after(request: Request) -> int:
    settings = getattr(request.app.state, "settings", None)
    return int(getattr(settings, "retry_after_s", 1) or 1)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body",))
        parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else str(err.get("msg", "invalid")))
    return "; ".join(parts) or "invalid request"


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ImgsearchError)
    async def imgsearch_error(request: Request, exc: ImgsearchError) -> JSONResponse:
        status, reason = classify(exc)
        _count(request, exc.code, reason)
        if told_in_public_words(exc, status):
            log.warning("%s %s -> %d %s: %s", request.method, request.url.path, status, exc.code, exc)
        return error_response(status, exc.code, public_message(exc, status), retry_after_s=_retry_after(request))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        _count(request, exc.code)
        return error_response(exc.status, exc.code, exc.message, exc.headers, _retry_after(request))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        _count(request, "invalid_request")
        return error_response(422, "invalid_request", _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, f"http_{exc.status_code}")
        _count(request, code)
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None),
                              _retry_after(request))



class LastResortMiddleware:
    """A bug still answers in the JSON error shape, inside the metrics and security headers.

    (Starlette sends its own plain-text 500 from the outermost middleware, past ours.)
    The message stays generic, never internals or request bytes; the log has the trace.
    """

    def __init__(self, app: ASGIApp, metrics: Any = None) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if self.metrics is not None:
                self.metrics.errors.labels(code="internal").inc()
            if started:
                raise
            await error_response(500, "internal", "internal error")(scope, receive, send)


# --- OpenAPI ---------------------------------------------------------------------------

_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
_DESCRIPTIONS = {
    401: "missing or wrong `Authorization: Bearer <IMGSEARCH_API_KEY>`",
    403: "write endpoints disabled (no API key configured), or the indexed file lies outside the image root",
    404: "no image with this id, or its file is gone",
    408: "the upload did not arrive within IMGSEARCH_BODY_TIMEOUT_S",
    409: "the label's folder (or the file name) under the image root is taken by a file or folder",
    413: "upload over IMGSEARCH_MAX_UPLOAD_BYTES (enforced while reading)",
    415: "not an allowed image (JPEG, PNG, WebP, GIF, BMP; checked by content), or the body is not multipart",
    422: "undecodable or truncated image, decompression bomb, missing `file` field, a parameter out of range, "
         "or an entry Milvus refuses (label not storable)",
    502: "Triton refused the tensor the gateway built (model/config mismatch)",
    503: "overloaded (in-flight limit or Triton's queue full), Triton/Milvus unavailable, or the image root "
         "full or read-only (writes); retry after Retry-After",
}


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {}
    for s in statuses:
        entry: dict[str, Any] = {"model": ErrorBody, "description": _DESCRIPTIONS[s]}
        if s in (429, 503):
            entry["headers"] = _RETRY_AFTER
        if s == 401:
            entry["headers"] = {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}}
        out[s] = entry
    return out
