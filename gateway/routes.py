"""The HTTP API: search, images, writes, health, metrics.

Handlers stay thin: parse and validate, call :mod:`imgsearch.gateway.search` or the store, shape
the JSON. Errors are raised as the project's exceptions (or :class:`ApiError`) and turned
into ``{"error": {...}}`` by :mod:`imgsearch.gateway.errors`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials

from imgsearch.errors import DecodeBusy
from imgsearch.imaging import sniff_format
from imgsearch.labels import label_folder
from imgsearch.store import LABEL_MAX, Row, content_id

from . import schemas
from .errors import ApiError, responses
from .images import open_image_under, resolve_under, thumbnail_under
from .metrics import CONTENT_TYPE
from .request_route import request_route
from .search import encode_upload, search_image, similar_to
from .security import bearer, check_api_key, check_bearer
from .state import Runtime
from .uploads import read_upload
from .writes import ContentLocks, is_own_upload, store_file, upload_name

log = logging.getLogger("gateway")
router = APIRouter()

MAX_ID = 2**63 - 1
ID_DOC = "image id (int64 content hash)"
ImageId = Annotated[int, Path(ge=0, le=MAX_ID, description=ID_DOC)]

ID_PARAM = {"name": "id", "in": "path", "required": True, "description": ID_DOC,
            "schema": {"type": "integer", "minimum": 0, "maximum": MAX_ID}}
QUERY_PARAMS = [
    {"name": "top_k", "in": "query", "required": False, "description": "number of results (1..100)",
     "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 10}},
    {"name": "min_score", "in": "query", "required": False, "description": "drop results under this cosine",
     "schema": {"type": "number", "minimum": -1.0, "maximum": 1.0}},
    {"name": "label", "in": "query", "required": False, "description": "only results with this label",
     "schema": {"type": "string", "minLength": 1, "maxLength": LABEL_MAX}},
]
_FORM_PARAMS = {p["name"]: {**p["schema"], "description": "as the query parameter"} for p in QUERY_PARAMS}
_FILE = {"type": "string", "format": "binary",
         "description": "the image (JPEG, PNG, WebP, GIF or BMP; checked by content)"}
SEARCH_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"], "properties": {"file": _FILE, **_FORM_PARAMS}}}}},
    "parameters": QUERY_PARAMS}
ADD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "label"], "properties": {
        "file": _FILE,
        "label": {"type": "string", "minLength": 1, "maxLength": LABEL_MAX, "description": "class name, e.g. a breed"},
    }}}}}}
IMAGE_CONTENT = {"content": {t: {"schema": {"type": "string", "format": "binary"}}
                             for t in ("image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp")},
                 "description": "the image file"}
THUMB_CONTENT = {"content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}},
                 "description": "a JPEG thumbnail, longest side IMGSEARCH_THUMB_MAX_SIDE"}


_adding = ContentLocks()  # the same image added twice at once, in any process, makes one file


STREAM_CHUNK = 256 * 1024
READY_TTL_S = 1.0  # /readyz answers from a check at most this old: a flood of probes costs one check a second


def runtime(request: Request) -> Runtime:
    return request.app.state.runtime


Rt = Annotated[Runtime, Depends(runtime)]
Creds = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


# --- request values: query parameters and form fields, one set of rules ---------------
# /v1/search and /similar read their parameters here rather than through FastAPI's parameter
# solving, a visible share of their CPU; QUERY_PARAMS documents them in the OpenAPI schema.

def _invalid(field: str, msg: str) -> ApiError:
    return ApiError(422, "invalid_request", f"{field}: {msg}")


def int_value(values: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    if name not in values:
        return default
    try:
        v = int(values[name].strip())
    except ValueError:
        raise _invalid(name, "not an integer") from None
    if not lo <= v <= hi:
        raise _invalid(name, f"must be in {lo}..{hi}")
    return v


def float_value(values: Mapping[str, str], name: str, default: float | None, lo: float, hi: float, *,
                blank_is_default: bool = False) -> float | None:
    if name not in values or (blank_is_default and not values[name].strip()):
        return default
    try:
        v = float(values[name].strip())
    except ValueError:
        raise _invalid(name, "not a number") from None
    if math.isnan(v) or not lo <= v <= hi:
        raise _invalid(name, f"must be in {lo}..{hi}")
    return v


def label_value(values: Mapping[str, str], name: str, default: str | None) -> str | None:
    if name not in values:
        return default
    return clean_label(values[name], name)


def search_values(values: Mapping[str, str], defaults: tuple[int, float | None, str | None] = (10, None, None),
                  *, form: bool = False) -> tuple[int, float | None, str | None]:
    """top_k, min_score and label of a search, each ``defaults``' when absent (a form's blank min_score too)."""
    top_k, min_score, label = defaults
    return (int_value(values, "top_k", top_k, 1, 100),
            float_value(values, "min_score", min_score, -1.0, 1.0, blank_is_default=form),
            label_value(values, "label", label))


def image_id(text: str) -> int:
    v = int(text) if text.isascii() and text.isdigit() and len(text) <= 19 else -1
    if not 0 <= v <= MAX_ID:
        raise _invalid("id", f"must be an integer in 0..{MAX_ID}")
    return v


def clean_label(value: str, name: str = "label") -> str:
    v = value.strip()
    if not 1 <= len(v) <= LABEL_MAX:
        raise _invalid(name, f"must be 1..{LABEL_MAX} characters")
    if len(v.encode("utf-8")) > LABEL_MAX:  # what Milvus servers count
        raise _invalid(name, f"must be at most {LABEL_MAX} bytes in UTF-8")
    if any(ord(c) < 32 or ord(c) == 127 for c in v):
        raise _invalid(name, "control characters are not allowed")
    return v


def require_file(upload_data: bytes | None) -> bytes:
    if upload_data is None:
        raise ApiError(422, "missing_file", "the multipart body has no 'file' field")
    return upload_data


# --- search ----------------------------------------------------------------------------

@request_route(
    router, "/v1/search", methods=["POST"], response_model=schemas.SearchResponse, tags=["search"],
    summary="Search with an uploaded image",
    description="multipart `file` (+ `top_k`, `min_score`, `label` as form fields or query parameters; "
                "form wins). Returns the nearest indexed images by cosine, a breed guess and per-stage timings.",
    responses=responses(408, 413, 415, 422, 502, 503), openapi_extra=SEARCH_BODY)
async def search(request: Request) -> Response:
    rt = runtime(request)  # not a Depends: FastAPI's dependency solving is a visible share of a search's CPU
    query = search_values(request.query_params)
    upload = await read_upload(request, rt.settings.max_upload_bytes, rt.settings.body_timeout_s)
    data = require_file(upload.data)
    top_k, min_score, label = search_values(upload.fields, query, form=True)  # form fields win
    # built in SearchResponse's shape (the schema tests hold it to that): returned as it is, FastAPI
    # does not validate and serialise it through the model again, a visible share of a search's CPU
    return JSONResponse(await search_image(rt, data, top_k, min_score, label))


@request_route(
    router, "/v1/images/{id}/similar", methods=["GET"], response_model=schemas.SearchResponse, tags=["search"],
    summary="More like an indexed image", responses=responses(404, 422, 503),
    openapi_extra={"parameters": [ID_PARAM, *QUERY_PARAMS]})
async def similar(request: Request) -> Response:
    rt = runtime(request)
    id_ = image_id(request.path_params["id"])
    top_k, min_score, label = search_values(request.query_params)
    return JSONResponse(await similar_to(rt, id_, top_k, min_score, label))  # as in search


# --- images ----------------------------------------------------------------------------

@router.get("/v1/images/{id}", tags=["images"], summary="The indexed image file",
            response_class=Response, responses={200: IMAGE_CONTENT, **responses(403, 404, 422, 503)})
async def get_image(id: ImageId, rt: Rt) -> Response:
    entry = await rt.store_call(rt.store.get, id)
    f, size, kind = await rt.in_decode_pool(open_image_under, rt.image_root, entry.path)

    def chunks() -> Iterator[bytes]:  # streamed: a response never holds the whole file
        with f:
            while block := f.read(STREAM_CHUNK):
                yield block

    return StreamingResponse(chunks(), media_type=kind, headers={
        "Cache-Control": "private, max-age=3600", "Content-Length": str(size)})


@router.get("/v1/images/{id}/thumb", tags=["images"], summary="A JPEG thumbnail of the indexed image",
            response_class=Response, responses={200: THUMB_CONTENT, **responses(403, 404, 422, 503)})
async def get_thumb(id: ImageId, rt: Rt) -> Response:
    thumb = rt.thumbs.get(id)
    if thumb is None:
        entry = await rt.lookup(id)
        try:
            thumb = await rt.in_decode_pool(thumbnail_under, rt.image_root, entry.path, rt.settings.thumb_max_side,
                                            rt.settings.max_pixels, rt.decode_budget)
        except (ApiError, DecodeBusy):  # a path refused or gone; decode memory taken (503, as searches)
            raise
        except Exception as e:  # noqa: BLE001 - a broken file in the index is not a client error
            log.warning("thumbnail of %d failed: %s", id, e)
            raise ApiError(404, "not_found", "the indexed file cannot be thumbnailed") from None
        rt.thumbs.put(id, thumb)
    return Response(thumb, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


# --- writes ----------------------------------------------------------------------------

@router.post(
    "/v1/images", response_model=schemas.ImageAdded, status_code=201, tags=["images"],
    summary="Add one image to the index (API key)",
    description="Stores the file as IMAGE_ROOT/<label>/upload-<id>.<ext> (so it can be served, and a re-index "
                "gives it the same label) and upserts its embedding. Same content twice: 200, label updated.",
    responses={200: {"model": schemas.ImageAdded, "description": "already indexed; label updated"},
               **responses(401, 403, 408, 409, 413, 415, 422, 502, 503)},
    openapi_extra=ADD_BODY)
async def add_image(request: Request, rt: Rt, credentials: Creds) -> Any:
    check_api_key(request, credentials)  # before a single body byte is read
    upload = await read_upload(request, rt.settings.max_upload_bytes, rt.settings.body_timeout_s)
    data = require_file(upload.data)
    if "label" not in upload.fields:
        raise ApiError(422, "missing_label", "the multipart body has no 'label' field")
    label = clean_label(upload.fields["label"])
    encoded, _, _ = await encode_upload(rt, data)  # validates the image too
    id_ = content_id(data)
    async with _adding.hold(rt.image_root, id_, rt.in_decode_pool):
        existing = await rt.store_call(rt.store.existing, [id_])
        created = id_ not in existing
        wrote = False
        if created:
            name = upload_name(rt.settings.upload_prefix, id_, sniff_format(data) or "JPEG")
            rel = f"{label_folder(label)}/{name}"
            wrote = await rt.in_decode_pool(store_file, rt.image_root, rel, data, label)
        else:
            rel = existing[id_]  # same content: keep its file, update the label
        try:
            await rt.store_call(rt.store.upsert, [Row(id_, rel, label, encoded.embeddings[0])])
        except BaseException:
            if wrote:
                (rt.image_root / rel).unlink(missing_ok=True)
            raise
    rt.thumbs.drop(id_)
    log.info("added image %d (%s) as %s", id_, label, rel)
    body = {"id": str(id_), "label": label, "path": rel, "url": f"/v1/images/{id_}",
            "thumb_url": f"/v1/images/{id_}/thumb", "created": created}
    return JSONResponse(body, status_code=201 if created else 200)


@router.delete(
    "/v1/images/{id}", response_model=schemas.ImageDeleted, tags=["images"],
    summary="Remove one image from the index (API key)",
    description="Removes the entry. The file is deleted only when POST /v1/images stored it "
                "(named upload-<id>.<ext>); files of an indexed dataset are left alone.",
    responses=responses(401, 403, 404, 422, 503))
async def delete_image(id: ImageId, request: Request, rt: Rt, credentials: Creds) -> Any:
    check_api_key(request, credentials)
    entry = await rt.store_call(rt.store.get, id)
    await rt.store_call(rt.store.delete, [id])
    removed = False
    if is_own_upload(entry.path, rt.settings.upload_prefix, id):
        try:
            target = await rt.in_decode_pool(resolve_under, rt.image_root, entry.path)
            target.unlink()
            removed = True
        except (ApiError, OSError) as e:
            log.warning("entry %d removed, its file %s not: %s", id, entry.path, e)
    rt.thumbs.drop(id)
    log.info("deleted image %d (%s)", id, entry.path)
    return {"id": str(id), "deleted": True, "file_removed": removed}


# --- operations ------------------------------------------------------------------------

NOT_READY = {"triton": "Triton (the model server) is not ready", "milvus": "Milvus (the vector database) is not ready"}
# runtime -> (clock time, readiness); weak, so a later runtime at a recycled address starts afresh
_ready: weakref.WeakKeyDictionary[Runtime, tuple[float, Any]] = weakref.WeakKeyDictionary()
_ready_lock = asyncio.Lock()
clock: Callable[[], float] = time.monotonic  # a module attribute: tests step the cache's time by hand


async def _readiness(rt: Runtime) -> tuple[dict[str, bool], dict[str, str]]:
    """``rt.readiness()``, shared by the probes of the same second (one check at a time)."""
    async with _ready_lock:
        at, value = _ready.get(rt, (float("-inf"), None))
        if clock() - at >= READY_TTL_S:
            checks, detail = await rt.readiness()
            rt.metrics.readiness_checks.inc()
            if detail:
                log.warning("not ready: %s", "; ".join(f"{k}: {v}" for k, v in detail.items()))
            # the public sees which backend, not its address or its error text (the log has them)
            value = checks, {k: NOT_READY.get(k, "not ready") for k in detail}
            _ready[rt] = (clock(), value)
    return value


@router.get("/healthz", response_model=schemas.Health, tags=["operations"], summary="Liveness (process only)")
async def healthz() -> Any:
    return {"status": "ok"}


@router.get(
    "/readyz", response_model=schemas.Readiness, tags=["operations"],
    summary="Readiness: Triton model ready and Milvus collection loaded",
    responses={503: {"model": schemas.NotReady, "description": "a backend is not ready",
                     "headers": responses(503)[503]["headers"]}})
async def readyz(rt: Rt) -> Any:
    checks, detail = await _readiness(rt)
    if all(checks.values()):
        return {"status": "ready", "checks": checks, "detail": detail, "model": rt.model_info}
    msg = "; ".join(f"{k}: {v}" for k, v in detail.items()) or "not ready"
    return JSONResponse(
        {"status": "not_ready", "checks": checks, "detail": detail, "model": rt.model_info,
         "error": {"code": "not_ready", "message": msg}},
        status_code=503, headers={"Retry-After": str(rt.settings.retry_after_s)})


@router.get("/metrics", response_class=PlainTextResponse, tags=["operations"], summary="Prometheus metrics",
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus text format"}, **responses(401)})
async def metrics(request: Request, rt: Rt) -> Response:
    token = rt.settings.metrics_token
    if token is not None:  # Prometheus: authorization: {credentials: <token>} (Bearer)
        # read here, not as a security dependency: the schema would then mark /metrics as
        # always needing a key, which it does only when the operator sets one
        check_bearer(await bearer(request), token.get_secret_value(), "IMGSEARCH_METRICS_TOKEN")
    return Response(rt.metrics.render(), media_type=CONTENT_TYPE)

