"""Retrieval quality: copy detection offline and through the served stack, plus labelled retrieval.

Copy detection (imgsearch.export.copydetect): real photos shipped inside Python packages, edited
(crop, flip, rotation, downscale + heavy JPEG, greyscale, colour, overlays, aspect), must
find their original among the originals and 200 distractor photos. Side by side, in one run:

* ``packaged``: the ImageNet EfficientNet-Lite0 that ``--weights auto`` falls back to offline
  (what ``make demo`` serves on a machine without torchvision's weights), in PyTorch fp32;
* ``random_resnet152``: ResNet-152 with random weights (seed 0), what ``--weights random`` serves (the untrained baseline);
* ``phash``: a perceptual hash (imagehash), what users reach for without a model;
* ``served``: the packaged model exported to ONNX, served by the real tritonserver, the
  gallery indexed by ``imgsearch index`` into Milvus Lite, every query a ``POST /v1/search``
  to the gateway. ``served_lost`` lists the queries that PyTorch ranks first and the
  served stack does not (the target is none).

Labelled retrieval (``imgsearch eval``) on the demo folders (``imgsearch demo-data``), with
the packaged model before and after ``imgsearch finetune --weights packaged``; the eval's
queries are fine-tuning's held-out validation split (same split function, fraction, seed).

  python -m bench.quality --out bench/results/quality-$(date +%F).json
  python -m bench.quality --originals 6 --variants 1 --skip finetune random   # quick

Writes JSON (--out) and a markdown table beside it (.md).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import command_line
from harness.drive import drive
from harness.stack import REPO_ROOT, served_folder
from imgsearch.imaging import decode_image

MODULE = "bench.quality"  # run as python -m MODULE from the repository root
MODEL = "encoder"
PARTS = ("random", "served", "finetune")
TOP_K = 10


def embed_files(serving, paths: list[Path], batch: int = 32) -> np.ndarray:
    """PyTorch fp32 embeddings of files, decoded by the gateway's decoder."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(paths), batch):
            px = np.stack([decode_image(p.read_bytes()) for p in paths[i:i + batch]])
            out.append(serving(torch.from_numpy(px))[0].numpy())
    return np.concatenate(out)


def offline(cs, serving) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    g = embed_files(serving, [cs.root / "gallery" / r for r in cs.gallery])
    q = embed_files(serving, [cs.root / "queries" / r for r in cs.queries])
    return q @ g.T, time.perf_counter() - t0


def imgsearch(*args: str, env: dict[str, str]) -> None:
    cmd = [sys.executable, "-m", "imgsearch.cli", *args]
    r = subprocess.run(cmd, cwd=REPO_ROOT, env={**os.environ, **env}, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:])} failed ({r.returncode}):\n{r.stderr[-3000:]}")


async def search_all(url: str, files: list[Path], concurrency: int = 4) -> list[list[str]]:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        async def one(i: int) -> list[str]:
            p = files[i]
            r = await client.post("/v1/search", params={"top_k": TOP_K},
                                  files={"file": (p.name, p.read_bytes(), "image/png")})
            r.raise_for_status()
            return [h["path"] for h in r.json()["results"]]

        return (await drive(one, concurrency=concurrency, requests=len(files), raise_errors=True)).results()


def served(cs, repo: Path, work: Path) -> tuple[np.ndarray, float]:
    """Every query through the gateway, as ranks of its original."""
    from imgsearch.export.copydetect import ranks_from_lists

    t0 = time.perf_counter()
    with served_folder(cs.root / "gallery", repo, work, MODEL) as url:
        lists = asyncio.run(search_all(url, [cs.root / "queries" / r for r in cs.queries]))
    return ranks_from_lists(lists, cs), time.perf_counter() - t0


def labelled(work: Path, epochs: int) -> dict:
    """imgsearch eval on the demo folders: the packaged model, then after imgsearch finetune."""
    data = work / "demo"
    imgsearch("demo-data", str(data), env={})
    out: dict = {}
    before = work / "eval-before.json"
    imgsearch("eval", "--data", str(data), "--weights", "packaged", "--no-plot", "--out", str(before), env={})
    ckpt = work / "ft.pt"
    t0 = time.perf_counter()
    imgsearch("finetune", "--data", str(data), "--weights", "packaged", "--epochs", str(epochs),
              "--workers", "0", "--out", str(ckpt), env={})
    out["finetune_s"] = round(time.perf_counter() - t0, 1)
    after = work / "eval-after.json"
    imgsearch("eval", "--data", str(data), "--weights", str(ckpt), "--no-plot", "--out", str(after), env={})
    for name, path in (("before", before), ("after", after)):
        out[name] = json.loads(path.read_text())["summary"][0]
    out["epochs"] = epochs
    return out


