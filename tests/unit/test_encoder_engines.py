"""The encoder template's engine registry, parity gate and input checks, without Triton."""

from __future__ import annotations

import ast
import json
import shutil

import numpy as np
import pytest

from harness.data import load_version_module
from imgsearch.export.onnx_export import ENCODER_MODULES, PREPROCESS_MODULES, PREPROCESS_TEMPLATE, TEMPLATE, TEMPLATES
from imgsearch.export.templates import encoder_engines as eng
from imgsearch.export.templates.encoder_parity import ParityGate, Reference, measure, parity_images


def context(**params: str) -> eng.EngineContext:
    config = {"parameters": {k: {"string_value": v} for k, v in params.items()},
              "input": [{"name": "images", "dims": ["224", "224", "3"]}],
              "output": [{"name": "embedding"}, {"name": "probs"}]}
    args = {"model_config": json.dumps(config), "model_repository": "/models/enc", "model_version": "1",
            "model_instance_kind": "CPU", "model_instance_device_id": "0"}
    return eng.EngineContext.from_triton(args, config)


def test_each_engine_name_maps_to_its_class():
    assert eng.engine_class("torch") is eng.TorchEngine
    assert eng.engine_class("onnxruntime") is eng.OnnxRuntimeEngine
    assert eng.engine_class("onnxruntime-gpu") is eng.OnnxRuntimeGpuEngine
    assert all(issubclass(cls, eng.Engine) and cls.name == name for name, cls in eng.ENGINES.items())


def test_an_unknown_engine_is_refused_naming_the_choices():
    with pytest.raises(RuntimeError, match="unknown engine 'tensorrt'") as err:
        eng.create_engine(context(engine="tensorrt"))
    for choice in ("auto", "torch", "onnxruntime", "onnxruntime-gpu"):
        assert f"{choice}," in str(err.value) or f"{choice})" in str(err.value), choice


def test_auto_on_a_cpu_instance_and_no_parameter_mean_onnx_runtime():
    assert isinstance(eng.create_engine(context(engine="auto")), eng.OnnxRuntimeEngine)
    assert type(eng.create_engine(context())) is eng.OnnxRuntimeEngine


def test_context_reads_the_config_and_the_device_fallback():
    ctx = context(engine="torch", onnx_file="g.onnx")
    assert (ctx.kind, ctx.input_name, ctx.input_shape) == ("CPU", "images", (224, 224, 3))
    assert ctx.output_names == ["embedding", "probs"]
    assert ctx.onnx_path == "/models/enc/1/g.onnx"
    assert context(device="cuda").kind == "GPU"  # a KIND_CPU instance told to compute on GPU 0


class FakeTensor:
    def __init__(self, arr):
        self.arr = arr

    def as_numpy(self):
        return self.arr


@pytest.mark.parametrize("arr, message", [
    (np.zeros((1, 224, 224, 3), np.float32), "input must be uint8, got float32"),
    (np.zeros((1, 224, 224), np.uint8), r"input shape must be \[N, 224, 224, 3\], got \[1, 224, 224\]"),
    (np.zeros((0, 224, 224, 3), np.uint8), r"got \[0, 224, 224, 3\]"),
])
def test_a_malformed_input_is_the_clients_error(arr, message):
    with pytest.raises(ValueError, match=message):
        eng.checked_input(eng.NumpyIO(), FakeTensor(arr), "images", (224, 224, 3))
    with pytest.raises(ValueError, match="missing input 'images'"):
        eng.checked_input(eng.NumpyIO(), None, "images", (224, 224, 3))


def test_parity_gate_passes_the_same_model_and_refuses_another():
    rng = np.random.default_rng(0)
    proj = rng.normal(size=(224 * 224 * 3, 8))

    def embed(images):
        return images.reshape(len(images), -1).astype(np.float64) @ proj

    same = [Reference("self", "itself", embed)]
    gate = ParityGate(0.999, n_images=4, input_size=224)
    line = gate.check(embed, same, lambda cos, against: f"vs {against}: {cos:.6f}")
    assert line == "vs self: 1.000000"
    other = [Reference("other", "another", lambda images: embed(images[::-1]))]
    with pytest.raises(RuntimeError, match="parity check failed, refusing to serve: vs other"):
        gate.check(embed, other, lambda cos, against: f"vs {against}: {cos:.6f}")


def test_parity_falls_back_to_the_next_reference_and_says_why():
    def broken(images):
        raise ImportError("no onnxruntime here")

    logged = []
    refs = [Reference("not-there", "nothing", lambda images: None), Reference("ort", "ONNX Runtime", broken),
            Reference("torch", "fp32 torch on the CPU", lambda images: np.ones((len(images), 2)))]
    cos, against = measure(lambda images: np.ones((len(images), 2)), refs, n=2, size=8, log=logged.append)
    assert (round(cos, 9), against) == (1.0, "torch")
    assert logged == ["parity: ONNX Runtime unusable (ImportError: no onnxruntime here); using fp32 torch on the CPU"]
    assert parity_images(2, 8).shape == (2, 8, 8, 3)


def relative_imports(path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {f"{node.module}.py" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1}


def test_the_exported_folder_holds_every_module_model_py_imports(tmp_path):
    """Triton copies nothing: model.py and its modules import only each other (relatively) and packages."""
    files = [TEMPLATE, *(TEMPLATES / m for m in ENCODER_MODULES)]
    needed = set().union(*(relative_imports(f) for f in files))
    assert needed and needed <= set(ENCODER_MODULES)
    for f in ENCODER_MODULES:
        shutil.copyfile(TEMPLATES / f, tmp_path / f)
    mod = load_version_module(tmp_path, "encoder_engines")
    assert set(mod.ENGINES) == set(eng.ENGINES)


def test_the_preprocess_folder_holds_every_module_its_model_py_imports(tmp_path):
    """The preprocess model's model.py holds only its Triton class; its decoding comes from the
    modules copied beside it, loaded as Triton loads them."""
    files = [PREPROCESS_TEMPLATE, *(TEMPLATES / m for m in PREPROCESS_MODULES)]
    needed = set().union(*(relative_imports(f) for f in files))
    assert needed == set(PREPROCESS_MODULES)
    for f in PREPROCESS_MODULES:
        shutil.copyfile(TEMPLATES / f, tmp_path / f)
    mod = load_version_module(tmp_path, "preprocess_decoder")
    assert mod.Decoder("pillow").decode([b"not an image"])[0].code == "unsupported_media_type"
