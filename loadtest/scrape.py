"""Scrape Prometheus endpoints (Triton, the gateway) once a second into a JSONL file.

Locust sees the service from outside; these scrapes show what happened inside while it
ran: how many images Triton batched per execution, how long requests queued, how the
gateway's time split into decode / infer / search. ``imgsearch loadtest`` runs a
:class:`Scraper` thread next to the Locust subprocess; the report reads the file back
with :func:`load_scrapes` and works on counter deltas between consecutive scrapes.

One line per scrape and target::

    {"t": 1764201600.01, "target": "triton", "ok": true, "ms": 2.1,
     "samples": [["nv_inference_count", {"model": "resnet152", "version": "1"}, 1234.0], ...]}

A failed scrape is kept too (``"ok": false, "error": "..."``): a gap in the plots then
has a reason in the file.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from imgsearch.triton_metrics import parse_prometheus

log = logging.getLogger(__name__)

# Only the families the report reads: the Triton and gateway pages carry hundreds of
# lines (histogram buckets above all) that would make the file 50x larger for nothing.
KEEP_PREFIXES: dict[str, tuple[str, ...]] = {
    "triton": ("nv_inference_", "nv_gpu_", "nv_cpu_", "nv_pinned_"),
    "gateway": ("imgsearch_",),
}
DROP_SUFFIXES = ("_bucket", "_created")


def select_samples(text: str, prefixes: Iterable[str]) -> list[list]:
    """``[[name, {labels}, value], ...]`` for the metric families the report uses."""
    prefixes = tuple(prefixes)
    out = []
    for (name, labels), value in parse_prometheus(text).items():
        if name.startswith(prefixes) and not name.endswith(DROP_SUFFIXES):
            out.append([name, dict(sorted(labels)), value])
    out.sort(key=lambda s: (s[0], sorted(s[1].items())))
    return out


def scrape_once(url: str, prefixes: Iterable[str], timeout_s: float = 2.0) -> list[list]:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:  # noqa: S310 - loopback URLs given by the user
        return select_samples(r.read().decode("utf-8", "replace"), prefixes)


class Scraper(threading.Thread):
    """Poll ``targets`` ({name: metrics URL}) every ``interval_s`` until :meth:`stop`."""

    def __init__(self, targets: dict[str, str], path: str | Path, interval_s: float = 1.0,
                 timeout_s: float = 2.0) -> None:
        super().__init__(name="metrics-scraper", daemon=True)
        self.targets = {k: v for k, v in targets.items() if v}
        self.path = Path(path)
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.ok: dict[str, int] = {k: 0 for k in self.targets}
        self.failed: dict[str, int] = {k: 0 for k in self.targets}
        self.last_error: dict[str, str] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        tick = 0
        with self.path.open("a", encoding="utf-8") as f:
            while not self._stop_event.is_set():
                for target, url in self.targets.items():
                    f.write(json.dumps(self._scrape(target, url)) + "\n")
                f.flush()
                # a fixed grid, so a slow scrape does not make every later one late
                tick += 1
                self._stop_event.wait(max(0.0, start + tick * self.interval_s - time.monotonic()))
            for target, url in self.targets.items():  # a last one: the counters at the very end
                f.write(json.dumps(self._scrape(target, url)) + "\n")

    def _scrape(self, target: str, url: str) -> dict:
        t0 = time.time()
        prefixes = KEEP_PREFIXES.get(target, ("",))
        try:
            samples = scrape_once(url, prefixes, self.timeout_s)
        except (urllib.error.URLError, OSError, ValueError) as e:
            self.failed[target] += 1
            reason = str(getattr(e, "reason", e)) or type(e).__name__
            if self.last_error.get(target) != reason:
                log.warning("scraping %s (%s) failed: %s", target, url, reason)
            self.last_error[target] = reason
            return {"t": round(t0, 3), "target": target, "ok": False, "error": reason}
        self.ok[target] += 1
        return {"t": round(t0, 3), "target": target, "ok": True,
                "ms": round((time.time() - t0) * 1000, 2), "samples": samples}

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop_event.set()
        self.join(timeout_s)


@dataclass
class Scrape:
    t: float
    ok: bool
    samples: dict[tuple[str, frozenset], float] = field(default_factory=dict)
    error: str | None = None

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples named ``name`` whose labels include ``labels``."""
        want = set(labels.items())
        return sum(v for (n, lab), v in self.samples.items() if n == name and want <= lab)

    def label_values(self, name: str, label: str) -> set[str]:
        return {dict(lab)[label] for (n, lab) in self.samples if n == name and label in dict(lab)}


def load_scrapes(path: str | Path) -> dict[str, list[Scrape]]:
    """``{target: [Scrape, ...]}`` in time order; a torn last line (killed run) is skipped."""
    out: dict[str, list[Scrape]] = {}
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        samples = {(s[0], frozenset(s[1].items())): float(s[2]) for s in rec.get("samples", [])}
        out.setdefault(rec["target"], []).append(
            Scrape(t=float(rec["t"]), ok=bool(rec.get("ok")), samples=samples, error=rec.get("error")))
    for scrapes in out.values():
        scrapes.sort(key=lambda s: s.t)
    return out
