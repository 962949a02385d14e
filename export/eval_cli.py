"""Measure retrieval quality through the served model (Triton), as users get it.

The labelled folder (ImageFolder layout) is split per class, deterministically with
--seed: 20% queries, the rest is the gallery. Every image is decoded by the gateway's
decoder and encoded by Triton; the search is an exact cosine top-k in numpy.

reports (eval.json, + a PNG with per-class recall@1 and query -> results strips):
  recall@1/5/10 (a result with the query's label), mAP@10,
  breed top-1 from probs (via labels.txt) and from a score-weighted vote of the top 10,
  near-duplicate recall@1: crop / flip / colour / JPEG-recompressed copies of gallery
  images must find their original first.

which model:
  default        the served model: IMGSEARCH_TRITON_URL, or a local tritonserver started
                 on IMGSEARCH_MODEL_REPOSITORY (model IMGSEARCH_MODEL_NAME)
  --weights W    export W (a checkpoint, random or imagenet) once per --embedding kind into
                 a temporary model repository, serve it locally, evaluate each side by side

examples:
  imgsearch eval --data data/stanford-dogs/Images --out eval.json
  imgsearch eval --data Images --queries my_queries/ --out eval.json
  imgsearch eval --data Images --weights ckpt.pt --compare-embeddings --out compare.json
  imgsearch eval --data Images --weights ckpt.pt --embedding pool --embedding head
"""

from __future__ import annotations

import argparse
from pathlib import Path

from imgsearch.settings import get_settings

EMBEDDINGS = ("pool", "head", "logits")


def add_arguments(p: argparse.ArgumentParser) -> None:
    s = get_settings()
    p.add_argument("--data", type=Path, required=True, help="labelled image folders: DIR/<class>/<image>")
    p.add_argument("--queries", default="split", metavar="split|DIR",
                   help="'split' (a per-class share of --data) or a labelled query folder (default: %(default)s)")
    p.add_argument("--query-fraction", type=float, default=0.2, help="share of each class used as queries (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="split and near-duplicate seed (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("eval.json"), help="report (default: %(default)s); PNGs next to it")
    p.add_argument("--weights", default=None, metavar="PATH|random|imagenet",
                   help="export these weights per --embedding into a temporary repository and evaluate them")
    p.add_argument("--arch", default=None, help="with --weights random|imagenet: the ResNet to build")
    p.add_argument("--embedding", action="append", choices=EMBEDDINGS, default=None,
                   help="embedding kind to export and compare (repeatable; needs --weights)")
    p.add_argument("--compare-embeddings", action="store_true", help="same as --embedding pool --embedding head --embedding logits")
    p.add_argument("--repository", type=Path, default=s.model_repository,
                   help="model repository of the served model (labels.txt, model card) (default: %(default)s)")
    p.add_argument("--model-name", default=s.model_name, help="(default: %(default)s)")
    p.add_argument("--near-duplicates", type=int, default=50, help="gallery images to copy and edit (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="images per Triton request (default: %(default)s)")
    p.add_argument("--examples", type=int, default=4, help="query -> results strips in the PNG (default: %(default)s)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")


def run(args: argparse.Namespace) -> int:
    import json
    import logging
    import tempfile
    from contextlib import ExitStack

    from imgsearch.errors import ModelRepositoryError
    from imgsearch.model_card import read_card, read_labels
    from imgsearch.triton_server import LocalTriton, triton_for

    from . import evaluate as ev

    log = logging.getLogger("imgsearch.eval")
    s = get_settings()
    kinds = list(EMBEDDINGS) if args.compare_embeddings else list(dict.fromkeys(args.embedding or []))
    evalset = ev.build_eval_set(args.data, args.queries, args.query_fraction, args.seed)
    print(f"{len(evalset.gallery)} gallery / {len(evalset.queries)} query images, "
          f"{len(evalset.gallery.class_names)} classes")
    reports: list[dict] = []
    with ExitStack() as stack:
        if args.weights:
            from .onnx_export import export_model

            repo = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="imgsearch-eval-")))
            names = []
            for kind in kinds or ["pool"]:
                try:
                    res = export_model(weights=args.weights, arch=args.arch, embedding=kind, repository=repo,
                                       model_name=f"eval_{kind}")
                except ValueError as e:  # e.g. head/logits of a model without a classifier head
                    print(f"skipping --embedding {kind}: {e}")
                    continue
                names.append(res.card.name)
            server = stack.enter_context(LocalTriton(repo, "cpu", exit_timeout_s=5))
            url, protocol = server.grpc_url, "grpc"
        else:
            repo, names = args.repository, [args.model_name]
            triton = stack.enter_context(triton_for(s, repo))
            url, protocol = triton.url, triton.protocol
        for name in names:
            try:
                card = read_card(repo, name)
                info = {"name": name, "arch": card.arch, "embedding": card.embedding,
                        "embedding_dim": card.embedding_dim, "weights": card.weights, "model_sha": card.model_sha,
                        "num_classes": card.num_classes}
                labels = read_labels(repo, name)
            except ModelRepositoryError as e:
                log.warning("%s: breed accuracy from probs needs labels.txt", e)
                info, labels = {"name": name}, []
            if kinds and not args.weights and info.get("embedding") not in kinds:
                print(f"the served model gives {info.get('embedding')} embeddings; "
                      "pass --weights CKPT to export and compare other kinds")
                return 2
            print(f"evaluating {name} ({info.get('embedding', '?')} embedding) via Triton at {url} ...")
            rep = ev.evaluate_served(url, name, evalset, labels, info, protocol=protocol,
                                     near_dup=args.near_duplicates, batch_size=args.batch_size,
                                     seed=args.seed, examples=args.examples)
            reports.append(rep)
    if not reports:
        print("nothing was evaluated")
        return 1
    rows = [ev.summary_row(r) for r in reports]
    best = ev.recommend(rows)
    out = {"runs": reports, "summary": rows,
           "recommended_embedding": best["embedding"] if len(rows) > 1 else None}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(ev.format_table(rows))
    if len(rows) > 1:
        print(f"recommended: --embedding {best['embedding']} (highest mAP@{ev.MAP_K}; within {ev.TIE} counts as a tie, "
              "then recall@1, then near-duplicate recall)")
    if not args.no_plot:
        for r in reports:
            suffix = f"-{r['model'].get('embedding')}" if len(reports) > 1 else ""
            png = ev.plot_report(r, args.out.with_name(f"{args.out.stem}{suffix}.png"))
            print(f"plot: {png}")
    print(f"report: {args.out}")
    return 0
