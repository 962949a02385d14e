"""Encode a folder of images through Triton into Milvus.

Every image under IMAGE_ROOT is decoded in worker processes, sent to Triton in batches
(several requests in flight) and upserted into the Milvus collection with an id derived
from the file's content. The top folder name is the label (a Stanford-Dogs prefix such
as "n02085620-" is stripped: n02085620-Chihuahua -> Chihuahua); a flat folder gives an
empty label.

Re-running is safe and cheap: content already in the collection is skipped without
decoding or encoding ("unchanged"), and a run killed at any point (Ctrl-C, SIGKILL, a
dead Triton) resumes where it stopped when run again, with no duplicates. Broken files
are reported by reason and skipped.

examples:
  imgsearch index data/images                      # starts the local Triton itself
  imgsearch index data/stanford-dogs/Images --limit 500
  IMGSEARCH_TRITON_URL=127.0.0.1:8101 imgsearch index data/images --in-flight 4
  imgsearch index data/images --sync               # also remove entries of deleted files
  imgsearch index data/images --recreate           # new model exported: start over
  imgsearch index data/images --json report.json   # full report, every failed file
  imgsearch index /images --shard 2/8              # this machine's eighth (pods 0..7 share a folder)

sharding: --shard K/N takes the files whose path relative to IMAGE_ROOT hashes into shard
K of N (K from 0, like a Kubernetes Indexed Job's JOB_COMPLETION_INDEX). N processes on
any machines, one per K, index disjoint parts of one folder into one Milvus server; their
union is what a single run gives, ids are content hashes so nothing is stored twice, and
each shard resumes on its own. The folder must look the same to every shard (same tree
under the root, any mount point). With --sync a shard deletes only entries whose stored
path is in its own shard: run --sync after the indexing runs of all shards have finished
(docs/indexer.md, "Sharding"). --recreate is refused with --shard (one shard would drop
the others' work): drop the collection once before (imgsearch collection drop).

settings (environment): IMGSEARCH_TRITON_URL (unset = start the local tritonserver from
IMGSEARCH_MODEL_REPOSITORY), IMGSEARCH_MILVUS_URI (default ./data/milvus.db, Milvus Lite;
http://host:19530 for a Milvus server), IMGSEARCH_COLLECTION, IMGSEARCH_MODEL_NAME,
IMGSEARCH_TRITON_INPUT=bytes (send the files undecoded to Triton's image_search ensemble,
which decodes them, nvJPEG on a GPU; falls back to decoding here when Triton lacks it).
The model card (<repository>/<model>/model_card.json) gives the embedding size and the
model sha that the collection is tied to: a collection built by another model is an
error that tells you to use --recreate or another --collection.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from .scan import Shard, parse_shard

log = logging.getLogger(__name__)

# Shards of an Indexed Job start together: all may find the collection missing and create
# it at once. The losers get "already exists" (or, from a store older than the one-call create,
# a collection whose properties are still being set); they wait this long for the winner's.
CREATE_RACE_WAIT_S = 30.0


def shard_arg(text: str) -> Shard:
    try:
        return parse_shard(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--shard {text!r}: ")) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image_root", nargs="?", type=Path, metavar="IMAGE_ROOT",
                   help="folder of images or of label folders (default: IMGSEARCH_IMAGE_ROOT, data/images)")
    p.add_argument("--collection", help="Milvus collection (default: IMGSEARCH_COLLECTION, images)")
    p.add_argument("--batch-size", type=int, default=32, help="images per Triton request (default: 32)")
    p.add_argument("--workers", type=int, default=0,
                   help="decode processes (default: one per CPU core, at most 8)")
    p.add_argument("--in-flight", type=int, default=2, help="concurrent Triton requests (default: 2)")
    p.add_argument("--limit", type=int, help="index only the first N files (sorted by path)")
    p.add_argument("--shard", type=shard_arg, metavar="K/N",
                   help="index only shard K of N (K = 0..N-1) of the files, by a stable hash of their path "
                        "relative to IMAGE_ROOT; N runs with K = 0..N-1 cover every file once")
    p.add_argument("--recreate", action="store_true",
                   help="drop the collection first (needed after exporting another model)")
    p.add_argument("--sync", action="store_true",
                   help="after indexing, delete entries whose content is no longer under IMAGE_ROOT "
                        "(entries shared with a copy at another path are kept and re-pointed)")
    p.add_argument("--retry-for", type=float, default=30.0, metavar="SECONDS",
                   help="how long to keep retrying an unreachable Triton before stopping (default: 30)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the full report (every failed file) as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def quiet_libraries() -> None:
    """Milvus Lite and faiss log start-up chatter at INFO; keep it unless -v was given."""
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        return
    for name in ("faiss", "milvus_lite"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # with Milvus Lite the query iterator warns on every use that it falls back to client time;
    # pymilvus configures its loggers when imported (resetting children), so import it first
    import pymilvus  # noqa: F401

    logging.getLogger("pymilvus.client.iterator").setLevel(logging.ERROR)
    # pymilvus probes AllocTimestamp, which Milvus Lite's in-process server does not implement;
    # grpc logs that as an ERROR with a traceback although the client handles it.
    logging.getLogger("grpc._server").setLevel(logging.CRITICAL)


def open_store(store, card, recreate: bool, wait_for_creator: bool) -> None:
    """Open (or create) the collection; a shard waits out another shard that is creating it."""
    from imgsearch.errors import CollectionMismatch, StoreError, StoreUnavailable
    from imgsearch.store import PROP_SHA

    description = f"{card.name} ({card.arch}, {card.weights})"
    deadline = time.monotonic() + (CREATE_RACE_WAIT_S if wait_for_creator else 0)
    while True:
        try:
            store.open(card.embedding_dim, card.model_sha, description, recreate=recreate, patient=True)
            return
        except CollectionMismatch:
            # a collection without model properties yet is one another shard is creating
            if time.monotonic() >= deadline or PROP_SHA in store.properties():
                raise
        except StoreError as e:
            # lost the race to create it: open the winner's. Milvus Lite's server makes the
            # collection's folder before it lists the collection, so a create in that gap is
            # answered "File exists" while has_collection still says no: an answered error is
            # tried again (and the next try finds the collection), one from a silent Milvus is not.
            if time.monotonic() >= deadline or not (store.exists() or (isinstance(e, StoreUnavailable) and e.answered)):
                raise
        time.sleep(0.5)


def run(args: argparse.Namespace) -> int:
    from imgsearch.model_card import read_card
    from imgsearch.settings import Settings
    from imgsearch.store import VectorStore
    from imgsearch.triton_client import TritonEncoder
    from imgsearch.triton_server import triton_for

    from .pipeline import (
        INTERRUPTED,
        IndexOptions,
        default_workers,
        run_index,
        start_workers,
    )
    from .scan import scan

    settings = Settings()  # fresh: the environment is the interface
    quiet_libraries()
    if args.sync and args.limit:
        print("imgsearch index: --sync needs the whole folder: it cannot be combined with --limit", file=sys.stderr)
        return 2
    if args.shard and args.recreate:
        print("imgsearch index: --recreate cannot be combined with --shard: each shard would drop what the "
              "others wrote. Drop the collection once (imgsearch collection drop --yes), then start the shards.",
              file=sys.stderr)
        return 2
    for name in ("batch_size", "in_flight"):
        if getattr(args, name) < 1:
            print(f"imgsearch index: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    root = args.image_root or settings.image_root
    try:
        found = scan(root, args.limit, args.shard)
    except (NotADirectoryError, OSError) as e:
        print(f"imgsearch index: {e}", file=sys.stderr)
        return 2
    card = read_card(settings.model_repository, settings.model_name)
    store = VectorStore.from_settings(settings, args.collection)
    workers = args.workers or default_workers()
    pool = start_workers(workers)  # spawning while Milvus and Triton start
    try:
        open_store(store, card, args.recreate, wait_for_creator=args.shard is not None)
        part = f" (shard {found.shard}; {found.other_shards} more in the other shards)" if found.shard else ""
        print(f"{len(found.files)} image files under {found.root}{part} -> collection {store.collection!r} "
              f"at {store.uri} ({card.arch}, {card.embedding_dim}-d, model sha {card.model_sha})", file=sys.stderr)
        opts = IndexOptions(batch_size=args.batch_size, workers=workers, in_flight=args.in_flight,
                            retries=settings.triton_retries, unavailable_timeout_s=args.retry_for,
                            image_size=card.input_size, max_pixels=settings.max_pixels,
                            triton_input=settings.triton_input,
                            sync=args.sync, progress=not args.no_progress)
        if not settings.triton_url:
            print(f"IMGSEARCH_TRITON_URL is not set: starting the local tritonserver on "
                  f"{settings.model_repository} (config {settings.model_config_name})...", file=sys.stderr)
        with triton_for(settings) as triton:
            encoder = TritonEncoder(triton.url, settings.model_name, triton.protocol, settings.triton_timeout_s,
                                    ensemble_name=settings.ensemble_name)
            report = run_index(store, encoder, card.embedding_dim, found, opts, pool)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # no-op after a run; frees workers after an error
        store.close()
    print(report.summary())
    if args.json:
        report.write_json(args.json)
    if report.aborted:
        print(f"imgsearch index: stopped: {report.aborted}\n"
              f"{report.indexed} images were upserted before that and are kept; re-run to resume.", file=sys.stderr)
        return 130 if report.aborted == INTERRUPTED else 1
    return 0
