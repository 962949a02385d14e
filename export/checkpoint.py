"""Checkpoint loading, with the format detected from the keys.

Supported, all loaded with ``torch.load(weights_only=True)`` (no code is unpickled):

* a plain torchvision ``state_dict`` (``fc`` a single Linear, or no ``fc``);
* the original project's Kaggle checkpoint: ``fc`` = Linear(2048,256) -> ReLU -> Dropout
  -> Linear(256,120), keys ``fc.0.*``/``fc.3.*``, possibly prefixed ``module.``;
* ``imgsearch finetune`` output: a dict with ``format``, ``arch``, ``class_names`` and
  ``state_dict``.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from imgsearch.errors import CheckpointError
from imgsearch.model_card import sha256_file

from .model import ARCHS, HeadKind, build_resnet

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


def infer_arch(state: dict[str, torch.Tensor]) -> str | None:
    blocks = []
    for stage in range(1, 5):
        idx = {int(m.group(1)) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        blocks.append(max(idx) + 1 if idx else 0)
    bottleneck = any(k.endswith("conv3.weight") for k in state)
    return _LAYOUTS.get((*blocks, bottleneck))


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
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None

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
    head, num_classes, hidden = _head_of(state)
    if kind == "torchvision" and head == "mlp":
        kind = "kaggle"
    found = infer_arch(state)
    if found is None:
        raise CheckpointError(
            f"{path}: keys do not form a torchvision ResNet (first keys: {list(state)[:6]})"
        )
    if arch and arch != found:
        raise CheckpointError(f"{path} holds a {found}, not a {arch}: pass --arch {found}")
    ckpt = Checkpoint(arch=found, state_dict=state, head=head, num_classes=num_classes, hidden=hidden or 256,
                      class_names=class_names, kind=kind, sha256=sha256_file(path), meta=meta)
    if class_names and len(class_names) != num_classes:
        raise CheckpointError(f"{path}: {len(class_names)} class names for a {num_classes}-class head")
    return ckpt


def load_into_model(ckpt: Checkpoint, dropout: float = 0.2) -> torch.nn.Module:
    model = build_resnet(ckpt.arch, ckpt.head, ckpt.num_classes, ckpt.hidden, dropout)
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
    return build_resnet(arch, "none")


def imagenet_model(arch: str) -> tuple[torch.nn.Module, list[str], str]:
    """torchvision's ImageNet weights (downloaded once into the torch hub cache)."""
    if arch not in ARCHS:
        raise CheckpointError(f"unknown arch {arch}")
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
