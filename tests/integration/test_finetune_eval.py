"""Fine-tune -> export -> serve (real tritonserver) -> evaluate, end to end on the CPU.

A small generated data set with separable classes (coloured shapes); resnet18 from
random weights, trained for a few epochs at 112 px (the served model takes 224). The
untrained baseline is the same pipeline with ``--epochs 0``: identical architecture,
random head, same export, same Triton, so only training differs.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision

from harness.data import make_dataset
from imgsearch import cli
from imgsearch.export.checkpoint import load_into_model, read_checkpoint
from imgsearch.export.evaluate import build_eval_set, evaluate_served
from imgsearch.export.model import ServingModel, mlp_head
from imgsearch.imaging import decode_image
from imgsearch.model_card import read_card, read_labels
from imgsearch.settings import get_settings
from imgsearch.triton_client import TritonEncoder
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

    async def encode():
        enc = TritonEncoder(served.grpc_url, "trained")
        try:
            return await enc.encode(pixels)
        finally:
            await enc.close()

    got = asyncio.run(encode())
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


@pytest.mark.slow
def test_seed_checkpoint_in_kaggle_layout_loads_and_exports(tmp_path):
    torch.manual_seed(1)
    m = torchvision.models.resnet152()
    m.fc = mlp_head(2048, 120)
    state = m.state_dict()
    for k in state:  # random statistics too, so a loader that skips buffers is caught by parity
        if k.endswith("running_mean"):
            state[k] = torch.randn_like(state[k]) * 0.1
        elif k.endswith("running_var"):
            state[k] = torch.rand_like(state[k]) + 0.5
    ckpt = tmp_path / "resnet152_dogs.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, ckpt)  # trained under DataParallel
    names = [f"breed_{i:03d}" for i in range(120)]
    (tmp_path / "labels.txt").write_text("\n".join(names) + "\n")
    repo = tmp_path / "repo"
    assert cli.main(["export", "--weights", str(ckpt), "--labels", str(tmp_path / "labels.txt"),
                     "--repository", str(repo), "--model-name", "dogs"]) == 0
    card = read_card(repo, "dogs")
    assert (card.arch, card.weights, card.num_classes, card.embedding_dim) == ("resnet152", "checkpoint:kaggle", 120, 2048)
    assert card.outputs == ["embedding", "probs"] and card.parity["min_cosine"] >= 0.9999
    assert read_labels(repo, "dogs") == names
    ck = read_checkpoint(ckpt)
    assert torch.equal(load_into_model(ck).state_dict()["layer3.5.bn1.running_var"], state["layer3.5.bn1.running_var"])


def _train_args(data: Path, out: Path, epochs: int) -> list[str]:
    return ["finetune", "--data", str(data), "--arch", "resnet18", "--weights", "random", "--batch-size", "8",
            "--workers", "0", "--image-size", "64", "--patience", "50", "--no-progress", "--epochs", str(epochs),
            "--out", str(out)]


def test_resume_continues_with_identical_state(tmp_path):
    make_dataset(tmp_path / "d", classes=3, per_class=8)
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    assert cli.main(_train_args(tmp_path / "d", a, 3)) == 0
    assert cli.main(_train_args(tmp_path / "d", b, 2)) == 0
    assert torch.load(b, weights_only=True)["epoch"] == 2
    assert cli.main(_train_args(tmp_path / "d", b, 3) + ["--resume"]) == 0
    A, B = (torch.load(p, weights_only=True) for p in (a, b))
    assert B["epoch"] == 3 and [m["epoch"] for m in B["metrics"]] == [1, 2, 3]
    strip = ("seconds",)
    assert [{k: v for k, v in m.items() if k not in strip} for m in A["metrics"]] == \
           [{k: v for k, v in m.items() if k not in strip} for m in B["metrics"]]
    for part in ("state_dict",):
        assert all(torch.equal(A[part][k], B[part][k]) for k in A[part])
    assert all(torch.equal(A["resume"]["model"][k], B["resume"]["model"][k]) for k in A["resume"]["model"])
    sa, sb = A["resume"]["optimizer"]["state"], B["resume"]["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i][n], sb[i][n]) for i in sa for n in sa[i])


def test_killed_run_resumes_from_its_last_completed_epoch(tmp_path):
    make_dataset(tmp_path / "d", classes=3, per_class=8)
    out = tmp_path / "k.pt"
    proc = subprocess.Popen([sys.executable, "-m", "imgsearch.cli", *_train_args(tmp_path / "d", out, 200)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and torch.load(out, weights_only=True)["epoch"] >= 2:
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # no chance to clean up: as after a crash or OOM kill
        proc.wait()
    saved = torch.load(out, weights_only=True)  # never half a file: written to a temp file, then renamed
    k = saved["epoch"]
    assert 2 <= k < 200
    assert cli.main(_train_args(tmp_path / "d", out, k + 1) + ["--resume"]) == 0
    after = torch.load(out, weights_only=True)
    assert after["epoch"] == k + 1 and [m["epoch"] for m in after["metrics"]] == list(range(1, k + 2))
    assert after["metrics"][:k] == saved["metrics"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # stale temp files cleaned


def test_finetune_imagenet_offline_fails_with_the_export_message(shapes, tmp_path):
    env = dict(os.environ, TORCH_HOME=str(tmp_path), HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9",
               https_proxy="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9", NO_PROXY="", no_proxy="")
    r = subprocess.run([sys.executable, "-m", "imgsearch.cli", "finetune", "--data", str(shapes), "--arch", "resnet18",
                        "--weights", "imagenet", "--out", str(tmp_path / "x.pt")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1
    assert "could not download torchvision's resnet18 ImageNet weights" in r.stderr
    assert "--weights random" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.pt").exists()
