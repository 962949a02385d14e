"""The model card: what the exporter promises about the model it wrote.

Readers (gateway, indexer, tests) trust the card for dims, tensor names and whether
there is a classifier head, and use ``model_sha`` to refuse mixing embeddings of two
models in one collection.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ModelRepositoryError

INPUT_NAME = "images"
BYTES_INPUT = "image_bytes"  # the image_search ensemble's input: encoded files, BYTES [N, 1]
ENSEMBLE_NAME = "image_search"  # preprocess (decode in Triton) -> the encoder
EMBEDDING_NAME = "embedding"
PROBS_NAME = "probs"
CARD_FILE = "model_card.json"
LABELS_FILE = "labels.txt"


@dataclass
class ModelCard:
    name: str
    arch: str
    embedding: str  # pool | head | logits
    embedding_dim: int
    num_classes: int  # 0: no classifier head, so no probs output
    weights: str  # random:<seed> | torchvision:<enum> | packaged:<wheel> | checkpoint:<kind>
    checkpoint_sha256: str
    model_sha: str  # identifies the embedding space: arch + weights + embedding kind
    precision: str = "fp32"
    input_size: int = 224
    input_name: str = INPUT_NAME
    outputs: list[str] = field(default_factory=lambda: [EMBEDDING_NAME])
    exported_at: str = ""
    parity: dict = field(default_factory=dict)
    opset: int = 17

    @property
    def has_probs(self) -> bool:
        return self.num_classes > 0

    @property
    def untrained(self) -> bool:
        return self.weights.startswith("random")

    @property
    def weights_description(self) -> str:
        """What a person reads on the page and in /readyz: where the weights came from."""
        kind, _, detail = self.weights.partition(":")
        return {
            "random": "random weights, untrained",
            "torchvision": "ImageNet weights (torchvision)",
            "packaged": f"ImageNet weights ({detail})",
            "checkpoint": f"checkpoint ({detail})",
        }.get(kind, self.weights)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def model_dir(repository: Path, name: str) -> Path:
    return Path(repository) / name


def read_card(repository: Path, name: str) -> ModelCard:
    path = model_dir(repository, name) / CARD_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelRepositoryError(
            f"no model card at {path}: export a model first (imgsearch export --repository {repository})"
        ) from None
    except (OSError, ValueError) as e:
        raise ModelRepositoryError(f"unreadable model card {path}: {e}") from None
    known = set(ModelCard.__dataclass_fields__)
    return ModelCard(**{k: v for k, v in data.items() if k in known})


def read_labels(repository: Path, name: str) -> list[str]:
    path = model_dir(repository, name) / LABELS_FILE
    if not path.exists():
        return []
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def sha256_file(path: Path) -> str:
    """Checkpoint identity recorded in the card (and compared by ``make demo``)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
