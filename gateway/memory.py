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


@dataclass(frozen=True)
class MemoryBudget:
    """The parts, in bytes. Pixels mode: in bytes mode (IMGSEARCH_TRITON_INPUT=bytes) each
    in-flight upload is also copied into its Triton request, which the sum leaves out."""

    base: int
    uploads: int  # in flight, still arriving, and the one being copied out of its read buffer
    connections: int
    decodes: int  # their shared budget; one image larger than it runs alone
    thumbnails: int
    pixels_mode: bool

    @property
    def total(self) -> int:
        return self.base + self.uploads + self.connections + self.decodes + self.thumbnails

    def describe(self) -> str:
        parts = ", ".join(f"{name} {getattr(self, name) / MIB:,.0f}"
                          for name in ("base", "uploads", "connections", "decodes", "thumbnails"))
        return f"{self.total / MIB:,.0f} MiB ({parts})"


def memory_budget(s: Settings) -> MemoryBudget:
    """What a gateway with these settings may hold at once. The number of decode threads does
    not enter: the decodes share IMGSEARCH_DECODE_MEMORY_BYTES, and the process hands large
    freed rasters back (imgsearch.imaging.unmap_large_allocations)."""
    return MemoryBudget(
        base=BASE_BYTES,
        uploads=(s.max_inflight + s.max_reading + 1) * s.max_upload_bytes,
        connections=s.max_connections * CONNECTION_READ_AHEAD_BYTES,
        decodes=max(s.decode_memory_bytes, s.max_pixels * RASTER_BYTES_PER_PIXEL),
        thumbnails=s.thumb_cache_items * s.thumb_max_side ** 2 * THUMB_BYTES_PER_PIXEL,
        pixels_mode=s.triton_input == "pixels",
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


def memory_warning(budget: MemoryBudget, limit: int | None) -> str | None:
    """What to tell the operator when the container may kill the gateway under load."""
    if limit is None or budget.total <= limit:
        return None
    return (f"the gateway may hold up to {budget.describe()}, more than its container's memory limit of "
            f"{limit / MIB:,.0f} MiB: under a full load it can be killed. Raise the limit, or lower "
            "IMGSEARCH_MAX_INFLIGHT, IMGSEARCH_MAX_READING, IMGSEARCH_MAX_UPLOAD_BYTES or "
            "IMGSEARCH_DECODE_MEMORY_BYTES")
