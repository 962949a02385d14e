"""What the decode worker processes run: read, hash, decode (or only read, in bytes mode).

These functions run in a ``ProcessPoolExecutor`` (spawned, so no gRPC state is forked),
which keeps JPEG decoding off the core that feeds Triton. They never raise for a bad
file: each file comes back as an id, pixels or a typed error code with a message.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from imgsearch.errors import ImageError
from imgsearch.imaging import check_format, decode_image
from imgsearch.store import content_id

READ_ERROR = "unreadable_file"


@dataclass
class Hashed:
    ids: list[int | None]  # None where the file could not be read
    errors: dict[int, str]  # position in the chunk -> message (read errors only)
    seconds: float
    cpu_seconds: float = 0.0


@dataclass
class Decoded:
    positions: list[int]  # positions in the task's item list that decoded
    ids: list[int]
    pixels: np.ndarray  # uint8 [len(positions), size, size, 3]
    errors: list[tuple[int, str, str]] = field(default_factory=list)  # (position, code, message)
    seconds: float = 0.0
    cpu_seconds: float = 0.0


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def hash_files(paths: list[str]) -> Hashed:
    """Content ids of ``paths`` (sha256 of the bytes): cheap, so unchanged files skip decoding."""
    t0, c0 = time.perf_counter(), time.process_time()
    ids: list[int | None] = []
    errors: dict[int, str] = {}
    for i, p in enumerate(paths):
        try:
            ids.append(content_id(_read(p)))
        except OSError as e:
            ids.append(None)
            errors[i] = f"{type(e).__name__}: {e.strerror or e}"
    return Hashed(ids, errors, time.perf_counter() - t0, time.process_time() - c0)


def decode_files(paths: list[str], size: int, max_pixels: int) -> Decoded:
    """Read and decode ``paths``; the id is recomputed from the bytes actually decoded."""
    t0, c0 = time.perf_counter(), time.process_time()
    positions: list[int] = []
    ids: list[int] = []
    arrays: list[np.ndarray] = []
    errors: list[tuple[int, str, str]] = []
    for i, p in enumerate(paths):
        try:
            data = _read(p)
        except OSError as e:
            errors.append((i, READ_ERROR, f"{type(e).__name__}: {e.strerror or e}"))
            continue
        try:
            arr = decode_image(data, size=size, max_pixels=max_pixels)
        except ImageError as e:
            errors.append((i, e.code, str(e)))
            continue
        positions.append(i)
        ids.append(content_id(data))
        arrays.append(arr)
    pixels = np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)
    return Decoded(positions, ids, pixels, errors, time.perf_counter() - t0, time.process_time() - c0)


@dataclass
class Read:
    """Bytes mode: the files as they are, for the ``image_search`` ensemble to decode in Triton."""

    positions: list[int]  # positions in the task's item list that could be read
    ids: list[int]
    blobs: list[bytes]
    errors: list[tuple[int, str, str]] = field(default_factory=list)  # (position, code, message)
    seconds: float = 0.0
    cpu_seconds: float = 0.0


def read_files(paths: list[str]) -> Read:
    """Read ``paths`` without decoding; the id is recomputed from the bytes actually sent.

    Empty and non-image files are refused here by content (as decode_image would): no
    Triton request for them, and no batch failed by them.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    out = Read([], [], [])
    for i, p in enumerate(paths):
        try:
            data = _read(p)
        except OSError as e:
            out.errors.append((i, READ_ERROR, f"{type(e).__name__}: {e.strerror or e}"))
            continue
        try:
            check_format(data)
        except ImageError as e:
            out.errors.append((i, e.code, str(e)))
            continue
        out.positions.append(i)
        out.ids.append(content_id(data))
        out.blobs.append(data)
    out.seconds, out.cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    return out


def warm_up() -> int:
    """A no-op task: submitting one per worker makes the pool spawn them all right away."""
    return os.getpid()


def init_worker(parent_pid: int) -> None:
    """Exit when the indexer dies (SIGKILL included), instead of lingering as an orphan.

    Ctrl-C reaches the whole process group: the workers ignore it and let the indexer
    drain and shut the pool down (a worker dying of KeyboardInterrupt breaks the pool).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(0)
            time.sleep(0.5)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
