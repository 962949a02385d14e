"""Configs are rendered from the card, so they must agree with it; the checked-in
configs must be what the exporter writes for the default model."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest
from imgsearch.export.onnx_export import write_decode_models
from imgsearch.export.triton_config import (
    CPU_DEFAULTS,
    GPU_DEFAULTS,
    GPU_PYTHON_DEFAULTS,
    PREPROCESS_GPU,
    cpu_config,
    ensemble_config,
    gpu_config,
    gpu_python_config,
    graph_buckets,
    preprocess_config,
)

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


@pytest.mark.parametrize("render", [cpu_config, gpu_config, gpu_python_config])
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
    assert (d / "configs" / "gpu.pbtxt").read_text() == gpu_python_config(card())


def params(cfg: str) -> dict[str, str]:
    return dict(re.findall(r'parameters \{ key: "(\w+)" value: \{ string_value: "([^"]*)" \} \}', cfg))


def test_gpu_python_config_selects_the_gpu_engine():
    cfg = gpu_python_config(card())
    assert 'backend: "python"' in cfg and "KIND_GPU" in cfg and "platform" not in cfg
    p = params(cfg)
    assert p["engine"] == "auto" and p["precision"] == "fp16" and p["cuda_graphs"] == "true"
    assert p["weights_file"] == "weights.pt" and float(p["parity_min_cosine"]) >= 0.999
    mbs = int(re.search(r"max_batch_size: (\d+)", cfg).group(1))
    assert mbs in (128, 256)
    buckets = [int(b) for b in p["graph_buckets"].split(",")]
    assert buckets == sorted(buckets) and buckets[0] == 1 and buckets[-1] == mbs
    # every preferred batch size is a bucket: a preferred batch runs without padding
    prefs = [int(x) for x in re.search(r"preferred_batch_size: \[ ([\d, ]+) \]", cfg).group(1).split(",")]
    assert set(prefs) <= set(buckets)
    assert graph_buckets(48) == (1, 2, 4, 8, 16, 32, 48)


def test_preprocess_and_ensemble_configs():
    pre = preprocess_config(224, PREPROCESS_GPU, instance_kind="KIND_GPU", decoder="torchvision")
    t = tensors(pre)
    assert t["images"] == ("TYPE_UINT8", [224, 224, 3])
    assert 'name: "image_bytes" data_type: TYPE_STRING dims: [ 1 ]' in pre
    assert "KIND_GPU" in pre and params(pre)["decoder"] == "torchvision" and "timeout_action: REJECT" in pre
    for classes in (0, 120):
        ens = ensemble_config(card(256, classes), 64)
        assert 'platform: "ensemble"' in ens and "max_batch_size: 64" in ens
        assert 'model_name: "preprocess"' in ens and 'model_name: "resnet152"' in ens
        assert ('output_map { key: "probs" value: "probs" }' in ens) == (classes > 0)
        assert tensors(ens)["embedding"] == ("TYPE_FP32", [256])


def test_checked_in_decode_models_match_the_default_export():
    with tempfile.TemporaryDirectory() as tmp:
        write_decode_models(Path(tmp), card(), CPU_DEFAULTS.max_batch_size,
                            min(GPU_DEFAULTS.max_batch_size, GPU_PYTHON_DEFAULTS.max_batch_size))
        for name in ("preprocess", "image_search"):
            for rel in ("config.pbtxt", "configs/cpu.pbtxt", "configs/gpu.pbtxt"):
                assert (ROOT / "model_repository" / name / rel).read_text() == (Path(tmp) / name / rel).read_text(), rel
            # the default config is the GPU one; an ensemble's batch fits both of its steps
            assert (Path(tmp) / name / "config.pbtxt").read_text() == (Path(tmp) / name / "configs/gpu.pbtxt").read_text()
        cpu_ens = (Path(tmp) / "image_search" / "configs" / "cpu.pbtxt").read_text()
        assert f"max_batch_size: {CPU_DEFAULTS.max_batch_size}" in cpu_ens
