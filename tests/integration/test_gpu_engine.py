"""The GPU config's torch engine, run on the CPU through the real tritonserver.

configs/gpu.pbtxt picks torch (fp16, CUDA graphs) on a GPU box; here the same code runs
with ``engine: torch`` on a CPU instance in fp32, with the batch buckets (padding and
splitting) but without graphs. Tensors move with DLPack in and out; each request of a
dynamic batch must get its own rows back, equal to ONNX Runtime's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision

from harness.data import load_version_module, random_pixels
from imgsearch.errors import LauncherError
from imgsearch.export.model import mlp_head
from imgsearch.export.onnx_export import export_model
from imgsearch.export.templates.encoder_torch import TorchEncoder
from imgsearch.export.triton_config import GPU_PYTHON_DEFAULTS, gpu_python_config
from imgsearch.model_card import read_card
from imgsearch.triton_client import TritonEncoder
from imgsearch.triton_metrics import fetch_model_stats, stats_since
from imgsearch.triton_server import LocalTriton

MODEL = "resnet152"
BUCKETS = (1, 2, 4, 8)
# fp32 ResNet-18 on a CPU shared with other jobs can keep a request queued past the 10 s
# default and the client's 30 s: these tests check which rows come back, not how fast
SLOW_CPU_S = 180


def torch_cpu_repo(dest: Path, src: Path) -> Path:
    """Only the encoder, with configs/torchcpu.pbtxt: engine torch, KIND_CPU, fp32, buckets, no graphs."""
    shutil.copytree(src / MODEL, dest / MODEL)
    b = dataclasses.replace(GPU_PYTHON_DEFAULTS, max_batch_size=16, preferred=(4, 8, 16), instances=1,
                            queue_timeout_us=SLOW_CPU_S * 1_000_000)
    cfg = gpu_python_config(read_card(dest, MODEL), b, instance_kind="KIND_CPU", engine="torch", precision="fp32",
                            cuda_graphs=False, buckets=BUCKETS)
    (dest / MODEL / "configs" / "torchcpu.pbtxt").write_text(cfg)
    return dest


@pytest.fixture(scope="module")
def torch_triton(tmp_path_factory, repo18):
    repo = torch_cpu_repo(tmp_path_factory.mktemp("torchcpu"), repo18)
    with LocalTriton(repo, "torchcpu", exit_timeout_s=2) as server:
        yield server


def direct(repo: Path, pixels: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(repo / MODEL / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(["embedding"], {"images": pixels})[0]


def test_requests_of_a_dynamic_batch_get_their_own_rows(torch_triton, repo18):
    # sizes around the buckets: 5 pads to 8, 12 splits into 8 + 4, several share one execution
    sizes = [1, 1, 1, 3, 5, 12, 2, 1, 1, 4]
    inputs = [random_pixels(n, seed=50 + i) for i, n in enumerate(sizes)]
    before = fetch_model_stats(torch_triton.metrics_url, MODEL)

    async def go():
        enc = TritonEncoder(torch_triton.grpc_url, MODEL, timeout_s=SLOW_CPU_S)
        try:
            return await asyncio.gather(*[enc.encode(x) for x in inputs])
        finally:
            await enc.close()

    results = asyncio.run(go())
    ref = direct(repo18, np.concatenate(inputs))
    start = 0
    for x, r in zip(inputs, results):
        n = x.shape[0]
        assert r.embeddings.shape == (n, 512)
        np.testing.assert_allclose(r.embeddings, ref[start:start + n], atol=1e-4)
        start += n
    delta = stats_since(torch_triton.metrics_url, MODEL, before, len(sizes))
    assert delta.requests == len(sizes) and delta.inferences == sum(sizes)
    assert delta.executions < len(sizes), f"dynamic batching merged nothing: {delta}"


def test_start_up_parity_is_checked_and_logged(torch_triton):
    log = torch_triton.log_text()
    m = re.search(r"torch engine on cpu: resnet18 fp32.*tensors via dlpack; parity vs onnxruntime-cpu: "
                  r"min cosine ([\d.]+) \(threshold 0.999\)", log)
    assert m, log[-2000:]
    assert float(m.group(1)) >= 0.9999


def test_parity_gate_refuses_weights_that_disagree_with_the_onnx(tmp_path, repo18):
    repo = torch_cpu_repo(tmp_path, repo18)
    weights = repo / MODEL / "1" / "weights.pt"
    obj = torch.load(weights, weights_only=True)
    conv = obj["state_dict"]["backbone.conv1.weight"]
    obj["state_dict"]["backbone.conv1.weight"] = conv[torch.randperm(conv.shape[0])]  # other filters
    torch.save(obj, weights)
    with pytest.raises(LauncherError, match="parity check failed"):
        with LocalTriton(repo, "torchcpu", exit_timeout_s=2, startup_timeout_s=180):
            pass


def load_engine_module(model_dir: Path):
    """The exported folder's torch engine, imported from the folder alone (no Triton, no project import)."""
    return load_version_module(model_dir / "1", "encoder_torch")


