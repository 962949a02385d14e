"""Export end to end: what it writes, the parity gate, and the ResNet-152 run CI must do."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision

from imgsearch.export.model import mlp_head
from imgsearch.export.onnx_export import ENCODER_MODULES, PREPROCESS_MODULES, export_model
from imgsearch.model_card import read_card, read_labels


def test_export_writes_repository_and_card(repo18):
    d = repo18 / "resnet152"
    for f in ("1/model.onnx", "1/model.py", "config.pbtxt", "configs/cpu.pbtxt", "labels.txt", "model_card.json",
              *(f"1/{m}" for m in ENCODER_MODULES)):  # the modules model.py imports: Triton copies nothing else
        assert (d / f).is_file(), f
    for f in ("1/model.py", *(f"1/{m}" for m in PREPROCESS_MODULES)):
        assert (repo18 / "preprocess" / f).is_file(), f
    card = read_card(repo18, "resnet152")
    assert (card.arch, card.embedding_dim, card.num_classes, card.weights) == ("resnet18", 512, 0, "random:0")
    assert card.parity["min_cosine"] >= 0.9999 and card.parity["images"] >= 8
    graph = onnx.load(str(d / "1" / "model.onnx")).graph
    inp = graph.input[0]
    assert inp.name == "images"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [x.dim_param or x.dim_value for x in inp.type.tensor_type.shape.dim]
    assert dims[1:] == [224, 224, 3] and isinstance(dims[0], str)  # dynamic batch axis
    assert [o.name for o in graph.output] == ["embedding"]


def test_random_export_is_deterministic(tmp_path, repo18):
    export_model(arch="resnet18", repository=tmp_path, model_name="m")
    assert read_card(tmp_path, "m").model_sha == read_card(repo18, "resnet152").model_sha
    x = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    a = ort.InferenceSession(str(tmp_path / "m/1/model.onnx")).run(None, {"images": x})[0]
    b = ort.InferenceSession(str(repo18 / "resnet152/1/model.onnx")).run(None, {"images": x})[0]
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_checkpoint_with_head_exports_probs_and_labels(tmp_path):
    m = torchvision.models.resnet18()
    m.fc = mlp_head(512, 5)
    torch.save({f"module.{k}": v for k, v in m.state_dict().items()}, tmp_path / "k.pth")
    (tmp_path / "labels.txt").write_text("\n".join("abcde"))
    for emb, dim in (("pool", 512), ("head", 256), ("logits", 5)):
        res = export_model(weights=str(tmp_path / "k.pth"), embedding=emb, repository=tmp_path / emb,
                           model_name="dogs", labels=list("abcde"))
        assert res.card.embedding_dim == dim and res.card.num_classes == 5
        assert read_labels(tmp_path / emb, "dogs") == list("abcde")
        sess = ort.InferenceSession(str(tmp_path / emb / "dogs/1/model.onnx"))
        e, p = sess.run(None, {"images": np.zeros((3, 224, 224, 3), np.uint8)})
        assert e.shape == (3, dim) and p.shape == (3, 5)
        np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
        assert "probs" in (tmp_path / emb / "dogs/configs/cpu.pbtxt").read_text()


def test_imagenet_offline_fails_with_a_message_not_a_traceback(tmp_path):
    env = dict(os.environ, TORCH_HOME=str(tmp_path), HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9",
               https_proxy="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9")
    r = subprocess.run([sys.executable, "-m", "imgsearch.cli", "export", "--arch", "resnet18", "--weights", "imagenet",
                        "--repository", str(tmp_path / "repo")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1
    assert "could not download torchvision's resnet18 ImageNet weights" in r.stderr
    assert "--weights random" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "repo" / "resnet152" / "1" / "model.onnx").exists()


@pytest.mark.slow
def test_resnet152_fp32_export_passes_parity(tmp_path):
    res = export_model(arch="resnet152", repository=tmp_path, model_name="resnet152")
    card = res.card
    assert card.embedding_dim == 2048
    assert card.parity["min_cosine"] >= 0.9999
    assert card.parity["max_abs_diff"] < 1e-3
    saved = json.loads((tmp_path / "resnet152" / "model_card.json").read_text())
    assert saved["parity"] == card.parity and saved["arch"] == "resnet152"


def test_fp16_export_passes_its_own_threshold(tmp_path):
    card = export_model(arch="resnet18", precision="fp16", repository=tmp_path, model_name="m").card
    assert card.precision == "fp16" and card.parity["threshold"] == 0.999
    assert card.parity["min_cosine"] >= 0.999


def test_parity_gate_refuses_a_diverging_graph_and_writes_nothing(tmp_path, monkeypatch):
    """Export a graph whose weights differ from the reference: ONNX Runtime then really
    disagrees with PyTorch, and nothing may land in the repository."""
    import copy

    from imgsearch.export import onnx_export
    from imgsearch.export.onnx_export import ParityError

    real = onnx_export._onnx_export

    def diverging(model, path, has_probs):
        other = copy.deepcopy(model)
        with torch.no_grad():
            for p in other.backbone.layer4.parameters():
                p.add_(torch.randn_like(p) * 0.5)
        real(other, path, has_probs)

    monkeypatch.setattr(onnx_export, "_onnx_export", diverging)
    with pytest.raises(ParityError, match="model not written"):
        export_model(arch="resnet18", repository=tmp_path, model_name="m")
    assert not (tmp_path / "m" / "1" / "model.onnx").exists()
    assert not (tmp_path / "m" / "model_card.json").exists()
