"""What an index run did: counts, failures grouped by reason, time per stage."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Stages whose time the benchmark compares. "decode" includes reading the file; hashing
# for the unchanged check is kept apart, as it is the whole cost of an unchanged file.
STAGES = ("hash", "check", "decode", "infer", "upsert")
SHARE_STAGES = ("decode", "infer", "upsert")


@dataclass
class IndexReport:
    root: str
    collection: str
    scanned: int = 0
    indexed: int = 0  # upserted in this run (counted only once the upsert returned)
    unchanged: int = 0  # content already in the collection for this model: not re-encoded
    moved: int = 0  # of the unchanged: entry re-pointed to the file's new path
    duplicates: int = 0  # same bytes as another file of this run: one entry per content
    failed: dict[str, list[list[str]]] = field(default_factory=dict)  # code -> [[path, message]]
    ignored: dict[str, int] = field(default_factory=dict)  # reason -> count (scan)
    deleted: int = 0  # --sync: entries whose content is no longer under the root
    repointed: int = 0  # --sync: entries whose path changed to another copy of the content
    batches: int = 0  # Triton requests that succeeded
    split_batches: int = 0  # bytes mode: requests a bad file failed, re-sent one file per request
    elapsed_s: float = 0.0
    triton_idle_s: float = 0.0  # no Triton request in flight (start-up fill, starvation) before the last one
    cpu_s: dict[str, float] = field(default_factory=lambda: {"workers": 0.0, "main": 0.0})  # CPU seconds used
    stages_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    settings: dict = field(default_factory=dict)
    aborted: str | None = None  # why the run stopped early (Triton or Milvus gone...)
    sync_skipped: str | None = None  # why --sync deleted nothing

    # --- derived ------------------------------------------------------------------------
    @property
    def failed_count(self) -> int:
        return sum(len(v) for v in self.failed.values())

    @property
    def done(self) -> int:
        return self.indexed + self.unchanged + self.duplicates + self.failed_count

    @property
    def images_per_s(self) -> float:
        return self.indexed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def shares(self) -> dict[str, float]:
        total = sum(self.stages_s[s] for s in SHARE_STAGES)
        return {s: (self.stages_s[s] / total if total else 0.0) for s in SHARE_STAGES}

    def add_failure(self, code: str, path: str, message: str) -> None:
        self.failed.setdefault(code, []).append([path, message])

    # --- output -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(failed_count=self.failed_count, images_per_s=round(self.images_per_s, 2),
                 shares=self.shares(), not_processed=self.scanned - self.done)
        return d

    def write_json(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def summary(self, examples: int = 5) -> str:
        lines = [
            f"indexed {self.indexed}, unchanged {self.unchanged}"
            + (f" ({self.moved} moved)" if self.moved else "")
            + f", duplicates {self.duplicates}, failed {self.failed_count}"
            + f" of {self.scanned} files in {self.elapsed_s:.1f}s ({self.images_per_s:.1f} images/s)"
        ]
        if self.sync_skipped:
            lines.append(self.sync_skipped)
        elif self.deleted or self.repointed or self.settings.get("sync"):
            lines.append(f"sync: deleted {self.deleted} entries of files that are gone, re-pointed {self.repointed}")
        for code, items in sorted(self.failed.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"failed, {code} ({len(items)}):")
            lines += [f"  {p}: {m}" for p, m in items[:examples]]
            if len(items) > examples:
                lines.append(f"  ... and {len(items) - examples} more (--json FILE lists them all)")
        if self.split_batches:
            lines.append(f"bytes mode: {self.split_batches} batch(es) held a bad file and were re-sent one file "
                         "per request")
        if self.ignored:
            lines.append("ignored: " + ", ".join(f"{n} {r}" for r, n in sorted(self.ignored.items())))
        st = self.stages_s
        sh = self.shares()
        lines.append(
            "time: " + ", ".join(f"{s} {st[s]:.1f}s" for s in STAGES)
            + " | share: " + ", ".join(f"{s} {sh[s]:.0%}" for s in SHARE_STAGES)
            + (f" | Triton idle {self.triton_idle_s:.1f}s" if self.batches else "")
        )
        if self.settings.get("triton_input") == "bytes":  # decoded in Triton: the workers only read and hash
            lines.append(f"cpu: read workers {self.cpu_s['workers']:.1f}s, indexer process {self.cpu_s['main']:.1f}s "
                         "(files sent undecoded to Triton's ensemble)")
        else:
            lines.append(f"cpu: decode workers {self.cpu_s['workers']:.1f}s, indexer process {self.cpu_s['main']:.1f}s")
        if self.settings.get("triton_input_fallback"):
            lines.append(f"IMGSEARCH_TRITON_INPUT=bytes not used: {self.settings['triton_input_fallback']}")
        not_done = self.scanned - self.done
        if self.aborted:
            lines.append(f"STOPPED: {self.aborted}")
            lines.append(f"{self.indexed} images upserted before stopping are kept; {not_done} files not processed. "
                         "Re-run the same command to resume (unchanged files are skipped).")
        return "\n".join(lines)
