"""The batch encoding pipeline: files -> decode workers -> Triton -> Milvus.

::

    scan ─► hash (workers) ─► "which ids exist?" (Milvus) ─► decode (workers, batches)
          ─► encode (Triton, --in-flight requests at once) ─► upsert (Milvus, batched)

* Ids are content hashes and upserts are idempotent: a run killed at any point and run
  again ends with the exact set of entries, with no duplicates.
* A file counts as indexed only once the upsert holding it has returned; the collection
  itself is the checkpoint, there is no side file to get out of step with it.
* Unchanged files (content already in this collection, which the guard ties to one model
  card) are hashed but neither decoded nor encoded.
* Bytes mode (``IMGSEARCH_TRITON_INPUT=bytes`` and the ``image_search`` ensemble in Triton,
  checked before the first batch): the workers only read and hash, the files go to Triton
  as they are and are decoded there. One bad file fails a request of several, so such a
  batch is sent again one file at a time and each bad file is reported under its own code.
* A path or label Milvus would refuse (not UTF-8, over its byte limit) is reported up front,
  never cut short; should Milvus still refuse a batch, its rows are upserted one by one and
  only the refused ones are reported, so one bad row never costs the rest of the run.
* Bad files are reported by reason and skipped. Triton overloaded -> retried with backoff;
  Triton gone -> retried until ``unavailable_timeout_s``, then the run stops; Milvus gone
  -> the run stops. Rows already encoded are still upserted before stopping.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass

import numpy as np

from imgsearch.errors import (
    EntryRefused,
    ImageError,
    StoreError,
    TritonError,
    TritonInvalidInput,
    TritonOverloaded,
    TritonUnavailable,
)
from imgsearch.store import Row, VectorStore, entry_problem, printable
from imgsearch.triton_client import TritonEncoder, with_backoff

from .report import IndexReport
from .scan import ImageFile, ScanResult, label_for
from .work import (
    READ_ERROR,
    Decoded,
    Hashed,
    Read,
    decode_files,
    hash_files,
    init_worker,
    read_files,
    warm_up,
)

log = logging.getLogger(__name__)

_DONE = None  # queue sentinel
INTERRUPTED = "interrupted (Ctrl-C)"


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def start_workers(n: int) -> ProcessPoolExecutor:
    """The decode processes, spawning now: their imports overlap whatever the caller does next.

    Spawned, not forked: the parent holds gRPC channels (Triton, Milvus) that must not be forked.
    """
    pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"),
                               initializer=init_worker, initargs=(os.getpid(),))
    for _ in range(n):
        pool.submit(warm_up)
    return pool


@dataclass
class IndexOptions:
    batch_size: int = 32  # images per Triton request
    workers: int = 0  # decode processes; 0 = one per core (up to 8)
    in_flight: int = 2  # concurrent Triton requests
    upsert_rows: int = 512  # most rows per Milvus upsert call
    retries: int = 5  # backoff retries while Triton's queue is full
    unavailable_timeout_s: float = 30.0  # keep retrying an unreachable Triton this long
    image_size: int = 224
    max_pixels: int = 50_000_000
    triton_input: str = "pixels"  # "bytes": files to the image_search ensemble when Triton has it
    sync: bool = False
    progress: bool = True


class _Stop(Exception):
    """Raised inside a stage once another stage has stopped the run."""


class Indexer:
    """One run over one scan. ``await Indexer(...).run(scan)`` -> :class:`IndexReport`."""

    def __init__(self, store: VectorStore, encoder: TritonEncoder, dim: int, options: IndexOptions,
                 pool: ProcessPoolExecutor | None = None) -> None:
        self.store = store
        self._pool = pool  # from start_workers(); shut down at the end of run()
        self.encoder = encoder
        self.dim = dim
        self.opt = options
        self.workers = options.workers or default_workers()
        self._stop = asyncio.Event()
        self._store_dead = False
        self._triton_lock = asyncio.Lock()
        self._triton_ok = False
        self.use_bytes = False  # decided with the first Triton check (bytes asked + ensemble usable)
        self.report: IndexReport | None = None
        self._bar = None

    # --- control ------------------------------------------------------------------------
    def _abort(self, message: str, store_dead: bool = False) -> None:
        self._store_dead = self._store_dead or store_dead
        if self.report.aborted is None:
            self.report.aborted = message
            log.error("stopping: %s", message)
        self._stop.set()

    def _progress(self, n: int) -> None:
        if self._bar is not None and n:
            r = self.report
            self._bar.update(n)
            self._bar.set_postfix(indexed=r.indexed, unchanged=r.unchanged, failed=r.failed_count, refresh=False)

    def _fail(self, f: ImageFile, code: str, message: str) -> None:
        self.report.add_failure(code, f.rel, message)
        self._progress(1)

    # --- entry point --------------------------------------------------------------------
    async def run(self, scan: ScanResult) -> IndexReport:
        opt = self.opt
        self.report = r = IndexReport(root=str(scan.root), collection=self.store.collection,
                                      scanned=len(scan.files), ignored=dict(scan.ignored))
        r.settings = {**asdict(opt), "workers": self.workers, "triton_url": self.encoder.url,
                      "milvus_uri": self.store.uri, "dim": self.dim}
        self.root = scan.root
        self.live: dict[int, list[str]] = {}  # content id -> paths holding it (for --sync)
        self.unreadable: set[str] = set()
        self._seen: set[int] = set()
        self._decode_q: asyncio.Queue = asyncio.Queue(maxsize=opt.in_flight + self.workers)
        self._upsert_q: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        t0 = self._idle_since = time.perf_counter()
        c0 = time.process_time()  # this process, all threads (incl. an in-process Milvus Lite)
        self._inflight = 0
        pool = self._pool or start_workers(self.workers)
        from tqdm import tqdm

        self._bar = tqdm(total=len(scan.files), unit="img", desc="indexing", smoothing=0.1,
                         disable=not opt.progress, dynamic_ncols=True)
        try:
            upserter = asyncio.create_task(self._upserter())
            encoders = [asyncio.create_task(self._encode_loop()) for _ in range(opt.in_flight)]
            try:
                await self._producer(loop, pool, scan.files)
            finally:
                for _ in encoders:
                    await self._decode_q.put(_DONE)
                await asyncio.gather(*encoders)
                await self._upsert_q.put(_DONE)
                await upserter
            if opt.sync and not r.aborted:
                if scan.errors:  # a folder we could not list would look like deleted files
                    r.sync_skipped = f"--sync skipped: {len(scan.errors)} folder(s) could not be read ({scan.errors[0]})"
                    log.warning(r.sync_skipped)
                else:
                    await self._sync(scan)
            if not self._store_dead:
                await self._build_index()
        except _Stop:
            pass
        finally:
            self._bar.close()
            pool.shutdown(wait=True, cancel_futures=True)
            r.elapsed_s = time.perf_counter() - t0
            r.cpu_s["main"] = time.process_time() - c0
        return r

    async def _ensure_triton(self) -> None:
        """Checked before the first request only: a run where nothing changed needs no Triton."""
        async with self._triton_lock:
            if not self._triton_ok:
                await self._wait_for_triton()
                if self.opt.triton_input == "bytes":
                    await self._choose_input()
                self._triton_ok = True

    async def _choose_input(self) -> None:
        problem = await self.encoder.bytes_path_problem(self.opt.max_pixels)
        self.use_bytes = problem is None
        self.report.settings["triton_input"] = "bytes" if self.use_bytes else "pixels"
        if problem:
            self.report.settings["triton_input_fallback"] = problem
            log.warning("IMGSEARCH_TRITON_INPUT=bytes but %s: decoding here (pixels) instead", problem)

    async def _wait_for_triton(self) -> None:
        deadline = time.monotonic() + self.opt.unavailable_timeout_s
        while not await self.encoder.is_ready():
            if time.monotonic() >= deadline:
                self._abort(f"Triton at {self.encoder.url} has no ready model {self.encoder.model_name!r} "
                            f"(waited {self.opt.unavailable_timeout_s:.0f}s). Is it running? "
                            "Unset IMGSEARCH_TRITON_URL to start the local one.")
                raise _Stop
            await asyncio.sleep(0.5)

    # --- stage 1+2: hash, skip what exists, hand batches to the decoders ----------------
    async def _producer(self, loop, pool: ProcessPoolExecutor, files: list[ImageFile]) -> None:
        opt, r = self.opt, self.report
        chunk = max(opt.batch_size, 64)
        chunks = deque(files[i : i + chunk] for i in range(0, len(files), chunk))
        pending: deque = deque()
        buffer: list[tuple[ImageFile, int]] = []

        def top_up() -> None:
            while chunks and len(pending) < self.workers * 2:
                part = chunks.popleft()
                pending.append((loop.run_in_executor(pool, hash_files, [str(f.path) for f in part]), part))

        top_up()
        try:
            while pending and not self._stop.is_set():
                fut, part = pending.popleft()
                top_up()
                try:
                    hashed: Hashed = await fut
                except BrokenProcessPool as e:
                    self._abort(f"a decode worker process died ({e}); re-run to resume")
                    return
                r.stages_s["hash"] += hashed.seconds
                r.cpu_s["workers"] += hashed.cpu_seconds
                fresh = await self._classify(part, hashed)
                if fresh is None:
                    return
                buffer += fresh
                while len(buffer) >= opt.batch_size and not self._stop.is_set():
                    await self._submit(loop, pool, buffer[: opt.batch_size])
                    buffer = buffer[opt.batch_size :]
            if buffer and not self._stop.is_set():
                await self._submit(loop, pool, buffer)
        finally:
            for fut, _ in pending:
                fut.cancel()

    async def _classify(self, part: list[ImageFile], hashed: Hashed) -> list[tuple[ImageFile, int]] | None:
        """Record read errors and duplicates, ask Milvus which ids exist; return the new files."""
        r = self.report
        candidates: list[tuple[ImageFile, int]] = []
        for i, f in enumerate(part):
            cid = hashed.ids[i]
            problem = entry_problem(f.rel, f.label)
            if problem:  # refused up front: Milvus would refuse it in a batch with others
                self.report.add_failure(EntryRefused.code, printable(f.rel), problem)
                self._progress(1)
                continue
            if cid is None:
                self.unreadable.add(f.rel)
                self._fail(f, READ_ERROR, hashed.errors.get(i, "unreadable"))
                continue
            self.live.setdefault(cid, []).append(f.rel)
            if cid in self._seen:  # same bytes as an earlier file of this run
                r.duplicates += 1
                self._progress(1)
                continue
            self._seen.add(cid)
            candidates.append((f, cid))
        if not candidates:
            return []
        t = time.perf_counter()
        try:
            existing = await asyncio.to_thread(self.store.existing, [cid for _, cid in candidates])
        except StoreError as e:
            self._abort(str(e), store_dead=True)
            return None
        fresh, moved = [], []
        for f, cid in candidates:
            if cid not in existing:
                fresh.append((f, cid))
                continue
            r.unchanged += 1
            stored = existing[cid]
            if stored != f.rel and not (self.root / stored).exists():
                moved.append((cid, f))
        if moved:
            try:
                await asyncio.to_thread(self._repoint, moved)
            except StoreError as e:
                self._abort(str(e), store_dead=True)
                return None
            r.moved += len(moved)
        r.stages_s["check"] += time.perf_counter() - t
        self._progress(len(candidates) - len(fresh))
        return fresh

    def _repoint(self, moves: list[tuple[int, ImageFile]]) -> None:
        """Same content at a new path (renamed/moved file): update the entry, no re-encoding."""
        rows = []
        for cid, f in moves:
            e = self.store.get(cid, with_embedding=True)
            rows.append(Row(cid, f.rel, f.label, e.embedding))
        self.store.upsert(rows)

    async def _submit(self, loop, pool: ProcessPoolExecutor, items: list[tuple[ImageFile, int]]) -> None:
        if self.opt.triton_input == "bytes":
            await self._ensure_triton()  # what the workers do (read, or read + decode) depends on Triton
        paths = [str(f.path) for f, _ in items]
        if self.use_bytes:
            fut = loop.run_in_executor(pool, read_files, paths)
        else:
            fut = loop.run_in_executor(pool, decode_files, paths, self.opt.image_size, self.opt.max_pixels)
        await self._decode_q.put((fut, items))

    # --- stage 3: Triton --------------------------------------------------------------
    async def _encode_loop(self) -> None:
        r = self.report
        while True:
            item = await self._decode_q.get()
            if item is _DONE:
                return
            fut, items = item
            if self._stop.is_set():
                fut.cancel()
                continue
            try:
                dec: Decoded | Read = await fut
            except BrokenProcessPool as e:
                self._abort(f"a decode worker process died ({e}); re-run to resume")
                continue
            except Exception as e:  # noqa: BLE001 - never leave the queues undrained
                self._abort(f"decoding a batch failed unexpectedly: {type(e).__name__}: {e}")
                continue
            r.stages_s["decode"] += dec.seconds
            r.cpu_s["workers"] += dec.cpu_seconds
            for pos, code, msg in dec.errors:
                self._fail(items[pos][0], code, msg)
            if not dec.positions:
                continue
            try:
                await self._ensure_triton()
            except _Stop:
                continue
            t = time.perf_counter()
            self._busy(+1, t)
            try:
                if isinstance(dec, Read):
                    kept, enc, requests = await self._encode_files(dec, items)
                else:
                    pixels = dec.pixels
                    kept, requests = list(range(len(dec.positions))), 1
                    enc = await self._encode(lambda: self.encoder.encode(pixels))
            except _Stop:
                continue
            except TritonError as e:
                self._abort(self._triton_message(e))
                continue
            finally:
                self._busy(-1, time.perf_counter())
            r.stages_s["infer"] += time.perf_counter() - t
            r.batches += requests
            if not kept:
                continue
            if enc.shape[1] != self.dim:
                self._abort(f"Triton at {self.encoder.url} returns {enc.shape[1]}-d embeddings but the model card "
                            f"says {self.dim}: IMGSEARCH_TRITON_URL serves another model than "
                            "IMGSEARCH_MODEL_REPOSITORY describes")
                continue
            rows = []
            for j, k in enumerate(kept):
                f = items[dec.positions[k]][0]
                rows.append(Row(dec.ids[k], f.rel, f.label, enc[j]))
            await self._upsert_q.put(rows)

    def _busy(self, delta: int, now: float) -> None:
        """Track the time no Triton request is in flight: pipeline fill and starvation."""
        if self._inflight == 0 and delta > 0:
            self.report.triton_idle_s += now - self._idle_since
        self._inflight += delta
        if self._inflight == 0:
            self._idle_since = now

    async def _encode_files(self, read: Read, items: list[tuple[ImageFile, int]]) -> tuple[list[int], np.ndarray, int]:
        """Bytes mode: (indices into ``read`` that were encoded, their embeddings, requests that succeeded).

        Triton fails a request of several files as a whole when one is bad, so such a batch
        is sent again one file per request (concurrently: Triton batches them again) and
        each bad file is reported under its error code, as decode failures are in pixels mode.
        """
        blobs = read.blobs
        try:
            return list(range(len(blobs))), await self._encode(lambda: self.encoder.encode_bytes(blobs)), 1
        except ImageError as e:
            if len(blobs) == 1:
                self._fail(items[read.positions[0]][0], e.code, str(e))
                return [], np.zeros((0, self.dim), np.float32), 0
            self.report.split_batches += 1
            log.info("a batch of %d files was refused (%s); sending them one by one", len(blobs), str(e)[:200])
        results = await asyncio.gather(
            *[self._encode(lambda b=b: self.encoder.encode_bytes([b])) for b in blobs], return_exceptions=True)
        for res in results:  # Triton gone, queue full for too long, run stopped: as for any batch
            if isinstance(res, BaseException) and not isinstance(res, ImageError):
                raise res
        kept, embeddings = [], []
        for k, res in enumerate(results):
            if isinstance(res, ImageError):
                self._fail(items[read.positions[k]][0], res.code, str(res))
            else:
                kept.append(k)
                embeddings.append(res[0])
        enc = np.stack(embeddings) if embeddings else np.zeros((0, self.dim), np.float32)
        return kept, enc, len(kept)

    async def _encode(self, call) -> np.ndarray:
        """``await call()`` -> embeddings. Overloaded: backoff (``with_backoff``). Unavailable:
        retry until the deadline. A bad file (ImageError, bytes mode) is raised at once."""
        opt = self.opt
        deadline = None
        attempt = 0
        while True:
            if self._stop.is_set():
                raise _Stop
            try:
                res = await with_backoff(call, retries=opt.retries)
                return res.embeddings
            except TritonUnavailable as e:
                now = time.monotonic()
                deadline = deadline or now + opt.unavailable_timeout_s
                if now >= deadline:
                    raise TritonUnavailable(f"{e} (still failing after retrying for "
                                            f"{opt.unavailable_timeout_s:.0f}s)") from None
                attempt += 1
                delay = min(5.0, 0.25 * 2 ** attempt, deadline - now)
                log.warning("Triton unavailable (%s); retry %d in %.1fs", str(e)[:200], attempt, delay)
                await asyncio.sleep(delay)

    def _triton_message(self, e: TritonError) -> str:
        if isinstance(e, TritonOverloaded):
            return (f"Triton's queue stayed full after {self.opt.retries} retries with backoff ({e}); "
                    "lower --in-flight or --batch-size")
        if isinstance(e, TritonInvalidInput):
            return (f"Triton refused the batch ({e}); is --batch-size {self.opt.batch_size} above the "
                    "model's max_batch_size, or the image size not the model's input size?")
        return f"{e} [{self.encoder.url}]"

    # --- stage 4: Milvus ----------------------------------------------------------------
    async def _upserter(self) -> None:
        r = self.report
        finished = False
        while not finished:
            rows = await self._upsert_q.get()
            if rows is _DONE:
                return
            # take whatever else is ready: few large upserts when Milvus is the slower side,
            # prompt small ones (little to redo after a crash) when it is not
            while len(rows) < self.opt.upsert_rows and not self._upsert_q.empty():
                more = self._upsert_q.get_nowait()
                if more is _DONE:
                    finished = True
                    break
                rows = rows + more
            if self._store_dead:
                continue  # the store is gone: drain the queue, nothing to write to
            t = time.perf_counter()
            try:
                await asyncio.to_thread(self.store.upsert, rows, bulk=True)
            except EntryRefused as e:
                log.info("Milvus refused a batch of %d rows (%s); upserting them one by one", len(rows), str(e)[:200])
                rows = await self._upsert_one_by_one(rows)
            except StoreError as e:
                self._abort(str(e), store_dead=True)
                continue
            r.stages_s["upsert"] += time.perf_counter() - t
            r.indexed += len(rows)  # only now are these rows done
            self._progress(len(rows))

    async def _build_index(self) -> None:
        """Flush and wait for the vector index, so the first searches after a run are not the slow
        brute-force ones over unsealed rows; an interrupted run skips it, the next run builds."""
        r = self.report
        log.info("building the vector index of %s (flush, then wait for the index)", self.store.collection)
        t = time.perf_counter()
        try:
            state = await asyncio.to_thread(self.store.build_index)
        except StoreError as e:
            self._abort(f"index not built: {e}", store_dead=True)
            return
        r.stages_s["index"] = time.perf_counter() - t
        r.settings["index"] = state
        log.info("index %s: %s of %s rows indexed, built in %.1fs", state.get("index_type"),
                 state.get("indexed_rows"), state.get("total_rows"), r.stages_s["index"])

    async def _upsert_one_by_one(self, rows: list[Row]) -> list[Row]:
        """One refused row fails a whole upsert: keep the others, report each refused file."""
        kept = []
        for row in rows:
            if self._store_dead:
                break
            try:
                await asyncio.to_thread(self.store.upsert, [row])
                kept.append(row)
            except EntryRefused as e:
                self.report.add_failure(EntryRefused.code, printable(row.path), str(e))
                self._progress(1)
            except StoreError as e:
                self._abort(str(e), store_dead=True)
        return kept

    # --- --sync -------------------------------------------------------------------------
    async def _sync(self, scan: ScanResult) -> None:
        """Delete entries whose content is under the root no more; fix paths of moved copies."""
        r = self.report
        try:
            # a shard judges only the entries whose stored path is its own: another shard's
            # files are not in self.live, and deleting their entries would undo its work
            entries = await asyncio.to_thread(lambda: [e for e in self.store.iter_entries() if scan.owns(e.path)])
            unseen = [e for e in entries if e.id not in self.live and e.path not in self.unreadable]
            gone = await asyncio.to_thread(self._really_gone, unseen)
            stale = [(e.id, self.live[e.id][0]) for e in entries
                     if e.id in self.live and e.path not in self.live[e.id]]
            for i in range(0, len(gone), 1000):
                await asyncio.to_thread(self.store.delete, gone[i : i + 1000])
                r.deleted += len(gone[i : i + 1000])
            if stale:
                moves = [(cid, ImageFile(self.root / rel, rel, label_for(rel, self.root))) for cid, rel in stale]
                await asyncio.to_thread(self._repoint, moves)
                r.repointed = len(stale)
        except StoreError as e:
            self._abort(str(e), store_dead=True)


    def _really_gone(self, unseen: list) -> list[int]:
        """Ids of the entries whose content is under the root no more. An entry's file not seen
        by the scan may have been added since (``POST /v1/images`` during the run): it goes
        only when its path now holds other content (the scan read that path) or no file at all."""
        scanned = {rel for rels in self.live.values() for rel in rels}

        def present(rel: str) -> bool:
            path = self.root / rel
            return path.is_file() and path.resolve().is_relative_to(self.root)

        return [e.id for e in unseen if e.path in scanned or not present(e.path)]


def run_index(store: VectorStore, encoder: TritonEncoder, dim: int, scan: ScanResult,
              options: IndexOptions, pool: ProcessPoolExecutor | None = None) -> IndexReport:
    """Blocking wrapper: one event loop for the run; closes the encoder's channel after."""

    indexer = Indexer(store, encoder, dim, options, pool)

    async def main() -> IndexReport:
        try:
            return await indexer.run(scan)
        finally:
            await encoder.close()

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        # Ctrl-C: run() has drained what was encoded into Milvus on its way out
        if indexer.report is None:
            raise
        indexer.report.aborted = INTERRUPTED
        return indexer.report


__all__ = ["INTERRUPTED", "IndexOptions", "Indexer", "IndexReport", "run_index", "start_workers"]
