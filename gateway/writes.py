"""The files ``POST /v1/images`` keeps under the image root: writing, naming, removing.

A failed write is the caller's to understand: a label whose folder is taken by a file is a
409, a full or read-only image root a 503 (retry once an operator has made room), never a
500. Messages name the root-relative path only, never where the root lives.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from pathlib import Path
from typing import Any

from imgsearch.labels import read_folder_label, write_label_file

from .errors import ApiError

EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}


def upload_name(prefix: str, id_: int, fmt: str) -> str:
    return f"{prefix}{id_}.{EXT[fmt]}"


def is_own_upload(rel: str, prefix: str, id_: int) -> bool:
    """Is ``rel`` the file POST /v1/images stored for this id (and not a dataset file that merely
    starts with the prefix)?"""
    return Path(rel).name in {upload_name(prefix, id_, fmt) for fmt in EXT}


def _write_error(e: OSError, rel: str) -> ApiError:
    folder = rel.split("/")[0]
    if isinstance(e, (FileExistsError, NotADirectoryError, IsADirectoryError)):
        return ApiError(409, "path_conflict", f"cannot store the image as {rel!r}: {folder!r} (or the file name) "
                                              "is taken by something else under the image root; use another label")
    if e.errno in _FULL:
        return ApiError(503, "storage_full", "the image root is full: the image was not added; retry later")
    if e.errno in _READ_ONLY:
        return ApiError(503, "storage_read_only", "the image root is not writable: the image was not added")
    return ApiError(503, "storage_unavailable", f"the image root failed ({os.strerror(e.errno or 0)}): "
                                                "the image was not added")


def store_file(root: Path, rel: str, data: bytes, label: str | None = None) -> bool:
    """Write atomically under the root; False when the same file is already there.

    ``label``: the label the file's top folder must read back as on a re-index (its
    ``LABEL_FILE`` written when the folder name cannot say it); a folder that already names
    another label is a 409.
    """
    dest = root / rel
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.parent.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(dest.parent))
        if not dest.resolve().is_relative_to(root):
            raise ApiError(403, "forbidden_path", "upload folder leads outside the image root")
        if label is not None:
            _claim_folder(root / rel.split("/")[0], label, rel)
        if dest.exists() or dest.is_symlink():
            if not dest.is_file():
                raise IsADirectoryError(errno.EISDIR, "not a file", str(dest))
            return False
        fd, tmp = tempfile.mkstemp(prefix=".upload-", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        raise _write_error(e, rel) from None
    return True


def _claim_folder(folder: Path, label: str, rel: str) -> None:
    named = write_label_file(folder, label) if folder.name != label else read_folder_label(folder) == label
    if not named:
        raise ApiError(409, "path_conflict", f"cannot store the image as {rel!r}: the folder {folder.name!r} "
                                             f"holds the images of another label ({read_folder_label(folder)!r}); "
                                             "use another label")


class KeyLocks:
    """One lock per key while anyone holds or waits for it: adds of the same content serialise
    (one file, one entry), adds of different content do not wait on each other."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, tuple[asyncio.Lock, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        lock, users = self._locks.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._locks[key]


LOCK_DIR = ".imgsearch-locks"  # hidden: the scan skips it
LOCK_STRIPES = 64


def prepare_locks(root: Path) -> None:
    """Create the stripe files up front (at start-up), so adds do not add files beside the images."""
    try:
        (root / LOCK_DIR).mkdir(exist_ok=True)
        for i in range(LOCK_STRIPES):
            (root / LOCK_DIR / f"{i:02d}.lock").touch(exist_ok=True)
    except OSError:
        pass  # a read-only or missing root: adds will say so


def _lock_stripe(root: Path, key: int) -> int | None:
    """Open and lock (blocking) the stripe file of ``key``; None when the root cannot hold one."""
    try:
        folder = root / LOCK_DIR
        folder.mkdir(exist_ok=True)
        fd = os.open(folder / f"{key % LOCK_STRIPES:02d}.lock", os.O_CREAT | os.O_RDWR, 0o644)
    except OSError:
        return None  # a read-only root: no file will be written, so nothing to keep apart
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        os.close(fd)
        return None
    return fd


class ContentLocks:
    """Adds of the same content serialise across every process sharing the image root (gateway
    workers, pods on a shared volume): one file and one entry, whichever labels they carry.

    Across processes: an ``flock`` on one of ``LOCK_STRIPES`` files under the root (contents that
    share a stripe only wait for each other's short critical section). Inside a process an
    asyncio lock per stripe goes first, so at most one thread per stripe waits in ``flock``.
    """

    def __init__(self) -> None:
        self._local = KeyLocks()

    @contextlib.asynccontextmanager
    async def hold(self, root: Path, key: int, run_blocking: Callable[..., Awaitable[Any]]) -> AsyncIterator[None]:
        async with self._local.hold(key % LOCK_STRIPES):
            fd = await run_blocking(_lock_stripe, root, key)
            try:
                yield
            finally:
                if fd is not None:
                    os.close(fd)  # closing the descriptor releases its flock
