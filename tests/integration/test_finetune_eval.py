"""Fine-tune -> export -> serve (real tritonserver) -> evaluate, end to end on the CPU.

A small generated data set with separable classes (coloured shapes); resnet18 from
random weights, trained for a few epochs at 112 px (the served model takes 224). The
untrained baseline is the same pipeline with ``--epochs 0``: identical architecture,
random head, same export, same Triton, so only training differs.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from harness.data import make_dataset
from harness.stack import encode_served
from imgsearch import cli
from imgsearch.export.checkpoint import load_into_model, read_checkpoint
from imgsearch.export.evaluate import build_eval_set, evaluate_served
from imgsearch.export.model import ServingModel
from imgsearch.imaging import decode_image
from imgsearch.model_card import read_card, read_labels
from imgsearch.settings import get_settings
from imgsearch.triton_server import LocalTriton

pytestmark = pytest.mark.integration

CLASSES, PER_CLASS, EPOCHS = 8, 15, 8
TRAIN = ["--arch", "resnet18", "--weights", "random", "--batch-size", "16", "--workers", "0",
         "--image-size", "112", "--patience", "4", "--no-progress", "--seed", "0"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    make_dataset(root, classes=CLASSES, per_class=PER_CLASS)
    return root


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory):
    """Untrained (--epochs 0) and fine-tuned checkpoints, both exported with `imgsearch export`."""
    d = tmp_path_factory.mktemp("finetune")
    assert cli.main(["finetune", "--data", str(shapes), *TRAIN, "--epochs", "0", "--out", str(d / "untrained.pt")]) == 0
    t0, c0 = time.monotonic(), time.process_time()
    assert cli.main(["finetune", "--data", str(shapes), *TRAIN, "--epochs", str(EPOCHS),
                     "--out", str(d / "trained.pt")]) == 0
    print(f"\nfine-tuning: {time.monotonic() - t0:.1f}s wall, {time.process_time() - c0:.1f}s CPU")
    repo = d / "repo"
    for name in ("untrained", "trained"):
        assert cli.main(["export", "--weights", str(d / f"{name}.pt"), "--repository", str(repo),
                         "--model-name", name]) == 0
    return SimpleNamespace(dir=d, repo=repo)


@pytest.fixture(scope="module")
def served(trained):
    with LocalTriton(trained.repo, "cpu", exit_timeout_s=5) as server:
        yield server


@pytest.fixture(scope="module")
def reports(shapes, trained, served):
    evalset = build_eval_set(shapes)  # the default: a 20% split per class, seed 0
    out = {}
    for name in ("untrained", "trained"):
        out[name] = evaluate_served(served.grpc_url, name, evalset, read_labels(trained.repo, name),
                                    {"name": name}, near_dup=10)
        print(f"{name}: " + json.dumps({k: out[name][k] for k in ("retrieval", "breed")}))
    return out


def test_finetuning_beats_the_untrained_model_through_triton(reports):
    u, t = reports["untrained"], reports["trained"]
    chance = 1 / CLASSES
    assert t["data"]["queries"] == u["data"]["queries"] >= 2 * CLASSES
    # breed from probs: a random head is at chance; a wired-wrong head or label order stays there
    assert u["breed"]["probs_top1"] <= chance + 0.25
    assert t["breed"]["probs_top1"] >= chance + 0.45
    # retrieval on the served embeddings
    assert t["retrieval"]["recall@1"] >= u["retrieval"]["recall@1"] + 0.1
    assert t["retrieval"]["mAP@10"] >= u["retrieval"]["mAP@10"] + 0.3
    assert t["breed"]["knn@10_top1"] >= 0.8
    # a lightly re-compressed copy of a gallery image finds its original first, in both models
    for r in (u, t):
        assert r["near_duplicate"]["by_kind"]["jpeg"] >= 0.8, r["near_duplicate"]



def test_round_trip_checkpoint_export_labels_and_served_probs(shapes, trained, served):
    ck = read_checkpoint(trained.dir / "trained.pt")  # torch.load(weights_only=True) inside
    names = [f"class_{c}" for c in range(CLASSES)]  # from n0000000c-class_c folders
    assert (ck.kind, ck.arch, ck.head, ck.class_names) == ("finetune", "resnet18", "mlp", names)
    assert read_labels(trained.repo, "trained") == names
    card = read_card(trained.repo, "trained")
    assert (card.num_classes, card.embedding_dim, card.weights) == (CLASSES, 512, "checkpoint:finetune")

    # one image per class: Triton's probs are the checkpoint's own head, and argmax maps to the folder's name
    files = [sorted((shapes / f"n{c:08d}-class_{c}").iterdir())[0] for c in range(CLASSES)]
    pixels = np.stack([decode_image(f.read_bytes()) for f in files])

    got = encode_served(served.grpc_url, "trained", pixels)
    with torch.no_grad():
        ref = ServingModel(load_into_model(ck), "mlp", "pool").eval()(torch.from_numpy(pixels))
    np.testing.assert_allclose(got.embeddings, ref[0].numpy(), atol=1e-4)
    np.testing.assert_allclose(got.probs, ref[1].numpy(), atol=1e-4)
    predicted = [read_labels(trained.repo, "trained")[i] for i in got.probs.argmax(1)]
    assert sum(p == n for p, n in zip(predicted, names)) >= CLASSES - 2, predicted


def test_eval_cli_compares_embeddings_side_by_side(shapes, trained, reports, tmp_path, capsys):
    out = tmp_path / "compare.json"
    assert cli.main(["eval", "--data", str(shapes), "--weights", str(trained.dir / "trained.pt"),
                     "--compare-embeddings", "--near-duplicates", "5", "--examples", "2", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    runs = {r["model"]["embedding"]: r for r in rep["runs"]}
    assert list(runs) == ["pool", "head", "logits"]
    assert [runs[k]["model"]["embedding_dim"] for k in runs] == [512, 256, CLASSES]
    best = next(r for r in rep["summary"] if r["embedding"] == rep["recommended_embedding"])
    assert best["mAP@10"] >= max(r["mAP@10"] for r in rep["summary"]) - 0.01  # chosen by measurement
    # the pool run exports the same checkpoint the fixture exported: same figures
    for key in ("recall@1", "recall@5", "mAP@10"):
        assert runs["pool"]["retrieval"][key] == pytest.approx(reports["trained"]["retrieval"][key], abs=1e-6)
    assert runs["pool"]["breed"]["probs_top1"] == pytest.approx(reports["trained"]["breed"]["probs_top1"])
    for kind in runs:
        png = tmp_path / f"compare-{kind}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert f"recommended: --embedding {best['embedding']}" in printed and "mAP@10" in printed


def test_eval_cli_evaluates_the_served_model_named_by_env(shapes, trained, served, reports, tmp_path, monkeypatch):
    for k in list(os.environ):
        if k.startswith("IMGSEARCH_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("IMGSEARCH_TRITON_URL", served.grpc_url)
    get_settings.cache_clear()
    try:
        rc = cli.main(["eval", "--data", str(shapes), "--repository", str(trained.repo), "--model-name", "trained",
                       "--near-duplicates", "10", "--no-plot", "--out", str(tmp_path / "e.json")])
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert rc == 0
    rep = json.loads((tmp_path / "e.json").read_text())["runs"][0]
    assert rep["model"]["name"] == "trained" and rep["model"]["embedding"] == "pool"
    assert rep["retrieval"] == pytest.approx(reports["trained"]["retrieval"], abs=1e-6)
    assert rep["near_duplicate"]["recall@1"] == pytest.approx(reports["trained"]["near_duplicate"]["recall@1"])
