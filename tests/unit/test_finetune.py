"""Fine-tuning pieces: freezing, augmentation, normalisation parity, the checkpoint file."""

from __future__ import annotations

import random
import urllib.request

import pytest
import torch
import torchvision

from harness.data import make_dataset
from imgsearch.errors import CheckpointError
from imgsearch.export.checkpoint import FINETUNE_FORMAT, read_checkpoint
from imgsearch.export.finetune import (
    FinetuneConfig,
    augment,
    build_model,
    finetune,
    freeze_for_finetune,
    random_resized_crop_box,
    save_atomic,
    set_train_mode,
)
from imgsearch.export.model import ServingModel, build_net, mlp_head, pixel_norm

ALLOWED = (torch.Tensor, str, int, float, bool, type(None))


def walk(obj, path="ckpt"):
    """Yield (path, type) of every leaf that is not an allowed plain type."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                yield f"{path}[{k!r}] key", type(k)
            yield from walk(v, f"{path}[{k!r}]")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from walk(v, f"{path}[{i}]")
    elif not isinstance(obj, ALLOWED):
        yield path, type(obj)


def test_only_layer4_and_head_train():
    model = build_net("resnet18", "mlp", 4)
    trainable, total = freeze_for_finetune(model)
    by_hand = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("layer4.", "fc.")))
    assert trainable == by_hand and 0 < trainable < total
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"layer4", "fc"}

    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    set_train_mode(model)
    x, y = torch.randn(4, 3, 64, 64) * 3 + 1, torch.tensor([0, 1, 2, 3])
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    changed = {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    # frozen stages keep weights AND BatchNorm statistics (they run in eval mode)
    assert changed == {"layer4", "fc"}


def test_augment_is_seeded_and_shaped():
    img = torch.randint(0, 256, (3, 256, 256), dtype=torch.uint8)
    a = augment(img, 224, random.Random("s:1:5"))
    assert a.shape == (3, 224, 224) and a.dtype == torch.uint8
    assert torch.equal(a, augment(img, 224, random.Random("s:1:5")))
    assert not torch.equal(a, augment(img, 224, random.Random("s:2:5")))
    rng = random.Random(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(256, 200, rng)
        assert 0 <= top and top + h <= 256 and 0 <= left and left + w <= 200 and h > 0 and w > 0


def test_training_normalisation_is_the_served_graphs():
    torch.manual_seed(0)
    net = build_net("resnet18", "mlp", 3).eval()
    imgs = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8)
    mean, std = pixel_norm()
    x = (imgs.permute(0, 3, 1, 2).float() - mean) / std  # what finetune feeds the model
    with torch.no_grad():
        trained_view = torch.softmax(net(x), 1)
        served = ServingModel(net, "mlp", "pool")(imgs)[1]
    torch.testing.assert_close(served, trained_view, rtol=0, atol=1e-6)


def test_build_model_keeps_a_matching_kaggle_head_and_replaces_others(tmp_path):
    m = torchvision.models.resnet18()
    m.fc = mlp_head(512, 5)
    p = tmp_path / "k.pth"
    torch.save({f"module.{k}": v for k, v in m.state_dict().items()}, p)
    same, arch, tag = build_model(str(p), None, 5, 0.2, seed=0)
    assert arch == "resnet18" and tag.startswith("checkpoint:kaggle")
    assert torch.equal(same.fc[3].weight, m.fc[3].weight)
    other, _, _ = build_model(str(p), None, 3, 0.2, seed=0)
    assert other.fc[3].weight.shape == (3, 256)
    assert torch.equal(other.layer4[1].conv2.weight, m.layer4[1].conv2.weight)
    with pytest.raises(CheckpointError, match="not a resnet50"):
        build_model(str(p), "resnet50", 5, 0.2, seed=0)


def test_imagenet_offline_is_a_clear_error(tmp_path, monkeypatch):
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # loopback, nothing listens: offline
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    # urlopen caches one opener, proxies and all, for the whole process: without this the dead
    # proxy outlives the test and later loopback requests (loadtest's /healthz check) are refused
    monkeypatch.setattr(urllib.request, "_opener", None)
    with pytest.raises(CheckpointError, match="could not download torchvision's resnet18 ImageNet weights.*--weights random"):
        build_model("imagenet", "resnet18", 3, 0.2, seed=0)


def test_checkpoint_is_plain_data_and_reads_back(tmp_path):
    make_dataset(tmp_path / "d", classes=2, per_class=4)
    out = tmp_path / "ck.pt"
    res = finetune(FinetuneConfig(data=tmp_path / "d", out=out, arch="resnet18", weights="random", epochs=1,
                                  batch_size=4, workers=0, image_size=32, progress=False))
    obj = torch.load(out, weights_only=True)
    assert list(walk(obj)) == []
    assert obj["format"] == FINETUNE_FORMAT and obj["epoch"] == 1 and len(obj["metrics"]) == 1
    assert obj["class_names"] == ["class_0", "class_1"] and obj["arch"] == "resnet18"
    assert {"optimizer", "scheduler", "scaler", "rng", "model"} <= set(obj["resume"])
    assert "fc.0.weight" in obj["state_dict"] and "fc.3.weight" in obj["state_dict"]
    ck = read_checkpoint(out)
    assert (ck.kind, ck.head, ck.num_classes, ck.class_names) == ("finetune", "mlp", 2, ["class_0", "class_1"])
    assert res.trainable_params < res.total_params
    with pytest.raises(CheckpointError, match="--resume"):
        finetune(FinetuneConfig(data=tmp_path / "d", out=out, arch="resnet18", weights="random", epochs=1,
                                workers=0, image_size=32, progress=False))


def test_save_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "ck.pt"
    save_atomic({"format": FINETUNE_FORMAT, "epoch": 1}, out)
    real_save = torch.save

    def dies_halfway(obj, f, *a, **kw):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # a kill in the middle of writing

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"format": FINETUNE_FORMAT, "epoch": 2}, out)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(out, weights_only=True)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_zero_epochs_save_the_untrained_model(tmp_path):
    make_dataset(tmp_path / "d", classes=3, per_class=5)
    out = tmp_path / "e0.pt"
    finetune(FinetuneConfig(data=tmp_path / "d", out=out, arch="resnet18", weights="random", epochs=0,
                            workers=0, progress=False))
    obj = torch.load(out, weights_only=True)
    assert obj["epoch"] == 0 and obj["metrics"] == []
    torch.manual_seed(0)
    fresh = build_net("resnet18", "mlp", 3)
    for k, v in fresh.state_dict().items():
        assert torch.equal(obj["state_dict"][k], v), k


def test_a_finetune_head_for_other_classes_is_replaced(tmp_path):
    make_dataset(tmp_path / "d", classes=2, per_class=3)
    out = tmp_path / "e0.pt"
    finetune(FinetuneConfig(data=tmp_path / "d", out=out, arch="resnet18", weights="random", epochs=0,
                            workers=0, progress=False))
    kept, _, _ = build_model(str(out), None, 2, 0.2, seed=5, class_names=["class_0", "class_1"])
    other, _, _ = build_model(str(out), None, 2, 0.2, seed=5, class_names=["cat", "dog"])
    saved = torch.load(out, weights_only=True)["state_dict"]
    assert torch.equal(kept.fc[3].weight, saved["fc.3.weight"])
    assert not torch.equal(other.fc[3].weight, saved["fc.3.weight"])  # same count, other names: a new head
    assert torch.equal(other.layer4[0].conv1.weight, saved["layer4.0.conv1.weight"])


def test_a_corrupt_weights_file_names_the_file_and_writes_nothing(tmp_path):
    make_dataset(tmp_path / "d", classes=2, per_class=3)
    data_before = sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "d").rglob("*"))
    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"PK\x03\x04 not really a zip" + bytes(range(256)) * 10)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(CheckpointError, match=rf"{bad}.*Expected a file written by torch.save"):
        finetune(FinetuneConfig(data=tmp_path / "d", out=out_dir / "ft.pt", weights=str(bad), epochs=1,
                                workers=0, image_size=32, progress=False))
    assert list(out_dir.iterdir()) == []
    assert sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "d").rglob("*")) == data_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "out", "weights.pth"]
