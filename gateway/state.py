"""What the gateway holds for its lifetime: one Triton client, one store, the model card, two pools.

Blocking work never runs on the event loop: decoding goes to a pool of
``IMGSEARCH_DECODE_THREADS`` (Pillow releases the GIL), Milvus calls to a pool of
``IMGSEARCH_STORE_THREADS``. Searches and id lookups go through a :class:`MicroBatcher`
each: concurrent requests share one Milvus call (``IMGSEARCH_SEARCH_BATCH_MS``). The collection is opened (created or checked against the
model card) at startup; when Milvus is down then, or fails later, the next request opens
it again, so a Milvus that comes back needs no gateway restart.

With ``IMGSEARCH_TRITON_INPUT=bytes`` uploads go to Triton undecoded (the ``image_search``
ensemble decodes them) once :meth:`Runtime.decide_input` has found the ensemble usable;
otherwise, or until then, the gateway decodes with Pillow as in ``pixels`` mode.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Callable, TypeVar

from imgsearch.errors import NotFound, StoreUnavailable
from imgsearch.imaging import DecodeBudget
from imgsearch.model_card import ModelCard
from imgsearch.settings import Settings
from imgsearch.store import Entry, Hit, SearchQuery, VectorStore, search_ef
from imgsearch.triton_client import TritonEncoder

from .batching import MicroBatcher
from .images import ThumbCache
from .metrics import Metrics

log = logging.getLogger("gateway")
T = TypeVar("T")


class Runtime:
    def __init__(self, settings: Settings, card: ModelCard, labels: list[str], encoder: TritonEncoder,
                 store: VectorStore, metrics: Metrics) -> None:
        self.settings = settings
        self.card = card
        self.labels = labels
        self.encoder = encoder
        self.store = store
        self.metrics = metrics
        self.image_root = settings.image_root.expanduser().resolve()
        self.decode_pool = ThreadPoolExecutor(max(1, settings.decode_threads), thread_name_prefix="decode")
        self.store_pool = ThreadPoolExecutor(max(1, settings.store_threads), thread_name_prefix="milvus")
        self.thumbs = ThumbCache(settings.thumb_cache_items)
        self.decode_budget = DecodeBudget(settings.decode_memory_bytes, settings.decode_wait_s)
        self._store_open = False
        self._open_lock = asyncio.Lock()
        # bytes mode: None = not decided yet (Triton was not ready to be asked)
        self.use_bytes: bool | None = False if settings.triton_input == "pixels" else None
        self._input_lock = asyncio.Lock()
        window_s = settings.search_batch_ms / 1000.0
        batching = {"send_when_idle": settings.search_batch_idle_send, "max_calls": settings.search_batch_calls}
        self.searches: MicroBatcher[SearchQuery, list[Hit]] = MicroBatcher(
            self._search_batch, window_s, settings.search_batch_max, metrics.batch_observer("search"), **batching)
        self.lookups: MicroBatcher[int, Entry | None] = MicroBatcher(
            self._lookup_batch, window_s, settings.search_batch_max, metrics.batch_observer("get"), **batching)

    @property
    def model_info(self) -> dict[str, Any]:
        return {"name": self.card.name, "arch": self.card.arch, "weights": self.card.weights_description,
                "untrained": self.card.untrained}

    async def decide_input(self) -> bool:
        """Send file bytes to the ensemble? Asked once Triton is ready; pixels until then.

        Bytes were asked for but the ensemble is missing (or enforces another pixel limit):
        a warning, and the gateway decodes itself for the rest of its life.
        """
        if self.use_bytes is not None:
            return self.use_bytes
        async with self._input_lock:
            if self.use_bytes is None and await self.encoder.is_ready():
                problem = await self.encoder.bytes_path_problem(self.settings.max_pixels)
                self.use_bytes = problem is None
                if problem:
                    log.warning("IMGSEARCH_TRITON_INPUT=bytes but %s: decoding uploads here (pixels) instead",
                                problem)
                else:
                    log.info("Triton input: file bytes to the %r ensemble (decoded in Triton)",
                             self.encoder.ensemble_name)
        return bool(self.use_bytes)

    async def in_decode_pool(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.decode_pool, partial(fn, *args, **kwargs))

    async def _in_store_pool(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.store_pool, partial(fn, *args, **kwargs))

    async def open_store(self) -> None:
        """Create the collection or check it holds this model's embeddings (CollectionMismatch)."""
        if self._store_open:
            return
        async with self._open_lock:
            if self._store_open:
                return
            await self._in_store_pool(self.store.open, self.card.embedding_dim, self.card.model_sha, self.card.name)
            self._store_open = True
            log.info("collection %s open at %s", self.store.collection, self.store.uri)

    async def store_call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking VectorStore method; a failure makes the next call re-open the collection."""
        await self.open_store()
        try:
            return await self._in_store_pool(fn, *args, **kwargs)
        except StoreUnavailable:
            self._store_open = False
            raise

    async def search(self, query: SearchQuery, label: str | None) -> list[Hit]:
        """Top hits for one query; shares a Milvus call with concurrent queries of the same filter and ef."""
        return await self.searches.submit((label, search_ef(query.top_k)), query)

    async def _search_batch(self, key: Hashable, queries: Sequence[SearchQuery]) -> list[list[Hit]]:
        label, _ef = key
        return await self.store_call(self.store.search_many, queries, label)

    async def lookup(self, id_: int, with_embedding: bool = False) -> Entry:
        """One indexed entry (NotFound if absent); shares a Milvus call with concurrent lookups."""
        entry = await self.lookups.submit(with_embedding, id_)
        if entry is None:
            raise NotFound(f"no image with id {id_}")
        return entry

    async def _lookup_batch(self, with_embedding: Hashable, ids: Sequence[int]) -> list[Entry | None]:
        return await self.store_call(self.store.get_many, ids, bool(with_embedding))

    async def readiness(self) -> tuple[dict[str, bool], dict[str, str]]:
        checks: dict[str, bool] = {}
        detail: dict[str, str] = {}
        checks["triton"] = await self.encoder.is_ready()
        if not checks["triton"]:
            detail["triton"] = f"model {self.encoder.model_name!r} not ready at {self.encoder.url}"
        elif await self.decide_input() and not await self.encoder.has_ensemble():
            checks["triton"] = False  # uploads go to the ensemble: it must be there too
            detail["triton"] = f"ensemble {self.encoder.ensemble_name!r} not ready at {self.encoder.url}"
        try:
            await asyncio.wait_for(self.open_store(), 10.0)
            checks["milvus"] = await asyncio.wait_for(self._in_store_pool(self.store.is_ready), 5.0)
            if not checks["milvus"]:
                self._store_open = False
                detail["milvus"] = f"collection {self.store.collection!r} is not loaded"
        except asyncio.TimeoutError:
            checks["milvus"] = False
            detail["milvus"] = "Milvus did not answer in time"
        except Exception as e:  # noqa: BLE001 - any failure means not ready; the message says which
            self._store_open = False
            checks["milvus"] = False
            detail["milvus"] = str(e)
        return checks, detail

    async def close(self) -> None:
        await self.searches.close()
        await self.lookups.close()
        await self.encoder.close()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.get_running_loop().run_in_executor(None, self.store.close)
        self.store_pool.shutdown(wait=False, cancel_futures=True)
