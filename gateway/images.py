"""Serving indexed files: only from under the image root, whatever the index says.

The ``path`` stored in Milvus is relative to ``IMGSEARCH_IMAGE_ROOT``. An entry could
still hold ``../..``, an absolute path, or point at a symlink leading out of the root
(a hostile index, a careless re-index, a swapped folder). So: refuse absolute paths and
``..`` components outright, resolve the rest (following symlinks) and require the result
to lie under the resolved root, then open what was checked with O_NOFOLLOW and check the
opened descriptor once more (a symlink swapped in between is caught).
"""

from __future__ import annotations

import os
import stat
from collections import OrderedDict
from pathlib import Path, PurePosixPath
from threading import Lock
from typing import BinaryIO

from imgsearch.imaging import DecodeBudget, sniff_format, thumbnail

from .errors import ApiError

MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif",
               "BMP": "image/bmp"}
MAX_SERVE_BYTES = 64 * 1024 * 1024


def forbidden(msg: str) -> ApiError:
    return ApiError(403, "forbidden_path", msg)


def resolve_under(root: Path, rel: str) -> Path:
    """The real file ``rel`` names under ``root``, or ApiError 403/404.

    ``root`` is the already resolved image root (``Runtime.image_root``, resolved once at
    startup), so a request resolves only the stored path.
    """
    if not rel or "\x00" in rel:
        raise forbidden("empty or invalid stored path")
    pure = PurePosixPath(rel.replace("\\", "/"))
    if pure.is_absolute() or rel.startswith(("/", "\\")):
        raise forbidden("the indexed path is absolute; only paths under the image root are served")
    if ".." in pure.parts:
        raise forbidden("the indexed path contains '..'; only paths under the image root are served")
    try:
        target = (root / pure).resolve(strict=True)
    except (FileNotFoundError, NotADirectoryError):
        raise ApiError(404, "not_found", "the indexed file is gone from the image root") from None
    except (OSError, RuntimeError):  # symlink loop, permission
        raise forbidden("the indexed path cannot be resolved") from None
    if not target.is_relative_to(root):
        raise forbidden("the indexed path leads outside the image root (symlink?)")
    return target


def open_under(root: Path, rel: str, max_bytes: int = MAX_SERVE_BYTES) -> tuple[BinaryIO, int]:
    """Open the file checked by :func:`resolve_under` (``root`` resolved; blocking: call from a
    thread): (the open file, its size). The caller closes it."""
    target = resolve_under(root, rel)
    try:
        fd = os.open(target, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ApiError(404, "not_found", "the indexed file is gone from the image root") from None
    except OSError:
        raise forbidden("the indexed file cannot be opened") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise forbidden("the indexed path is not a regular file")
        proc = f"/proc/self/fd/{fd}"
        if os.path.exists(proc) and not Path(os.readlink(proc)).is_relative_to(root):
            raise forbidden("the indexed path leads outside the image root")
        if st.st_size > max_bytes:
            raise ApiError(404, "not_found", "the indexed file is too large to serve")
        return os.fdopen(fd, "rb"), st.st_size
    except BaseException:
        os.close(fd)
        raise


def open_image_under(root: Path, rel: str) -> tuple[BinaryIO, int, str]:
    """(open file, size, media type) of an indexed image, checked as :func:`open_under` does and
    refused unless its content is an allowed image; for streaming it (blocking: call from a thread)."""
    f, size = open_under(root, rel)
    try:
        kind = media_type(f.read(16))
        f.seek(0)
    except BaseException:
        f.close()
        raise
    return f, size, kind


def thumbnail_under(root: Path, rel: str, max_side: int, max_pixels: int, budget: DecodeBudget) -> bytes:
    """A JPEG thumbnail of an indexed image, checked as :func:`open_image_under` does and read from
    its file as it decodes, in ``budget`` (blocking: call from a thread)."""
    f, _, _ = open_image_under(root, rel)
    with f:
        return thumbnail(f, max_side, max_pixels, budget)


def media_type(data: bytes) -> str:
    fmt = sniff_format(data)
    if fmt is None:
        # the index points at something that is not an allowed image: do not serve it as one
        raise ApiError(404, "not_found", "the indexed file is not a servable image")
    return MEDIA_TYPES[fmt]


class ThumbCache:
    """A small LRU of JPEG thumbnails by image id (ids are content hashes: never stale)."""

    def __init__(self, items: int) -> None:
        self.items = max(0, items)
        self._d: OrderedDict[int, bytes] = OrderedDict()
        self._lock = Lock()

    def get(self, key: int) -> bytes | None:
        with self._lock:
            v = self._d.get(key)
            if v is not None:
                self._d.move_to_end(key)
            return v

    def put(self, key: int, value: bytes) -> None:
        if not self.items:
            return
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.items:
                self._d.popitem(last=False)

    def drop(self, key: int) -> None:
        with self._lock:
            self._d.pop(key, None)