def test_torch_engine_rebuilds_heads_and_embedding_kinds(tmp_path):
    """A Kaggle-style checkpoint (MLP head, 'head' embedding): embedding + probs as ONNX gives them."""
    m = torchvision.models.resnet18()
    m.fc = mlp_head(512, 5)
    torch.save(m.state_dict(), tmp_path / "k.pth")
    res = export_model(weights=str(tmp_path / "k.pth"), embedding="head", repository=tmp_path / "repo",
                       model_name="dogs", labels=list("abcde"))
    d = res.model_dir
    assert "probs" in (d / "configs" / "gpu.pbtxt").read_text()
    mod = load_engine_module(d)  # importable outside Triton: the raw-model benchmark uses it
    assert Path(mod.__file__).parent == d / "1"
    enc = mod.TorchEncoder(str(d / "1" / "weights.pt"), "cpu", "fp32", cuda_graphs=True, buckets=BUCKETS)
    assert not enc.cuda_graphs  # no graphs on the CPU, buckets still used
    x = random_pixels(11, seed=3)  # 11 > 8: two pieces, 8 and 3 padded to 4
    emb, probs = enc.run([torch.from_numpy(x[:6]), torch.from_numpy(x[6:])])
    sess = ort.InferenceSession(str(d / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    ref_emb, ref_probs = sess.run(["embedding", "probs"], {"images": x})
    assert emb.shape == (11, 256) and probs.shape == (11, 5)
    np.testing.assert_allclose(emb.numpy(), ref_emb, atol=1e-4)
    np.testing.assert_allclose(probs.numpy(), ref_probs, atol=1e-5)
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        mod.TorchEncoder(str(d / "1" / "weights.pt"), "cpu", "fp16")


def test_pieces_cover_the_batch_in_order():
    parts = [torch.arange(n) + 100 * i for i, n in enumerate([3, 9, 1, 4])]
    pieces = TorchEncoder._pieces(parts, 8)
    assert [sum(len(p) for p in piece) for piece in pieces] == [8, 8, 1]
    assert torch.equal(torch.cat([p for piece in pieces for p in piece]), torch.cat(parts))


def test_export_without_onnx_is_served_by_the_torch_engine(tmp_path, repo18):
    """`imgsearch export --no-onnx` (a GPU box whose Python lacks onnx): weights.pt only, and the
    engine checks itself against fp32 torch at start-up instead of ONNX Runtime."""
    repo = tmp_path / "repo"
    shutil.copytree(repo18, repo)  # over a full export: its graph and ORT configs must go
    res = export_model(arch="resnet18", weights="random", repository=repo, model_name=MODEL, onnx=False)
    d = repo / MODEL
    assert (d / "1" / "weights.pt").exists() and (d / "configs" / "gpu.pbtxt").exists()
    for stale in (d / "1" / "model.onnx", d / "config.pbtxt", d / "configs" / "cpu.pbtxt"):
        assert not stale.exists(), stale
    assert "skipped" in res.card.parity and read_card(repo, MODEL).parity == res.card.parity

    served = torch_cpu_repo(tmp_path / "served", repo)
    pixels = random_pixels(3, seed=9)
    with LocalTriton(served, "torchcpu", exit_timeout_s=2) as server:
        log = server.log_text()

        async def go():
            enc = TritonEncoder(server.grpc_url, MODEL, timeout_s=SLOW_CPU_S)
            try:
                return await enc.encode(pixels)
            finally:
                await enc.close()

        got = asyncio.run(go()).embeddings
    m = re.search(r"parity vs torch-fp32-cpu: min cosine ([\d.]+)", log)
    assert m and float(m.group(1)) >= 0.9999, log[-2000:]
    # the same random weights (seed 0) as repo18's ONNX graph: the served rows match it
    np.testing.assert_allclose(got, direct(repo18, pixels), atol=1e-4)


def test_torch_engine_rebuilds_the_packaged_efficientnet(tmp_path):
    """The GPU config's engine builds EfficientNet-Lite0 (timm) with its own normalisation from weights.pt."""
    res = export_model(weights="packaged", repository=tmp_path, model_name="encoder")
    d = res.model_dir
    mod = load_engine_module(d)
    enc = mod.TorchEncoder(str(d / "1" / "weights.pt"), "cpu", "fp32", cuda_graphs=False, buckets=BUCKETS)
    x = random_pixels(6, seed=4)
    emb, probs = enc.run([torch.from_numpy(x)])
    sess = ort.InferenceSession(str(d / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    ref_emb, ref_probs = sess.run(["embedding", "probs"], {"images": x})
    assert emb.shape == (6, 1280) and probs.shape == (6, 1000)
    np.testing.assert_allclose(emb.numpy(), ref_emb, atol=1e-4)
    np.testing.assert_allclose(probs.numpy(), ref_probs, atol=1e-5)
