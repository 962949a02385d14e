"""Folder names -> labels, one rule for the indexer (Milvus labels) and training (labels.txt)."""

from __future__ import annotations

import re

# suffixes worth opening; the decoder still decides by content
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp"})
_SYNSET = re.compile(r"^n\d{8}-(?=.)")


def folder_label(name: str) -> str:
    """``n02085620-Chihuahua`` -> ``Chihuahua`` (Stanford Dogs); other names unchanged."""
    return _SYNSET.sub("", name)