def markdown(res: dict) -> str:
    from imgsearch.export.copydetect import EDITS

    rows = ["| model | recall@1 | recall@10 | mAP@10 | " + " | ".join(EDITS) + " |",
            "|---|---|---|---|" + "---|" * len(EDITS)]
    for name, m in res["copy_detection"].items():
        per = " | ".join(f"{m['per_edit'][k]['recall@1']:.2f}" for k in EDITS)
        rows.append(f"| {name} | {m['recall@1']:.3f} | {m['recall@10']:.3f} | {m['mAP@10']:.3f} | {per} |")
    text = [f"Copy detection, {res['set']['queries']} queries, {res['set']['gallery']} gallery images "
            f"({res['set']['originals']} originals); per-edit columns are recall@1.", "", *rows, ""]
    if "served_lost" in res:
        text.append(f"Served path: {len(res['served_lost'])} queries ranked first offline and not through the gateway.")
    if "labelled" in res:
        lab = res["labelled"]
        text += ["", "Labelled retrieval on the demo folders (imgsearch eval):", "",
                 "| model | " + " | ".join(lab["before"]) + " |", "|---|" + "---|" * len(lab["before"]),
                 "| packaged | " + " | ".join(str(v) for v in lab["before"].values()) + " |",
                 f"| packaged + finetune ({lab['epochs']} epochs) | "
                 + " | ".join(str(lab["after"].get(k)) for k in lab["before"]) + " |"]
    return "\n".join(text) + "\n"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("loadtest/out/quality.json"))
    ap.add_argument("--variants", type=int, default=2, help="edited copies per original and edit (default: 2)")
    ap.add_argument("--distractors", type=int, default=200, help="LFW faces in the gallery (default: 200)")
    ap.add_argument("--originals", type=int, default=None, help="use only the first N originals")
    ap.add_argument("--finetune-epochs", type=int, default=3)
    ap.add_argument("--skip", nargs="*", default=[], choices=PARTS, help="parts to leave out")
    ap.add_argument("--work", type=Path, default=None, help="keep the set and databases here (default: temporary)")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)

    import torch

    from imgsearch.export.checkpoint import packaged_model, random_model
    from imgsearch.export.copydetect import (
        build,
        metrics,
        phash_scores,
        ranks_from_scores,
    )
    from imgsearch.export.model import ServingModel
    from imgsearch.export.onnx_export import export_model

    torch.set_num_threads(os.cpu_count() or 1)
    tmp = tempfile.TemporaryDirectory(prefix="quality-") if args.work is None else None
    work = Path(tmp.name) if tmp else args.work
    work.mkdir(parents=True, exist_ok=True)
    cs = build(work / "set", variants=args.variants, distractors=args.distractors, originals=args.originals)
    n_orig = len({t for t in cs.truth})
    res: dict = {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, no GPU",
                 "command": command_line(MODULE, argv),
                 "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                 "set": {"originals": n_orig, "gallery": len(cs.gallery), "queries": len(cs.queries),
                         "variants": args.variants}, "copy_detection": {}, "seconds": {}}
    net, _, tag, _ = packaged_model()
    pk = ServingModel(net, "linear", "pool", arch="efficientnet_lite0").eval()
    scores, secs = offline(cs, pk)
    ranks_pk = ranks_from_scores(scores, cs.truth)
    res["copy_detection"]["packaged"] = metrics(ranks_pk, cs.kinds, TOP_K)
    res["seconds"]["packaged"] = round(secs, 1)
    if "random" not in args.skip:
        rn = ServingModel(random_model("resnet152", 0), "none", "pool").eval()
        scores, secs = offline(cs, rn)
        res["copy_detection"]["random_resnet152"] = metrics(ranks_from_scores(scores, cs.truth), cs.kinds, TOP_K)
        res["seconds"]["random_resnet152"] = round(secs, 1)
    t0 = time.perf_counter()
    res["copy_detection"]["phash"] = metrics(ranks_from_scores(phash_scores(cs), cs.truth), cs.kinds, TOP_K)
    res["seconds"]["phash"] = round(time.perf_counter() - t0, 1)
    if "served" not in args.skip:
        repo = work / "repo"
        export_model(weights="packaged", repository=repo, model_name=MODEL)
        ranks_sv, secs = served(cs, repo, work)
        res["copy_detection"]["served"] = metrics(ranks_sv, cs.kinds, TOP_K)
        res["seconds"]["served"] = round(secs, 1)
        res["served_lost"] = [cs.queries[i] for i in np.where((ranks_pk == 0) & (ranks_sv != 0))[0]]
    if "finetune" not in args.skip:
        res["labelled"] = labelled(work, args.finetune_epochs)
    res["misses_packaged"] = [f"{cs.queries[i]} -> rank {int(ranks_pk[i]) + 1}" for i in np.where(ranks_pk > 0)[0]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    md = markdown(res)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
