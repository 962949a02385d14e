"""What a load-test run sends and how it judges answers: plain functions, no Locust import.

Importing ``locust`` monkey-patches the whole process with gevent, so the locustfile and the
shape import these from here, and tests and tools can use them without that side effect.
"""

from __future__ import annotations

import math
import mimetypes
import random
import uuid
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}
SHED_STATUSES = {429, 503}
SHED_PREFIX = "shed:"


def classify(status: int, headers: Any) -> str:
    """``ok`` | ``shed`` (429/503 with Retry-After: the gateway protecting itself) | ``fail``."""
    if status in SHED_STATUSES and headers is not None and headers.get("Retry-After") is not None:
        return "shed"
    return "ok" if 200 <= status < 400 else "fail"


def multipart_body(name: str, data: bytes, content_type: str) -> tuple[bytes, str]:
    """One ``file`` field, encoded once so the load generator spends its CPU on requests."""
    boundary = uuid.uuid4().hex
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def image_files(folder: str | Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_payloads(folder: str | Path, limit: int, seed: int = 0) -> list[tuple[str, bytes, str]]:
    """Up to ``limit`` query images as ready multipart bodies: (file name, body, content type)."""
    files = image_files(folder)
    random.Random(seed).shuffle(files)  # a spread of classes, not the first folder only
    out = []
    for p in files[:limit]:
        ctype = mimetypes.guess_type(p.name)[0] or "application/octet-stream"
        body, multipart_type = multipart_body(p.name, p.read_bytes(), ctype)
        out.append((p.name, body, multipart_type))
    return out


def step_schedule(t: float, step_users: int, step_time: float, max_users: int, spawn_rate: float,
                  run_time: float | None = None) -> tuple[int, float] | None:
    """(users, spawn rate) at ``t`` seconds into a step run, or None when the run is over.

    Step k (from 0) covers ``[k*step_time, (k+1)*step_time)`` with ``min(max_users,
    (k+1)*step_users)`` users; the run ends after the step that reaches ``max_users``, or
    at ``run_time`` when that comes first.
    """
    if step_users < 1 or step_time <= 0 or max_users < 1:
        raise ValueError("step_users, step_time and max_users must be positive")
    if t >= step_count(step_users, max_users) * step_time or (run_time and t >= run_time):
        return None
    k = int(t // step_time)
    return min(max_users, (k + 1) * step_users), spawn_rate


def step_count(step_users: int, max_users: int) -> int:
    return math.ceil(max_users / step_users)
