"""Find the images under an image root and name their labels.

Any folder of folders works: the top folder under the root is the label, with a
Stanford-Dogs synset prefix stripped (``n02085620-Chihuahua`` -> ``Chihuahua``); a file
directly in the root has the empty label. Hidden files and folders are skipped, symlinked
folders are not followed (no loops, nothing outside the root), and a symlinked file is
used only when it resolves to a file inside the root. Files are returned sorted, so
``--limit N`` and "which duplicate wins" are deterministic.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from imgsearch.labels import IMAGE_SUFFIXES
from imgsearch.labels import folder_label as strip_synset


@dataclass(frozen=True)
class ImageFile:
    path: Path  # absolute
    rel: str  # posix path relative to the root: what the store keeps, what the gateway serves
    label: str


@dataclass
class ScanResult:
    root: Path
    files: list[ImageFile]
    ignored: Counter = field(default_factory=Counter)  # reason -> count
    limited: bool = False  # --limit cut the list short
    errors: list[str] = field(default_factory=list)  # folders that could not be listed


def label_for(rel: str) -> str:
    parts = rel.split("/")
    return strip_synset(parts[0]) if len(parts) > 1 else ""


def scan(root: str | Path, limit: int | None = None) -> ScanResult:
    """Walk ``root`` (sorted, depth first) and return the image files in it."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise NotADirectoryError(f"image root {root} is not a folder")
    files: list[ImageFile] = []
    ignored: Counter = Counter()
    errors: list[str] = []

    def walk_error(e: OSError) -> None:
        errors.append(f"{e.filename}: {e.strerror or e}")
        ignored["unreadable folder"] += 1

    for dirpath, dirnames, filenames in os.walk(root, onerror=walk_error, followlinks=False):
        here = Path(dirpath)
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                ignored["hidden"] += 1
            elif (here / d).is_symlink():
                ignored["symlinked folder (not followed)"] += 1
            else:
                keep.append(d)
        dirnames[:] = keep  # os.walk descends only into these, in this order
        for name in sorted(filenames):
            p = here / name
            if name.startswith("."):
                ignored["hidden"] += 1
                continue
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                ignored[f"not an image name ({p.suffix.lower() or 'no extension'})"] += 1
                continue
            if p.is_symlink():
                target = p.resolve()
                if not target.is_relative_to(root):
                    ignored["symlink out of the image root"] += 1
                    continue
                if not target.is_file():
                    ignored["symlink to a non-file"] += 1
                    continue
            elif not p.is_file():
                ignored["not a regular file"] += 1
                continue
            rel = p.relative_to(root).as_posix()
            files.append(ImageFile(p, rel, label_for(rel)))
            if limit is not None and len(files) >= limit:
                return ScanResult(root, files, ignored, limited=True, errors=errors)
    return ScanResult(root, files, ignored, errors=errors)
