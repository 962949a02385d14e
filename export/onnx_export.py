"""Export a ResNet or EfficientNet-Lite0 to ONNX for Triton, check it against PyTorch, write the model folder.

``export_model`` is the library function; ``imgsearch export`` is a thin CLI over it
(the timm pattern). Nothing is written unless ONNX Runtime agrees with PyTorch.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from imgsearch.errors import CheckpointError
from imgsearch.imaging import DEFAULT_MAX_PIXELS
from imgsearch.model_card import (
    CARD_FILE,
    EMBEDDING_NAME,
    ENSEMBLE_NAME,
    INPUT_NAME,
    LABELS_FILE,
    PROBS_NAME,
    ModelCard,
)

from . import checkpoint as ckpts
from . import pretrained
from .model import RANDOM_SEED, EmbeddingKind, HeadKind, ServingModel, norm_constants
from .templates.encoder_parity import min_cosine, parity_images
from .templates.encoder_torch import WEIGHTS_FORMAT
from .triton_config import (
    CPU_DEFAULTS,
    GPU_DEFAULTS,
    GPU_PYTHON_DEFAULTS,
    PREPROCESS_CPU,
    PREPROCESS_GPU,
    PREPROCESS_NAME,
    BatchingOptions,
    cpu_config,
    ensemble_config,
    gpu_config,
    gpu_python_config,
    preprocess_config,
)

log = logging.getLogger(__name__)

PARITY_MIN_COSINE = {"fp32": 0.9999, "fp16": 0.999}
PARITY_IMAGES = 8
PARITY_SEED = 1234
OPSET = 17
TEMPLATES = Path(__file__).parent / "templates"
# copied to 1/model.py, with the modules it imports beside it (Triton copies nothing else);
# two of those are imported here too, for the parity images and the weights.pt format the
# torch engine reads, so the two sides cannot drift apart
TEMPLATE = TEMPLATES / "encoder_model.py"
ENCODER_MODULES = ("encoder_engines.py", "encoder_parity.py", "encoder_torch.py")
PREPROCESS_TEMPLATE = TEMPLATES / "preprocess_model.py"
PREPROCESS_MODULES = ("preprocess_decoder.py",)  # beside model.py, which imports them


class ParityError(CheckpointError):
    code = "parity_failed"


@dataclass
class ExportResult:
    card: ModelCard
    model_dir: Path


def _resolve_weights(weights: str, arch: str | None, labels: list[str] | None, dropout: float):
    """Return (net, head kind, class names, weights tag, sha, arch)."""
    weights, arch = pretrained.resolve(weights, arch)
    if weights == pretrained.PACKAGED:
        net, names, tag, sha = ckpts.packaged_model(arch)
        return net, "linear", names, tag, sha, ckpts.PACKAGED_ARCH
    if weights == "random":
        arch = arch or "resnet152"
        net = ckpts.random_model(arch, RANDOM_SEED)
        tag = f"random:{RANDOM_SEED}"
        return net, "none", [], tag, hashlib.sha256(f"{arch}:{tag}".encode()).hexdigest(), arch
    if weights == "imagenet":
        arch = arch or "resnet152"
        net, names, tag = ckpts.imagenet_model(arch)
        return net, "linear", names, tag, hashlib.sha256(f"{arch}:{tag}".encode()).hexdigest(), arch
    ck = ckpts.read_checkpoint(weights, arch)
    net = ckpts.load_into_model(ck, dropout)
    names = labels or ck.class_names or [f"class_{i:03d}" for i in range(ck.num_classes)]
    if ck.head != "none" and not (labels or ck.class_names):
        log.warning("checkpoint has no class names: labels.txt gets class_000..; pass --labels FILE for real names")
    if labels and len(labels) != ck.num_classes:
        raise CheckpointError(f"--labels has {len(labels)} names for a {ck.num_classes}-class head")
    return net, ck.head, names, f"checkpoint:{ck.kind}", ck.sha256, ck.arch


def _onnx_export(model: torch.nn.Module, path: Path, has_probs: bool) -> None:
    example = torch.zeros(2, 224, 224, 3, dtype=torch.uint8)
    outputs = [EMBEDDING_NAME] + ([PROBS_NAME] if has_probs else [])
    axes = {n: {0: "batch"} for n in [INPUT_NAME, *outputs]}
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated but exact and fast for CNNs; the dynamo
        # exporter needs several minutes and much memory for ResNet-152 on 2 cores.
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), input_names=[INPUT_NAME], output_names=outputs,
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False, do_constant_folding=True)


def check_parity(model: torch.nn.Module, onnx_path: Path, precision: str, n: int = PARITY_IMAGES) -> dict:
    """Run the same images through PyTorch (fp32 reference) and ONNX Runtime."""
    import onnxruntime as ort

    imgs = parity_images(n, seed=PARITY_SEED)
    with torch.no_grad():
        ref = [t.float().numpy() for t in model(torch.from_numpy(imgs))]
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {INPUT_NAME: imgs})
    e_ref, e_got = ref[0], got[0]
    report = {
        "images": n,
        "max_abs_diff": float(np.abs(e_ref - e_got).max()),
        "min_cosine": min_cosine(e_ref, e_got),
        "threshold": PARITY_MIN_COSINE[precision],
        "norm_max_dev": float(np.abs(np.linalg.norm(e_got, axis=1) - 1).max()),
    }
    if len(ref) > 1:
        report["probs_max_abs_diff"] = float(np.abs(ref[1] - got[1]).max())
    return report


def export_model(
    *,
    weights: str = "random",
    arch: str | None = None,
    embedding: EmbeddingKind = "pool",
    precision: str = "fp32",
    repository: Path = Path("model_repository"),
    model_name: str = "resnet152",
    labels: list[str] | None = None,
    dropout: float = 0.2,
    cpu_batching: BatchingOptions = CPU_DEFAULTS,
    gpu_batching: BatchingOptions = GPU_DEFAULTS,
    parity_images_n: int = PARITY_IMAGES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    onnx: bool = True,
) -> ExportResult:
    """Build, export, verify and write ``<repository>/<model_name>/``; return its card.

    ``max_pixels``: the pixel limit the ``preprocess`` model enforces (the gateway and the
    indexer send bytes to the ensemble only when it equals their IMGSEARCH_MAX_PIXELS).

    ``onnx=False`` writes only what ``configs/gpu.pbtxt``'s torch engine serves
    (``weights.pt``), for a GPU box whose Python has no onnx/onnxruntime: no ``model.onnx``,
    no ``config.pbtxt`` or ``configs/cpu.pbtxt`` (both serve the ONNX graph). The engine then
    checks itself against fp32 torch at start-up; the ONNX-vs-torch parity is what the
    default export proves.
    """
    if precision not in PARITY_MIN_COSINE:
        raise ValueError(f"precision must be fp32 or fp16, not {precision}")
    net, head, class_names, tag, sha, arch = _resolve_weights(weights, arch, labels, dropout)
    head_kind: HeadKind = head
    reference = ServingModel(net, head_kind, embedding, half=False, arch=arch).eval()
    served = reference
    if precision == "fp16":
        import copy

        served = copy.deepcopy(reference)
        served.backbone.half()
        served.fc.half()
        served.use_half = True
    dim = reference.embedding_dim()
    num_classes = len(class_names) if head_kind != "none" else 0
    model_sha = hashlib.sha256(f"{sha}:{arch}:{embedding}:{precision}".encode()).hexdigest()[:16]

    out_dir = Path(repository) / model_name
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=Path(repository).parent if Path(repository).parent.exists() else None))
    try:
        onnx_path = tmp / "model.onnx"
        if onnx:
            _onnx_export(served, onnx_path, head_kind != "none")
            parity = check_parity(reference, onnx_path, precision, parity_images_n)
        else:
            parity = {"skipped": "exported without ONNX (torch engine only): parity is checked by the engine at start-up"}
        if onnx and parity["min_cosine"] < parity["threshold"]:
            raise ParityError(
                f"ONNX Runtime disagrees with PyTorch: min cosine {parity['min_cosine']:.6f} < "
                f"{parity['threshold']} (max abs diff {parity['max_abs_diff']:.2e}); model not written"
            )
        card = ModelCard(
            name=model_name, arch=arch, embedding=embedding, embedding_dim=dim, num_classes=num_classes,
            weights=tag, checkpoint_sha256=sha, model_sha=model_sha, precision=precision,
            outputs=[EMBEDDING_NAME] + ([PROBS_NAME] if num_classes else []),
            exported_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            parity=parity, opset=OPSET,
        )
        (out_dir / "1").mkdir(parents=True, exist_ok=True)
        (out_dir / "configs").mkdir(exist_ok=True)
        weights_path = tmp / "weights.pt"
        _save_serving_weights(reference, arch, embedding, num_classes, weights_path)
        # model.onnx is replaced atomically: a running Triton never sees half a file
        if onnx:
            os.replace(onnx_path, out_dir / "1" / "model.onnx")
        else:  # a stale graph or config from an earlier export would no longer match weights.pt
            for stale in (out_dir / "1" / "model.onnx", out_dir / "config.pbtxt", out_dir / "configs" / "cpu.pbtxt"):
                stale.unlink(missing_ok=True)
        os.replace(weights_path, out_dir / "1" / "weights.pt")
        _install_python_model(out_dir / "1", TEMPLATE, ENCODER_MODULES)
        if onnx:
            (out_dir / "config.pbtxt").write_text(gpu_config(card, gpu_batching))
            (out_dir / "configs" / "cpu.pbtxt").write_text(cpu_config(card, cpu_batching))
        (out_dir / "configs" / "gpu.pbtxt").write_text(gpu_python_config(card))
        write_decode_models(Path(repository), card, cpu_batching.max_batch_size,
                            min(gpu_batching.max_batch_size, GPU_PYTHON_DEFAULTS.max_batch_size),
                            max_pixels=max_pixels)
        (out_dir / LABELS_FILE).write_text("".join(f"{n}\n" for n in class_names) if num_classes else "")
        (out_dir / CARD_FILE).write_text(card.to_json())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s (%s)", out_dir, json.dumps(parity))
    return ExportResult(card=card, model_dir=out_dir)


def _save_serving_weights(reference: torch.nn.Module, arch: str, embedding: str, num_classes: int, path: Path) -> None:
    """The fp32 weights the GPU config's torch engine rebuilds the model from (1/weights.pt).

    Plain tensors, strings and ints only, so it loads with ``torch.load(weights_only=True)``.
    """
    head = reference.head_kind
    hidden = int(reference.fc[0].out_features) if head == "mlp" else 0
    state = {k: (v.float() if v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in reference.state_dict().items()}
    mean, std = norm_constants(arch)
    torch.save({"format": WEIGHTS_FORMAT, "arch": arch, "head": head, "embedding": embedding,
                "num_classes": num_classes, "hidden": hidden, "mean": list(mean), "std": list(std),
                "state_dict": state}, path)


def _install_python_model(version_dir: Path, template: Path, modules: Sequence[str]) -> None:
    """A Python-backend model version: the modules its ``model.py`` imports, then ``model.py``."""
    for module in modules:
        shutil.copyfile(TEMPLATES / module, version_dir / module)
    shutil.copyfile(template, version_dir / "model.py")


def write_decode_models(repository: Path, card: ModelCard, cpu_max_batch: int, gpu_max_batch: int,
                        ensemble_name: str = ENSEMBLE_NAME, preprocess_name: str = PREPROCESS_NAME,
                        max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """``preprocess/`` (file bytes -> pixels in Triton) and the ``image_search`` ensemble into ``card``'s encoder.

    Each has ``configs/cpu.pbtxt``, ``configs/gpu.pbtxt`` and a default ``config.pbtxt`` (= gpu).
    The ensemble's max batch is the smaller of its two steps'.
    """
    pre = Path(repository) / preprocess_name
    (pre / "1").mkdir(parents=True, exist_ok=True)
    (pre / "configs").mkdir(exist_ok=True)
    _install_python_model(pre / "1", PREPROCESS_TEMPLATE, PREPROCESS_MODULES)
    size = card.input_size
    pre_gpu = preprocess_config(size, PREPROCESS_GPU, instance_kind="KIND_GPU", decoder="torchvision",
                                max_pixels=max_pixels, name=preprocess_name, output_name=card.input_name)
    (pre / "config.pbtxt").write_text(pre_gpu)
    (pre / "configs" / "gpu.pbtxt").write_text(pre_gpu)
    (pre / "configs" / "cpu.pbtxt").write_text(
        preprocess_config(size, PREPROCESS_CPU, instance_kind="KIND_CPU", decoder="pillow", max_pixels=max_pixels,
                          name=preprocess_name, output_name=card.input_name))
    ens = Path(repository) / ensemble_name
    (ens / "1").mkdir(parents=True, exist_ok=True)  # an ensemble has no files, but Triton wants a version
    (ens / "configs").mkdir(exist_ok=True)
    gpu = ensemble_config(card, min(gpu_max_batch, PREPROCESS_GPU.max_batch_size), name=ensemble_name,
                          preprocess=preprocess_name)
    (ens / "config.pbtxt").write_text(gpu)
    (ens / "configs" / "gpu.pbtxt").write_text(gpu)
    (ens / "configs" / "cpu.pbtxt").write_text(
        ensemble_config(card, min(cpu_max_batch, PREPROCESS_CPU.max_batch_size), name=ensemble_name,
                        preprocess=preprocess_name))
