"""The memory one gateway process can hold at once, from its settings, and the container's limit.

Every part is bounded by a setting, so a deployment's memory limit can be computed rather than
guessed: the deploy files are checked against :func:`memory_budget`, and a gateway started under
a lower limit says so in its log (docs/deploy.md, "Memory limit = the decode budget").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from imgsearch.settings import Settings

MIB = 2**20
# the process at rest: 201 MiB RSS after importing the gateway (measured), + clients, stacks
BASE_BYTES = 384 * MIB
# per open connection: uvicorn reads a body ahead up to its high-water mark (64 KiB) before it
# pauses the socket, plus the last read of up to 256 KiB (asyncio's recv size); a shed upload
# is drained through it
CONNECTION_READ_AHEAD_BYTES = (64 + 256) * 1024
# a decode reserves its raster as loaded (after JPEG draft mode): at most RGBA, 4 B/pixel
RASTER_BYTES_PER_PIXEL = 4
THUMB_BYTES_PER_PIXEL = 3


PARTS = ("base", "uploads", "triton_requests", "connections", "decodes", "thumbnails")
# what lowers each part
KNOBS = {
    "uploads": "IMGSEARCH_MAX_INFLIGHT, IMGSEARCH_MAX_READING, IMGSEARCH_MAX_UPLOAD_BYTES",
    "triton_requests": "IMGSEARCH_MAX_INFLIGHT, IMGSEARCH_MAX_UPLOAD_BYTES, or IMGSEARCH_TRITON_INPUT=pixels",
    "connections": "IMGSEARCH_MAX_CONNECTIONS",
    "thumbnails": "IMGSEARCH_THUMB_CACHE_ITEMS, IMGSEARCH_THUMB_MAX_SIDE",
}


@dataclass(frozen=True)
class MemoryBudget:
    """The parts, in bytes, of one gateway process."""

    base: int
    uploads: int  # in flight, still arriving, and the one being copied out of its read buffer
    triton_requests: int  # bytes mode: each in-flight upload copied into its Triton request (at least once)
    connections: int
    decodes: int  # their shared budget; one image larger than it runs alone
    thumbnails: int
    decode_knob: str  # the setting that bounds the decodes' part

    @property
    def total(self) -> int:
        return sum(getattr(self, name) for name in PARTS)

    def describe(self) -> str:
        parts = ", ".join(f"{name} {getattr(self, name) / MIB:,.0f}" for name in PARTS if getattr(self, name))
        return f"{self.total / MIB:,.0f} MiB ({parts})"

    def largest(self, n: int = 3) -> list[tuple[str, str]]:
        """The ``n`` largest parts that settings bound, each with the settings that lower it."""
        knobs = KNOBS | {"decodes": self.decode_knob}
        parts = sorted((p for p in PARTS if p in knobs and getattr(self, p)), key=lambda p: -getattr(self, p))
        return [(p, knobs[p]) for p in parts[:n]]


def memory_budget(s: Settings) -> MemoryBudget:
    """What a gateway with these settings may hold at once. The number of decode threads does
    not enter: the decodes share IMGSEARCH_DECODE_MEMORY_BYTES, and the process hands large
    freed rasters back (imgsearch.imaging.unmap_large_allocations)."""
    one_image = s.max_pixels * RASTER_BYTES_PER_PIXEL
    return MemoryBudget(
        base=BASE_BYTES,
        uploads=(s.max_inflight + s.max_reading + 1) * s.max_upload_bytes,
        triton_requests=s.max_inflight * s.max_upload_bytes if s.triton_input == "bytes" else 0,
        connections=s.max_connections * CONNECTION_READ_AHEAD_BYTES,
        decodes=max(s.decode_memory_bytes, one_image),
        thumbnails=s.thumb_cache_items * s.thumb_max_side ** 2 * THUMB_BYTES_PER_PIXEL,
        decode_knob="IMGSEARCH_MAX_PIXELS" if one_image > s.decode_memory_bytes else "IMGSEARCH_DECODE_MEMORY_BYTES",
    )


def container_memory_limit(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The memory limit of this process's container (cgroup v2, else v1), or None when unlimited
    or not readable."""
    for f in (cgroup_root / "memory.max", cgroup_root / "memory" / "memory.limit_in_bytes"):
        try:
            text = f.read_text().strip()
        except OSError:
            continue
        if not text.isdigit():
            return None  # "max": no limit
        limit = int(text)
        return None if limit >= 2**60 else limit  # v1 writes a page-rounded 2**63 for "no limit"
    return None


def memory_warning(budget: MemoryBudget, limit: int | None, workers: int = 1) -> str | None:
    """What to tell the operator when the container (``workers`` gateway processes) may be
    killed under a full load."""
    need = workers * budget.total
    if limit is None or need <= limit:
        return None
    each = f"{workers} worker processes, each holding up to" if workers > 1 else "the gateway may hold up to"
    lower = "; ".join(f"{part} ({knobs})" for part, knobs in budget.largest())
    return (f"{each} {budget.describe()}: more than its container's memory limit of {limit / MIB:,.0f} MiB, "
            f"so under a full load it can be killed. Raise the limit, or lower the largest parts: {lower}")
