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

    def largest(self) -> list[tuple[str, str]]:
        """The three largest parts that settings bound, each with the settings that lower it."""
        knobs = KNOBS | {"decodes": self.decode_knob}
        parts = sorted((p for p in PARTS if p in knobs and getattr(self, p)), key=lambda p: -getattr(self, p))
        return [(p, knobs[p]) for p in parts[:3]]


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


def container_memory_limit(cgroup_root: Path = Path("/sys/fs/cgroup"),
                           proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """The memory limit that applies to this process (its container's, or a systemd unit's), or
    None when unlimited or not readable. cgroup v2: the lowest ``memory.max`` from the process's
    own cgroup up to the root; v1: the memory controller's hierarchical limit."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    paths = {ctrl: path.strip("/") for _, ctrl, path in (ln.split(":", 2) for ln in lines if ln.count(":") >= 2)}
    v1 = next((path for ctrl, path in paths.items() if "memory" in ctrl.split(",")), None)
    if (cgroup_root / "memory.max").exists() or (paths.get("") and not v1):
        return _v2_limit(cgroup_root, paths.get("", ""))
    return _v1_limit(cgroup_root / "memory", v1 or "")


def _limit(text: str) -> int | None:
    text = text.strip()
    if not text.isdigit():
        return None  # "max": no limit
    limit = int(text)
    return None if limit >= 2**60 else limit  # v1 writes a page-rounded 2**63 for "no limit"


def _v2_limit(root: Path, path: str) -> int | None:
    found = []
    parts = [p for p in path.split("/") if p]
    for depth in range(len(parts), -1, -1):
        try:
            limit = _limit((root.joinpath(*parts[:depth]) / "memory.max").read_text())
        except OSError:
            continue
        if limit is not None:
            found.append(limit)
    return min(found, default=None)


def _v1_limit(root: Path, path: str) -> int | None:
    for d in dict.fromkeys((root / path, root)):  # its own cgroup (inside a namespace: the root)
        try:
            stat = dict(ln.split() for ln in (d / "memory.stat").read_text().splitlines() if ln.count(" ") == 1)
            if "hierarchical_memory_limit" in stat:
                return _limit(stat["hierarchical_memory_limit"])
        except (OSError, ValueError):
            pass
        try:
            return _limit((d / "memory.limit_in_bytes").read_text())
        except OSError:
            continue
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
