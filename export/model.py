"""Model building: a torchvision ResNet or timm's EfficientNet-Lite0 with the project's heads, wrapped for serving.

The served graph takes what the wire carries (``uint8`` RGB NHWC) and returns what the
search needs (an L2-normalised embedding, plus softmax ``probs`` when there is a
classifier head), so no client ever re-implements normalisation.
"""

from __future__ import annotations

from typing import Literal

import torch
import torchvision
from torch import nn

from .archs import ARCHS, EFFICIENTNETS, RESNETS  # noqa: F401 - re-exported

EmbeddingKind = Literal["pool", "head", "logits"]
HeadKind = Literal["none", "linear", "mlp"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TensorFlow's EfficientNet-Lite preprocessing: (x - 127.5) / 127.5, timm's in1k config for it
TF_LITE_MEAN = (0.5, 0.5, 0.5)
TF_LITE_STD = (0.5, 0.5, 0.5)
RANDOM_SEED = 0
TIMM_NAMES = {"efficientnet_lite0": "tf_efficientnet_lite0"}


def norm_constants(arch: str = "resnet152") -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) on the 0..1 scale that ``arch``'s pretrained weights were trained with."""
    return (TF_LITE_MEAN, TF_LITE_STD) if arch in EFFICIENTNETS else (IMAGENET_MEAN, IMAGENET_STD)


def pixel_norm(arch: str = "resnet152") -> tuple[torch.Tensor, torch.Tensor]:
    """``arch``'s mean and std on the 0..255 scale, shaped [1,3,1,1].

    The ONNX graph and fine-tuning both normalise with ``(x - mean) / std`` on these
    tensors, so a model is trained on exactly the arithmetic it is served with.
    """
    m, s = norm_constants(arch)
    return torch.tensor(m).view(1, 3, 1, 1) * 255.0, torch.tensor(s).view(1, 3, 1, 1) * 255.0


def feature_dim(arch: str) -> int:
    if arch in EFFICIENTNETS:
        return 1280
    return 512 if arch in ("resnet18", "resnet34") else 2048


def mlp_head(in_features: int, num_classes: int, hidden: int = 256, dropout: float = 0.2) -> nn.Sequential:
    """The original project's head: Linear(F,256) -> ReLU -> Dropout -> Linear(256,C).

    Its indices (``fc.0``, ``fc.3``) are what the Kaggle checkpoint's keys use.
    """
    return nn.Sequential(
        nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
    )


def _efficientnet(arch: str) -> nn.Module:
    """timm's network with its classifier moved to ``fc``, so that every arch has the same head slot.

    timm's ``forward`` calls ``classifier`` after pooling; with that set to Identity the
    network returns the pooled features, exactly like a torchvision ResNet whose ``fc`` is
    taken out. The state_dict keys are timm's, except ``classifier.*`` -> ``fc.*``.
    """
    import timm

    model = timm.create_model(TIMM_NAMES[arch], pretrained=False, num_classes=1000)
    model.fc = model.classifier
    model.classifier = nn.Identity()
    return model


def build_net(arch: str, head: HeadKind = "none", num_classes: int = 0, hidden: int = 256,
              dropout: float = 0.2) -> nn.Module:
    """An untrained network of ``arch`` whose ``fc`` is the requested head (Identity for none)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    model = _efficientnet(arch) if arch in EFFICIENTNETS else getattr(torchvision.models, arch)(weights=None)
    feats = model.fc.in_features
    if head == "none":
        model.fc = nn.Identity()
    elif head == "linear":
        model.fc = nn.Linear(feats, num_classes)
    else:
        model.fc = mlp_head(feats, num_classes, hidden, dropout)
    return model


class ServingModel(nn.Module):
    """uint8 NHWC in; (embedding, probs?) out. Normalisation and layout change inside."""

    def __init__(self, net: nn.Module, head: HeadKind, embedding: EmbeddingKind = "pool",
                 half: bool = False, arch: str = "resnet152") -> None:
        super().__init__()
        if head == "none" and embedding != "pool":
            raise ValueError(f"--embedding {embedding} needs a classifier head; this model has none")
        if head == "linear" and embedding == "head":
            raise ValueError("--embedding head needs the Linear-ReLU-Dropout-Linear head; this model's fc is one Linear")
        self.head_kind = head
        self.embedding_kind = embedding
        self.use_half = half
        self.fc = net.fc
        net.fc = nn.Identity()
        self.backbone = net
        mean, std = pixel_norm(arch)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        if half:
            self.backbone.half()
            self.fc.half()

    @property
    def has_probs(self) -> bool:
        return self.head_kind != "none"

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = images.permute(0, 3, 1, 2).to(torch.float32)
        x = (x - self.mean) / self.std
        if self.use_half:
            x = x.half()
        pooled = self.backbone(x)
        if self.head_kind == "none":
            return (nn.functional.normalize(pooled.float(), dim=1),)
        if self.head_kind == "mlp":
            hidden = self.fc[1](self.fc[0](pooled))  # Linear + ReLU: the 256-d layer
            logits = self.fc[3](self.fc[2](hidden))
        else:
            hidden = pooled
            logits = self.fc(pooled)
        emb = {"pool": pooled, "head": hidden, "logits": logits}[self.embedding_kind]
        probs = torch.softmax(logits.float(), dim=1)
        return nn.functional.normalize(emb.float(), dim=1), probs

    def embedding_dim(self) -> int:
        with torch.no_grad():
            out = self.forward(torch.zeros(1, 224, 224, 3, dtype=torch.uint8, device=self.mean.device))
        return int(out[0].shape[1])
