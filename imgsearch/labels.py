"""Folder names <-> labels, one rule for the indexer (Milvus labels), the gateway's uploads and
training (labels.txt).

A label is its top folder's name (``n02085620-Chihuahua`` -> ``Chihuahua``). A label that no
folder name reads back as (one with a ``/``, a leading dot, a synset-like prefix, over 255
bytes) gets a folder named ``<slug>-<hash>`` holding a ``LABEL_FILE`` with the label itself, so
the label survives a re-index of the folder as it is.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

# suffixes worth opening; the decoder still decides by content
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp"})
LABEL_FILE = ".imgsearch-label"  # hidden: the scan skips it as it skips every hidden file
NAME_MAX = 255  # bytes in one path component on the usual file systems
_SYNSET = re.compile(r"^n\d{8}-(?=.)")


def folder_label(name: str) -> str:
    """``n02085620-Chihuahua`` -> ``Chihuahua`` (Stanford Dogs); other names unchanged."""
    return _SYNSET.sub("", name)


def label_folder(label: str) -> str:
    """The folder that holds a label's images: the label itself whenever :func:`folder_label`
    reads it back unchanged (柴犬, quotes and backslashes included); else a slug made unique by
    a hash of the label, whose ``LABEL_FILE`` :func:`write_label_file` writes."""
    if ("/" not in label and label not in ("", ".", "..") and not label.startswith(".")
            and folder_label(label) == label and len(label.encode("utf-8")) <= NAME_MAX and "\0" not in label):
        return label
    slug = re.sub(r"[^A-Za-z0-9._ -]+", "_", _SYNSET.sub(lambda m: m.group(0)[:-1] + "_", label)).strip(" ._")[:100]
    digest = hashlib.blake2b(label.encode("utf-8", "surrogateescape"), digest_size=4).hexdigest()
    return f"{slug or 'label'}-{digest}"


def read_folder_label(folder: Path) -> str:
    """The label of a top folder under the image root: its ``LABEL_FILE`` when it has one."""
    try:
        text = (folder / LABEL_FILE).read_bytes().decode("utf-8")  # exactly the label: no newline added
    except (OSError, UnicodeDecodeError):
        return folder_label(folder.name)
    return text or folder_label(folder.name)


def write_label_file(folder: Path, label: str) -> bool:
    """Record ``label`` as ``folder``'s label; False when the folder already names another label.

    The file appears whole or not at all (written aside, then hard-linked into place, which
    fails if it exists): a concurrent reader never sees it empty, two writers never both win.
    """
    path = folder / LABEL_FILE
    if path.exists():  # the common case, every later add to the label: no write at all
        return read_folder_label(folder) == label
    fd, tmp = tempfile.mkstemp(prefix=".label-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(label.encode("utf-8"))
        try:
            os.link(tmp, path)
        except FileExistsError:
            return read_folder_label(folder) == label
        return True
    finally:
        os.unlink(tmp)
