"""Labelled image folders (ImageFolder layout) and the deterministic per-class split.

``root/<class folder>/<image>``; Stanford Dogs folder names such as
``n02085620-Chihuahua`` give the class name ``Chihuahua`` (the WordNet id is dropped,
the rest kept verbatim). Class order is the sorted folder order, as torchvision's
ImageFolder has it, so label indices match a checkpoint trained with ImageFolder.

Fine-tuning (validation split) and evaluation (query split) use the same split
function: per class, seeded by ``(seed, folder name)``, so adding a class does not
reshuffle the others.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from imgsearch.errors import ImgsearchError
from imgsearch.labels import IMAGE_SUFFIXES
from imgsearch.labels import folder_label as class_name


class DatasetError(ImgsearchError):
    """The data folder is not a usable labelled image folder."""

    code = "bad_dataset"


@dataclass
class LabelledImages:
    root: Path
    paths: list[Path]
    labels: list[int]  # index into class_names
    class_names: list[str]
    folders: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def label_names(self) -> list[str]:
        return [self.class_names[i] for i in self.labels]

    def subset(self, idx: list[int]) -> "LabelledImages":
        return LabelledImages(self.root, [self.paths[i] for i in idx], [self.labels[i] for i in idx],
                              self.class_names, self.folders)


def scan_folder(root: str | Path, min_per_class: int = 1) -> LabelledImages:
    """Index ``root/<class>/<image>`` (image suffixes only, hidden files skipped)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a directory")
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    paths: list[Path] = []
    labels: list[int] = []
    kept: list[str] = []
    for folder in folders:
        files = sorted(p for p in (root / folder).rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        if len(files) < min_per_class:
            continue
        kept.append(folder)
        paths += files
        labels += [len(kept) - 1] * len(files)
    if not kept:
        raise DatasetError(
            f"{root} holds no class folders with images: expected {root}/<class>/<image>.jpg "
            "(ImageFolder layout, e.g. Stanford Dogs' Images/n02085620-Chihuahua/...)"
        )
    names = [class_name(f) for f in kept]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DatasetError(f"{root}: several folders map to the same class name: {', '.join(dupes)}")
    return LabelledImages(root, paths, labels, names, kept)


def split_per_class(data: LabelledImages, fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Return (kept, held_out) indices; ``fraction`` of each class is held out.

    Each class with 2+ images holds out at least one and keeps at least one; the choice
    depends only on ``seed`` and the class folder's own file list.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"split fraction must be in [0, 1), not {fraction}")
    by_class: dict[int, list[int]] = {}
    for i, lab in enumerate(data.labels):
        by_class.setdefault(lab, []).append(i)
    kept: list[int] = []
    held: list[int] = []
    for lab, idx in sorted(by_class.items()):
        order = sorted(idx, key=lambda i: str(data.paths[i]))
        random.Random(f"{seed}:{data.folders[lab]}").shuffle(order)
        n = round(fraction * len(order))
        if fraction > 0 and len(order) >= 2:
            n = min(max(n, 1), len(order) - 1)
        else:
            n = 0
        held += sorted(order[:n])
        kept += sorted(order[n:])
    return sorted(kept), sorted(held)
