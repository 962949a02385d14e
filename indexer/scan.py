"""Find the images under an image root and name their labels.

Any folder of folders works: the top folder under the root is the label, with a
Stanford-Dogs synset prefix stripped (``n02085620-Chihuahua`` -> ``Chihuahua``); a file
directly in the root has the empty label. Hidden files and folders are skipped, symlinked
folders are not followed (no loops, nothing outside the root), and a symlinked file is
used only when it resolves to a file inside the root. Files are returned sorted, so
``--limit N`` and "which duplicate wins" are deterministic.

``--shard K/N`` keeps the files whose path relative to the root hashes into shard K of
N (``shard_of``). The relative path is what every pod sees the same way, whatever the
mount point, and what the store keeps, so a stored entry can be traced to its shard too.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from imgsearch.labels import IMAGE_SUFFIXES, LABEL_FILE, read_folder_label
from imgsearch.labels import folder_label as strip_synset


@dataclass(frozen=True)
class ImageFile:
    path: Path  # absolute
    rel: str  # posix path relative to the root: what the store keeps, what the gateway serves
    label: str


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based, as a Kubernetes Indexed Job numbers its pods)."""

    index: int
    count: int

    def owns(self, rel: str) -> bool:
        return shard_of(rel, self.count) == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


_SHARD = re.compile(r"\s*(-?\d+)\s*/\s*(-?\d+)\s*")


def parse_shard(text: str) -> Shard:
    """``"K/N"`` -> Shard; ValueError with a message that says what is allowed."""
    m = _SHARD.fullmatch(text)
    if not m:
        raise ValueError(f"--shard {text!r}: expected K/N, e.g. 0/4 (shard K of N, K counted from 0)")
    k, n = int(m.group(1)), int(m.group(2))
    if n < 1:
        raise ValueError(f"--shard {text!r}: N (the number of shards) must be at least 1")
    if not 0 <= k < n:
        raise ValueError(f"--shard {text!r}: K must be between 0 and {n - 1} (counted from 0, "
                         "like JOB_COMPLETION_INDEX)")
    return Shard(k, n)


def shard_of(rel: str, count: int) -> int:
    """The shard of a root-relative posix path: stable across processes, machines and Python
    versions (``hash()`` is salted per process), and uniform over any set of names."""
    digest = hashlib.blake2b(rel.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


@dataclass
class ScanResult:
    root: Path
    files: list[ImageFile]
    ignored: Counter = field(default_factory=Counter)  # reason -> count
    limited: bool = False  # --limit cut the list short
    errors: list[str] = field(default_factory=list)  # folders that could not be listed
    shard: Shard | None = None  # only this shard's files are in ``files``
    other_shards: int = 0  # files left to the other shards

    def owns(self, rel: str) -> bool:
        """Is a stored path this scan's business? (--sync must not touch other shards' entries.)"""
        return self.shard is None or self.shard.owns(rel)


def label_for(rel: str, root: Path | None = None) -> str:
    """The label of a root-relative path: its top folder's (read from the folder's label file
    when ``root`` is given and the folder has one), empty for a file directly in the root."""
    parts = rel.split("/")
    if len(parts) == 1:
        return ""
    return read_folder_label(root / parts[0]) if root is not None else strip_synset(parts[0])


def scan(root: str | Path, limit: int | None = None, shard: Shard | None = None) -> ScanResult:
    """Walk ``root`` (sorted, depth first) and return the image files in it (of ``shard`` only,
    when given; ``limit`` then counts that shard's files)."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise NotADirectoryError(f"image root {root} is not a folder")
    files: list[ImageFile] = []
    ignored: Counter = Counter()
    errors: list[str] = []
    others = 0
    labels: dict[str, str] = {}  # top folder -> its label, read once

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
                if not (name == LABEL_FILE and here != root):
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
            if shard is not None and not shard.owns(rel):
                others += 1
                continue
            top = rel.split("/")[0] if "/" in rel else ""
            if top not in labels:
                labels[top] = label_for(rel, root)
            files.append(ImageFile(p, rel, labels[top]))
            if limit is not None and len(files) >= limit:
                return ScanResult(root, files, ignored, limited=True, errors=errors, shard=shard, other_shards=others)
    return ScanResult(root, files, ignored, errors=errors, shard=shard, other_shards=others)
