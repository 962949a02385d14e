"""Inspect or drop the Milvus collection the indexer fills.

stats prints the number of entries, entries per label, the embedding size and the model
sha the collection is tied to (the model card's), and the index: type, state, rows indexed
and pending as Milvus reports them, and the last build `imgsearch index` waited for. drop deletes the
collection and everything in it; it asks first unless --yes is given.

examples:
  imgsearch collection stats
  imgsearch collection stats --json
  imgsearch collection stats --collection dogs
  imgsearch collection drop --yes
  IMGSEARCH_MILVUS_URI=http://127.0.0.1:19530 imgsearch collection stats
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--collection", help="(default: IMGSEARCH_COLLECTION, images)")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = sub.add_parser("stats", help="entries, labels, dim, model sha, index state")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--top", type=int, default=20, help="labels to list (default: 20)")
    d = sub.add_parser("drop", help="delete the collection")
    d.add_argument("--yes", "-y", action="store_true", help="do not ask")
    for sp in (s, d):  # --collection works before or after the action
        sp.add_argument("--collection", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    from imgsearch.settings import Settings
    from imgsearch.store import VectorStore

    from .cli import quiet_libraries

    settings = Settings()
    quiet_libraries()
    store = VectorStore.from_settings(settings, args.collection)
    try:
        if not store.exists():
            print(f"no collection {store.collection!r} at {store.uri}", file=sys.stderr)
            return 1
        if args.action == "stats":
            _load(store)
            return _stats(store, args)
        return _drop(store, args)
    finally:
        store.close()


def _load(store) -> None:
    """Load the collection (Milvus Lite starts with it released) through the guarded open,
    with the dim and model sha the collection itself records, so it checks nothing new."""
    from imgsearch.store import PROP_DIM, PROP_MODEL, PROP_SHA

    props = store.properties()
    store.open(int(props.get(PROP_DIM) or 0), props.get(PROP_SHA) or "", props.get(PROP_MODEL) or "")


def _stats(store, args) -> int:
    st = store.stats()
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"collection {st['collection']} at {st['uri']}")
    print(f"  entries   {st['count']}")
    print(f"  model     {st['model']} (sha {st['model_sha']}), {st['dim']}-d embeddings")
    ix = st["index"]
    params = ", ".join(f"{k}={v}" for k, v in ix["params"].items())
    print(f"  index     {ix['index_type']} / {ix['metric_type']}" + (f" ({params})" if params else "")
          + f": {ix['state']}, {ix['indexed_rows']} of {ix['total_rows']} rows indexed, "
          f"{ix['pending_index_rows']} pending")
    built = ix["last_build"]
    print("  built     " + (f"over {built['rows']} rows in {built['seconds']:.1f}s (flush + index, last `imgsearch "
                             "index` run)" if built else "never by `imgsearch index`: rows written since may be "
                             "searched brute force until the next run"))
    labels = st["labels"]
    print(f"  labels    {len(labels)}" + (" (entries per label, most first)" if labels else ""))
    for label, n in sorted(labels.items(), key=lambda kv: (-kv[1], kv[0]))[: args.top]:
        print(f"    {n:8d}  {label or '(no label)'}")
    if len(labels) > args.top:
        print(f"    ... {len(labels) - args.top} more (--top N, or --json)")
    return 0


def _drop(store, args) -> int:
    if not args.yes:
        if not sys.stdin.isatty():
            print("imgsearch collection drop: not a terminal to ask on; pass --yes to drop", file=sys.stderr)
            return 2
        _load(store)
        n = store.count()
        answer = input(f"drop collection {store.collection!r} at {store.uri} with {n} entries? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing dropped")
            return 1
    store.drop()
    print(f"dropped collection {store.collection!r} at {store.uri}")
    return 0
