"""``create_app(settings)``: the FastAPI gateway in front of Triton and Milvus.

One process holds one Triton client (a gRPC channel shared by all requests, so Triton's
dynamic batcher sees concurrent searches), one Milvus store and the model card read from
the model repository (embedding dimension, model sha for the collection guard, whether
there is a classifier head, the labels, the untrained banner).

Middleware, outermost first: security headers -> metrics -> last-resort 500 -> CORS (only
when IMGSEARCH_CORS_ORIGINS is set) -> lingering close -> in-flight limiter -> routes.

Run it with ``imgsearch serve``, or ``uvicorn imgsearch.gateway.app:app_from_env --factory`` with
IMGSEARCH_TRITON_URL set.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from imgsearch.errors import CollectionMismatch, ModelRepositoryError, StoreUnavailable
from imgsearch.imaging import unmap_large_allocations
from imgsearch.model_card import read_card, read_labels
from imgsearch.settings import Settings
from imgsearch.store import VectorStore
from imgsearch.triton_client import TritonEncoder

from . import page
from .errors import LastResortMiddleware, install_handlers
from .limiter import InflightLimiter
from .lingering import LingeringClose
from .memory import MIB, container_memory_limit, memory_budget, memory_warning
from .metrics import Metrics, MetricsMiddleware
from .routes import router
from .security import SecurityHeadersMiddleware
from .state import Runtime
from .writes import prepare_locks

log = logging.getLogger("gateway")

DESCRIPTION = """Reverse image search: upload an image, get the most similar indexed images
(cosine over ResNet embeddings served by Triton, stored in Milvus) and a breed guess.

Errors are JSON `{"error": {"code", "message"}}`. 503 answers carry `Retry-After`.
Write endpoints need `Authorization: Bearer <IMGSEARCH_API_KEY>` and are disabled (403)
when no key is configured."""


def create_app(settings: Settings, *, encoder: TritonEncoder | None = None,
               store: VectorStore | None = None) -> FastAPI:
    """The gateway app; ``encoder`` / ``store`` stand in for the Triton client and the Milvus store
    the settings name (anything with their methods: tests run the routes over in-process fakes).
    The app closes them with its lifespan, as it does its own."""
    if encoder is None and not settings.triton_url:
        raise ModelRepositoryError(
            "IMGSEARCH_TRITON_URL is not set: run `imgsearch serve` (it starts the local Triton) "
            "or point the gateway at a running Triton (host:port of its gRPC endpoint)")
    metrics = Metrics()
    metrics.memory_budget.set(memory_budget(settings).total)
    given_encoder, given_store = encoder, store

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        card = read_card(settings.model_repository, settings.model_name)
        labels = read_labels(settings.model_repository, settings.model_name) if card.has_probs else []
        encoder = given_encoder if given_encoder is not None else TritonEncoder(
            settings.triton_url, settings.model_name, settings.triton_protocol,
            timeout_s=settings.triton_timeout_s, ensemble_name=settings.ensemble_name)
        store = given_store if given_store is not None else VectorStore.from_settings(settings)
        rt = Runtime(settings, card, labels, encoder, store, metrics)
        if settings.api_key is not None:  # writes enabled: POST /v1/images keeps files under the root
            await rt.in_decode_pool(prepare_locks, rt.image_root)
        try:
            await rt.open_store()
        except CollectionMismatch:
            await rt.close()
            raise  # wrong model for this collection: refuse to serve garbage
        except StoreUnavailable as e:
            log.warning("Milvus not available at startup (%s); /readyz stays 503 until it is", e)
        if not await encoder.is_ready():
            log.warning("Triton model %r not ready at %s; /readyz stays 503 until it is",
                        settings.model_name, encoder.url)
        else:
            if card.has_probs and not await encoder.has_probs():
                log.warning("model card promises 'probs' but Triton's model has no such output")
            await rt.decide_input()  # bytes mode and no usable ensemble: warns, decodes here
        app.state.runtime = rt
        app.state.index_html = page.render_index(card.name, card.arch, card.weights_description, card.untrained,
                                                   settings.max_upload_bytes)
        mode = {True: "file bytes", False: "pixels", None: "bytes once Triton is ready"}[rt.use_bytes]
        log.info("gateway ready: model %s (%s, %d-d%s), Triton %s (input: %s), Milvus %s/%s, image root %s",
                 card.name, card.arch, card.embedding_dim, ", untrained" if card.untrained else "",
                 encoder.url, mode, settings.milvus_uri, settings.collection, rt.image_root)
        try:
            yield
        finally:
            await rt.close()

    # The routes go in as they are rather than through include_router(): FastAPI (0.137 on) keeps an
    # included router as a node that it resolves again on every request, the largest single entry
    # of the gateway's profile with include_router (docs/deploy.md, Gateway requests per second
    # per core). So app.dependency_overrides does not reach them: tests inject the encoder and
    # store instead.
    app = FastAPI(title="imgsearch", version="0.1.0", description=DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None, routes=[*router.routes, *page.router.routes])
    app.state.settings = settings
    app.state.metrics = metrics
    install_handlers(app)
    page.mount(app)
    # add_middleware: the last added runs first
    app.add_middleware(InflightLimiter, limit=settings.max_inflight, metrics=metrics,
                       retry_after_s=settings.retry_after_s, max_reading=settings.max_reading,
                       max_light=settings.max_light)
    app.add_middleware(LingeringClose, max_bytes=settings.lingering_close_bytes, max_s=settings.lingering_close_s)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_credentials=False,
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["Authorization", "Content-Type"],
                           expose_headers=["Retry-After"], max_age=600)
    app.add_middleware(LastResortMiddleware, metrics=metrics)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(SecurityHeadersMiddleware)
    return app


def app_from_env() -> FastAPI:
    """uvicorn factory: settings from IMGSEARCH_* (``uvicorn imgsearch.gateway.app:app_from_env --factory``).

    It is the gateway's process, so it also sets the process's allocator: the decode budget
    then bounds the memory the process holds, not only the rasters alive at once. It checks
    what its settings let it hold against its container's memory limit. And it takes what its
    imports built (modules, classes, the app) out of the garbage collector's generations: they
    live as long as the process, and the collections that requests' allocations trigger then
    do not traverse them again (half of those collections' CPU: docs/deploy.md).
    """
    if not unmap_large_allocations():
        log.warning("the C library is not glibc: freed rasters may stay in the process's heaps, "
                    "so its memory can exceed IMGSEARCH_DECODE_MEMORY_BYTES' share of the memory limit")
    settings = Settings()
    budget, limit = memory_budget(settings), container_memory_limit()
    warning = memory_warning(budget, limit, settings.workers)
    if warning:
        log.warning(warning)
    else:
        log.info("memory budget %s per process, %d process(es); container limit %s", budget.describe(),
                 settings.workers, "none" if limit is None else f"{limit / MIB:,.0f} MiB")
    app = create_app(settings)
    freeze_start_up_objects()
    return app


def freeze_start_up_objects() -> None:
    """Move every object alive now to the collector's permanent generation (after collecting the garbage)."""
    gc.collect()
    gc.freeze()
