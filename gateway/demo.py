"""Helpers for ``make demo``: is the exported model already the one asked for? Which image to curl?

    python -m imgsearch.gateway.demo card-matches WEIGHTS ARCH   # exit 0: model_repository already holds it
    python -m imgsearch.gateway.demo example-image DIR            # prints one image path under DIR

``card-matches`` reads the model card the exporter wrote: ``random`` matches random weights
of that arch, ``imagenet`` torchvision's weights of that arch, ``packaged`` the packaged
EfficientNet-Lite0, ``auto`` either ImageNet model (so a demo exported offline keeps its
packaged model; ``make demo WEIGHTS=imagenet`` switches), a file path matches when the
card's checkpoint sha256 is the file's. An empty ARCH matches any arch. Export takes
minutes for ResNet-152 on a CPU, so ``make demo`` skips it when nothing changed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from imgsearch.errors import ModelRepositoryError
from imgsearch.model_card import model_dir, read_card, sha256_file
from imgsearch.settings import get_settings


def card_matches(weights: str, arch: str, repository: Path, name: str) -> tuple[bool, str]:
    try:
        card = read_card(repository, name)
    except ModelRepositoryError as e:
        return False, str(e)
    if not (model_dir(repository, name) / "1" / "model.onnx").exists():
        return False, "model.onnx is missing"
    same_arch = not arch or card.arch == arch
    if weights == "random":
        ok = card.weights.startswith("random") and card.arch == (arch or "resnet152")
    elif weights in ("imagenet", "packaged", "auto"):
        kinds = {"imagenet": ("torchvision:",), "packaged": ("packaged:",), "auto": ("torchvision:", "packaged:")}
        ok = card.weights.startswith(kinds[weights]) and same_arch
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            return False, f"{path} is not a file"
        ok = card.checkpoint_sha256 == sha256_file(path)
    return ok, f"model card: {card.arch}, weights {card.weights}, sha {card.checkpoint_sha256[:12]}"


def example_image(root: Path) -> str:
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in (".jpg", ".jpeg", ".png") and p.is_file():
            return str(p)
    return str(root / "some.jpg")


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "card-matches":
        s = get_settings()
        ok, why = card_matches(argv[1], argv[2], s.model_repository, s.model_name)
        print(("export skipped, the model is already there: " if ok else "export needed: ") + why)
        return 0 if ok else 1
    if len(argv) == 2 and argv[0] == "example-image":
        print(example_image(Path(argv[1])))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
