"""Configs are built from the card, so they must agree with it; the checked-in
configs must be what the exporter writes for the default model. Every config is read back
with Triton's own protobuf (``parse_config``), as the server reads it."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2 as mc

from harness.configs import assert_bounded_rejecting_queue, config_tensors
from imgsearch.errors import ModelRepositoryError
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
    parse_config,
    preprocess_config,
    without_dynamic_batching,
)
from imgsearch.model_card import ModelCard

ROOT = Path(__file__).resolve().parents[2]


def card(dim=2048, classes=0, name="resnet152") -> ModelCard:
    return ModelCard(name=name, arch="resnet152", embedding="pool", embedding_dim=dim, num_classes=classes,
                     weights="random:0", checkpoint_sha256="x", model_sha="y")


def params(cfg: mc.ModelConfig) -> dict[str, str]:
    return {k: v.string_value for k, v in cfg.parameters.items()}


def kinds(cfg: mc.ModelConfig) -> list[str]:
    return [mc.ModelInstanceGroup.Kind.Name(g.kind) for g in cfg.instance_group]


@pytest.mark.parametrize("render", [cpu_config, gpu_config, gpu_python_config])
@pytest.mark.parametrize("dim,classes", [(2048, 0), (256, 120), (512, 3)])
def test_config_tensors_match_card(render, dim, classes):
    text = render(card(dim, classes))
    cfg = parse_config(text)
    t = config_tensors(cfg)
    assert t["images"] == ("TYPE_UINT8", [224, 224, 3])
    assert t["embedding"] == ("TYPE_FP32", [dim])
    assert ("probs" in t) == (classes > 0)
    if classes:
        assert t["probs"] == ("TYPE_FP32", [classes])
    assert cfg.name == "resnet152"
    assert_bounded_rejecting_queue(cfg)
    # REJECT is the enum's zero, which text format does not print: the header names it
    assert "timeout_action: REJECT" in text


def test_gpu_config_is_production_shape():
    cfg = parse_config(gpu_config(card()))
    assert cfg.platform == "onnxruntime_onnx" and kinds(cfg) == ["KIND_GPU"]
    (trt,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert trt.name == "tensorrt" and trt.parameters["precision_mode"] == "FP16"
    assert cfg.max_batch_size == 128 and [w.batch_size for w in cfg.model_warmup] == [32]


def test_cpu_config_is_python_backend():
    cfg = parse_config(cpu_config(card()))
    assert cfg.backend == "python" and kinds(cfg) == ["KIND_CPU"]


def assert_same_config(committed: Path, generated: str) -> None:
    """Equal as Triton reads them (a readable diff on failure), and byte for byte (comments too)."""
    text = committed.read_text()
    assert str(parse_config(text)) == str(parse_config(generated)), committed
    assert text == generated, f"{committed}: regenerate it (same meaning, other text)"


def test_checked_in_configs_match_the_default_export():
    d = ROOT / "model_repository" / "resnet152"
    assert_same_config(d / "config.pbtxt", gpu_config(card()))
    assert_same_config(d / "configs" / "cpu.pbtxt", cpu_config(card()))
    assert_same_config(d / "configs" / "gpu.pbtxt", gpu_python_config(card()))


def test_gpu_python_config_selects_the_gpu_engine():
    cfg = parse_config(gpu_python_config(card()))
    assert cfg.backend == "python" and kinds(cfg) == ["KIND_GPU"] and not cfg.platform
    p = params(cfg)
    assert p["engine"] == "auto" and p["precision"] == "fp16" and p["cuda_graphs"] == "true"
    assert p["weights_file"] == "weights.pt" and float(p["parity_min_cosine"]) >= 0.999
    assert cfg.max_batch_size in (128, 256)
    buckets = [int(b) for b in p["graph_buckets"].split(",")]
    assert buckets == sorted(buckets) and buckets[0] == 1 and buckets[-1] == cfg.max_batch_size
    # every preferred batch size is a bucket: a preferred batch runs without padding
    assert set(cfg.dynamic_batching.preferred_batch_size) <= set(buckets)
    assert graph_buckets(48) == (1, 2, 4, 8, 16, 32, 48)


def test_preprocess_and_ensemble_configs():
    pre = parse_config(preprocess_config(224, PREPROCESS_GPU, instance_kind="KIND_GPU", decoder="torchvision"))
    t = config_tensors(pre)
    assert t["images"] == ("TYPE_UINT8", [224, 224, 3])
    assert t["image_bytes"] == ("TYPE_STRING", [1])
    assert kinds(pre) == ["KIND_GPU"] and params(pre)["decoder"] == "torchvision"
    assert_bounded_rejecting_queue(pre)
    for classes in (0, 120):
        ens = parse_config(ensemble_config(card(256, classes), 64))
        assert ens.platform == "ensemble" and ens.max_batch_size == 64
        first, second = ens.ensemble_scheduling.step
        assert (first.model_name, second.model_name) == ("preprocess", "resnet152")
        assert first.output_map["images"] == second.input_map["images"]
        assert dict(second.output_map) == ({"embedding": "embedding", "probs": "probs"} if classes
                                           else {"embedding": "embedding"})
        assert config_tensors(ens)["embedding"] == ("TYPE_FP32", [256])


def test_checked_in_decode_models_match_the_default_export():
    with tempfile.TemporaryDirectory() as tmp:
        write_decode_models(Path(tmp), card(), CPU_DEFAULTS.max_batch_size,
                            min(GPU_DEFAULTS.max_batch_size, GPU_PYTHON_DEFAULTS.max_batch_size))
        for name in ("preprocess", "image_search"):
            for rel in ("config.pbtxt", "configs/cpu.pbtxt", "configs/gpu.pbtxt"):
                assert_same_config(ROOT / "model_repository" / name / rel, (Path(tmp) / name / rel).read_text())
            # the default config is the GPU one; an ensemble's batch fits both of its steps
            assert (Path(tmp) / name / "config.pbtxt").read_text() == (Path(tmp) / name / "configs/gpu.pbtxt").read_text()
        cpu_ens = parse_config((Path(tmp) / "image_search" / "configs" / "cpu.pbtxt").read_text())
        assert cpu_ens.max_batch_size == CPU_DEFAULTS.max_batch_size


def test_without_dynamic_batching_keeps_everything_else():
    text = gpu_python_config(card(256, 120))
    out = parse_config(without_dynamic_batching(text, name="resnet152_nobatch"))
    assert not out.HasField("dynamic_batching") and out.name == "resnet152_nobatch"
    expected = parse_config(text)
    expected.ClearField("dynamic_batching")
    expected.name = "resnet152_nobatch"
    assert out == expected
    # ensembles have no batching block: nothing to take out, nothing else touched
    ens = ensemble_config(card(), 64)
    assert parse_config(without_dynamic_batching(ens)) == parse_config(ens)


def test_a_config_that_is_not_protobuf_text_is_refused():
    with pytest.raises(ModelRepositoryError, match="not a Triton model config"):
        parse_config("name: resnet152 {")
    with pytest.raises(ModelRepositoryError, match="not a Triton model config"):
        parse_config('name: "x"\nno_such_field: 1\n')
