"""Checkpoint formats are detected from keys; bad files fail with the reason."""

from __future__ import annotations

import pytest
import torch
import torchvision

from imgsearch.errors import CheckpointError
from imgsearch.export.checkpoint import (
    FINETUNE_FORMAT,
    infer_arch,
    load_into_model,
    read_checkpoint,
)
from imgsearch.export.model import build_net, mlp_head


def test_plain_torchvision_state_dict(tmp_path):
    m = torchvision.models.resnet18(num_classes=7)
    p = tmp_path / "plain.pth"
    torch.save(m.state_dict(), p)
    ck = read_checkpoint(p)
    assert (ck.arch, ck.head, ck.num_classes, ck.kind) == ("resnet18", "linear", 7, "torchvision")
    loaded = load_into_model(ck)
    assert torch.equal(loaded.state_dict()["layer4.1.conv2.weight"], m.state_dict()["layer4.1.conv2.weight"])


def test_kaggle_layout_with_dataparallel_prefix(tmp_path):
    m = torchvision.models.resnet34()
    m.fc = mlp_head(512, 120)
    p = tmp_path / "kaggle.pth"
    torch.save({f"module.{k}": v for k, v in m.state_dict().items()}, p)
    ck = read_checkpoint(p)
    assert (ck.arch, ck.head, ck.num_classes, ck.hidden, ck.kind) == ("resnet34", "mlp", 120, 256, "kaggle")
    assert torch.equal(load_into_model(ck).state_dict()["fc.3.weight"], m.state_dict()["fc.3.weight"])


def test_finetune_output_carries_class_names(tmp_path):
    m = build_net("resnet18", "mlp", 3)
    p = tmp_path / "ft.pt"
    torch.save({"format": FINETUNE_FORMAT, "arch": "resnet18", "state_dict": m.state_dict(),
                "class_names": ["a", "b", "c"], "metrics": [{"epoch": 1}]}, p)
    ck = read_checkpoint(p)
    assert ck.kind == "finetune" and ck.class_names == ["a", "b", "c"] and ck.head == "mlp"


def test_missing_and_unexpected_keys_are_named(tmp_path):
    sd = torchvision.models.resnet18().state_dict()
    sd.pop("layer4.1.bn2.running_mean")
    sd["extra.weight"] = torch.zeros(1)
    p = tmp_path / "bad.pth"
    torch.save(sd, p)
    with pytest.raises(CheckpointError, match=r"missing keys: layer4\.1\.bn2\.running_mean.*unexpected keys: extra\.weight"):
        load_into_model(read_checkpoint(p))


def test_arch_mismatch_is_explained(tmp_path):
    p = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), p)
    with pytest.raises(CheckpointError, match="holds a resnet18, not a resnet152: pass --arch resnet18"):
        read_checkpoint(p, "resnet152")


def test_pickled_whole_model_is_refused_with_conversion_hint(tmp_path):
    p = tmp_path / "whole.pth"
    torch.save(torchvision.models.resnet18(), p)
    with pytest.raises(CheckpointError, match="(?s)does not unpickle code.*state_dict"):
        read_checkpoint(p)


def test_not_a_resnet(tmp_path):
    p = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, p)
    with pytest.raises(CheckpointError, match="do not form a torchvision ResNet"):
        read_checkpoint(p)


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
def test_infer_arch_from_keys(arch):
    assert infer_arch(getattr(torchvision.models, arch)().state_dict()) == arch
