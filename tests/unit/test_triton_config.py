"""Configs are rendered from the card, so they must agree with it; the checked-in
configs must be what the exporter writes for the default model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from export.triton_config import cpu_config, gpu_config
from imgsearch.model_card import ModelCard

ROOT = Path(__file__).resolve().parents[2]


def card(dim=2048, classes=0, name="resnet152") -> ModelCard:
    return ModelCard(name=name, arch="resnet152", embedding="pool", embedding_dim=dim, num_classes=classes,
                     weights="random:0", checkpoint_sha256="x", model_sha="y")


def tensors(cfg: str) -> dict[str, tuple[str, list[int]]]:
    out = {}
    for name, dtype, dims in re.findall(r'name: "(\w+)" data_type: (TYPE_\w+) dims: \[ ([\d, ]+) \]', cfg):
        out[name] = (dtype, [int(d) for d in dims.split(",")])
    return out


@pytest.mark.parametrize("render", [cpu_config, gpu_config])
@pytest.mark.parametrize("dim,classes", [(2048, 0), (256, 120), (512, 3)])
def test_config_tensors_match_card(render, dim, classes):
    cfg = render(card(dim, classes))
    t = tensors(cfg)
    assert t["images"] == ("TYPE_UINT8", [224, 224, 3])
    assert t["embedding"] == ("TYPE_FP32", [dim])
    assert ("probs" in t) == (classes > 0)
    if classes:
        assert t["probs"] == ("TYPE_FP32", [classes])
    assert 'name: "resnet152"' in cfg
    assert "timeout_action: REJECT" in cfg and re.search(r"max_queue_size: \d+", cfg)
    assert "dynamic_batching" in cfg and "preferred_batch_size" in cfg


def test_gpu_config_is_production_shape():
    cfg = gpu_config(card())
    assert 'platform: "onnxruntime_onnx"' in cfg and "KIND_GPU" in cfg
    assert 'name: "tensorrt"' in cfg and '"FP16"' in cfg
    assert "max_batch_size: 128" in cfg and "model_warmup" in cfg


def test_cpu_config_is_python_backend():
    cfg = cpu_config(card())
    assert 'backend: "python"' in cfg and "KIND_CPU" in cfg


def test_checked_in_configs_match_the_default_export():
    d = ROOT / "model_repository" / "resnet152"
    assert (d / "config.pbtxt").read_text() == gpu_config(card())
    assert (d / "configs" / "cpu.pbtxt").read_text() == cpu_config(card())
