"""`imgsearch finetune` and `export` on their own: the original project's checkpoint layout,
resuming (after a clean stop and after a SIGKILL), and the offline ImageNet message. The
end-to-end fine-tune -> serve -> evaluate run is in test_finetune_eval.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision

from harness.data import make_dataset
from imgsearch import cli
from imgsearch.export.checkpoint import load_into_model, read_checkpoint
from imgsearch.export.model import mlp_head
from imgsearch.model_card import read_card, read_labels

pytestmark = pytest.mark.integration


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


def test_finetune_imagenet_offline_fails_with_the_export_message(tmp_path):
    shapes = tmp_path / "shapes"
    make_dataset(shapes, classes=2, per_class=2)
    env = dict(os.environ, TORCH_HOME=str(tmp_path), HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9",
               https_proxy="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9", NO_PROXY="", no_proxy="")
    r = subprocess.run([sys.executable, "-m", "imgsearch.cli", "finetune", "--data", str(shapes), "--arch", "resnet18",
                        "--weights", "imagenet", "--out", str(tmp_path / "x.pt")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1
    assert "could not download torchvision's resnet18 ImageNet weights" in r.stderr
    assert "--weights random" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.pt").exists()


def test_finetune_from_the_packaged_weights_exports_and_serves(tmp_path):
    """The pretrained default of `make demo` fine-tuned (last two stages + head), exported and
    served by the real tritonserver: its own embeddings and probs over the folder's classes."""
    import numpy as np

    from harness.stack import encode_served
    from imgsearch.export.model import ServingModel
    from imgsearch.imaging import decode_image
    from imgsearch.triton_server import LocalTriton

    data = tmp_path / "data"
    make_dataset(data, classes=3, per_class=6)
    ckpt, repo = tmp_path / "ft.pt", tmp_path / "repo"
    assert cli.main(["finetune", "--data", str(data), "--weights", "packaged", "--epochs", "1", "--batch-size", "8",
                     "--workers", "0", "--image-size", "112", "--no-progress", "--seed", "0",
                     "--out", str(ckpt)]) == 0
    ck = read_checkpoint(ckpt)
    assert (ck.kind, ck.arch, ck.head, ck.class_names) == ("finetune", "efficientnet_lite0", "mlp",
                                                          [f"class_{c}" for c in range(3)])
    assert cli.main(["export", "--weights", str(ckpt), "--repository", str(repo), "--model-name", "ft"]) == 0
    card = read_card(repo, "ft")
    assert (card.arch, card.num_classes, card.embedding_dim, card.weights) == (
        "efficientnet_lite0", 3, 1280, "checkpoint:finetune")
    assert read_labels(repo, "ft") == ck.class_names

    files = [sorted((data / f"n{c:08d}-class_{c}").iterdir())[0] for c in range(3)]
    pixels = np.stack([decode_image(f.read_bytes()) for f in files])

    with LocalTriton(repo, "cpu", exit_timeout_s=5) as server:
        got = encode_served(server.grpc_url, "ft", pixels)
    with torch.no_grad():
        ref = ServingModel(load_into_model(ck), "mlp", "pool", arch=ck.arch).eval()(torch.from_numpy(pixels))
    np.testing.assert_allclose(got.embeddings, ref[0].numpy(), atol=1e-4)
    np.testing.assert_allclose(got.probs, ref[1].numpy(), atol=1e-4)
