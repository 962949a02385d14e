"""Locust scenarios for the imgsearch gateway: one user class per endpoint, weights set the mix.

- ``SearchUser``  (weight 6): ``POST /v1/search`` with a query image drawn from ``--images``;
  the files are read and encoded as multipart bodies once, at start, not per request.
- ``SimilarUser`` (weight 3): ``GET /v1/images/{id}/similar``; ids come from the searches
  (a first search of its own when none is known yet).
- ``PageUser``    (weight 1): ``GET /`` then a few ``/v1/images/{id}/thumb``, like a browser
  showing a result grid, then 1-3 s of looking at it.

The API users are closed-loop clients (no think time unless ``--think-ms``): users =
requests in flight, which is what the step shape varies to find the knee.

A 503 or 429 that carries ``Retry-After`` is the gateway shedding load on purpose: it is
reported as a success under ``shed:<name>`` (its own row in the stats, not a failure), so
the report can tell "the service said: come back later" from "the service broke". The
user then waits what Retry-After says (``--ignore-retry-after``: retry at once).

``--request-log PATH`` appends one CSV line per request (end time, users, name, outcome,
status, latency): the report computes exact per-step percentiles from it.

Run it through ``imgsearch loadtest`` (headless, report, SLO gate), or directly::

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --images data/images
    locust -f loadtest/locustfile.py,loadtest/shapes.py --headless --users 16 --step-users 2
"""

from __future__ import annotations

import csv
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import gevent
from locust import FastHttpUser, events, task
from locust.env import Environment
from locust.stats import CSV_STATS_INTERVAL_SEC

try:
    from imgsearch.loadtest.scenario import (
        SHED_PREFIX,
        SHED_STATUSES,
        classify,
        load_payloads,
    )
except ImportError:  # a Locust image with loadtest/ mounted as a plain folder: Locust puts it on sys.path
    from scenario import SHED_PREFIX, SHED_STATUSES, classify, load_payloads  # type: ignore[no-redef]

log = logging.getLogger(__name__)

MAX_KNOWN_IDS = 2000
MAX_BACKOFF_S = 10.0

# Shared by every user of this process, filled at test start (read once, reused).
PAYLOADS: list[tuple[str, bytes, str]] = []  # (file name, multipart body, content type)
KNOWN_IDS: list[str] = []
_KNOWN_SET: set[str] = set()
_REQUEST_LOG: dict[str, Any] = {}


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    g = parser.add_argument_group("imgsearch")
    g.add_argument("--images", default=os.environ.get("IMGSEARCH_LOADTEST_IMAGES", "data/images"),
                   help="folder of query images (searched recursively)")
    g.add_argument("--max-images", type=int, default=200, help="query images read into memory at start")
    g.add_argument("--top-k", type=int, default=10, help="top_k of each search / similar request")
    g.add_argument("--thumbs", type=int, default=6, help="thumbnails a PageUser fetches after GET /")
    g.add_argument("--think-ms", type=float, default=0.0,
                   help="max think time between a user's requests (0 = closed loop: users = concurrency)")
    g.add_argument("--ignore-retry-after", action="store_true",
                   help="retry a shed request at once instead of waiting its Retry-After (a hostile client)")
    g.add_argument("--request-log", default="", help="append one CSV line per request here")
    g.add_argument("--step-users", type=int, default=2, help="step shape: users added per step")
    g.add_argument("--step-time", type=float, default=20.0, help="step shape: seconds per step")


def remember(results: list[dict]) -> None:
    for r in results:
        rid = str(r.get("id", ""))
        if rid and rid not in _KNOWN_SET and len(KNOWN_IDS) < MAX_KNOWN_IDS:
            _KNOWN_SET.add(rid)
            KNOWN_IDS.append(rid)


@events.test_start.add_listener
def _on_test_start(environment: Environment, **_: Any) -> None:
    opts = environment.parsed_options
    if opts is None or PAYLOADS:
        return
    PAYLOADS.extend(load_payloads(opts.images, opts.max_images))
    if not PAYLOADS:
        log.error("no images under %r: pass --images DIR (jpg/png/webp/bmp/gif)", opts.images)
        if environment.runner is not None:
            environment.runner.quit()
        return
    log.info("%d query images read from %s", len(PAYLOADS), opts.images)
    if opts.request_log:
        path = Path(opts.request_log)
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists() or path.stat().st_size == 0
        f = path.open("a", newline="", encoding="utf-8")
        writer = csv.writer(f)
        if new:
            writer.writerow(["end", "ms", "users", "method", "name", "outcome", "status", "error", "state"])
        _REQUEST_LOG.update(file=f, writer=writer, env=environment)


@events.request.add_listener
def _on_request(request_type: str, name: str, response_time: float, response: Any = None,
                exception: Any = None, **_: Any) -> None:
    writer = _REQUEST_LOG.get("writer")
    if writer is None:
        return
    runner = _REQUEST_LOG["env"].runner
    status = int(getattr(response, "status_code", 0) or 0)
    if name.startswith(SHED_PREFIX):
        outcome = "shed"
    elif exception is not None:
        outcome = "fail"
    else:
        outcome = "ok"
    error = "" if exception is None else str(exception).splitlines()[0][:200]
    writer.writerow([f"{time.time():.4f}", f"{response_time:.2f}", runner.user_count if runner else 0,
                     request_type, name, outcome, status, error, runner.state if runner else ""])


@events.test_stop.add_listener
def _on_test_stop(**_: Any) -> None:
    f = _REQUEST_LOG.get("file")
    if f is not None:
        f.flush()


@events.quitting.add_listener
def _on_quitting(environment: Environment, **_: Any) -> None:
    opts = environment.parsed_options
    if opts is not None and getattr(opts, "csv_prefix", None):
        # Locust rewrites its CSVs once a second and not again at exit, so the last second
        # would be missing from them: the users have stopped by now, let its writer run once more.
        gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.2)
    f = _REQUEST_LOG.pop("file", None)
    _REQUEST_LOG.pop("writer", None)
    if f is not None:
        f.close()


class GatewayUser(FastHttpUser):
    """What every scenario shares: timeouts, think time, shed/failure bookkeeping."""

    abstract = True
    network_timeout = 60.0
    connection_timeout = 10.0

    # (min, max) seconds between tasks; None = --think-ms (API clients: closed loop by default)
    think_range: tuple[float, float] | None = None

    def on_start(self) -> None:
        self._backoff_s = 0.0

    def wait_time(self) -> float:  # Locust's hook
        if self._backoff_s:  # a shed answer said when to come back: a polite client waits
            wait, self._backoff_s = self._backoff_s, 0.0
            return wait
        if self.think_range:
            return random.uniform(*self.think_range)
        think_s = (getattr(self.environment.parsed_options, "think_ms", 0.0) or 0.0) / 1000.0
        return random.uniform(0, think_s) if think_s > 0 else 0.0

    def _note_retry_after(self, headers: Any) -> None:
        if getattr(self.environment.parsed_options, "ignore_retry_after", False):
            return
        try:
            self._backoff_s = min(MAX_BACKOFF_S, max(0.0, float(headers.get("Retry-After"))))
        except (TypeError, ValueError):  # an HTTP date instead of seconds: wait one second
            self._backoff_s = 1.0

    def _call(self, method: str, url: str, name: str, expect_json: bool = False, **kw: Any) -> dict | None:
        """One request with ``catch_response``: ok / shed / fail, and the JSON body when asked."""
        with self.client.request(method, url, name=name, catch_response=True, **kw) as resp:
            status = int(resp.status_code or 0)
            outcome = classify(status, resp.headers) if status else "fail"
            if outcome == "shed":
                resp.request_meta["name"] = SHED_PREFIX + name
                resp.success()
                self._note_retry_after(resp.headers)
                return None
            if outcome == "fail":
                resp.failure(self._reason(resp, status))
                return None
            if not expect_json:
                resp.success()
                return None
            try:
                body = resp.json()
            except ValueError:
                resp.failure(f"HTTP {status}: body is not JSON")
                return None
            if not isinstance(body, dict) or not isinstance(body.get("results"), list):
                resp.failure(f"HTTP {status}: no 'results' list in the body")
                return None
            resp.success()
            return body

    @staticmethod
    def _reason(resp: Any, status: int) -> str:
        if not status:
            err = getattr(resp, "error", None) or resp.request_meta.get("exception")
            return f"connection: {type(err).__name__ if err else 'no response'}"
        code = ""
        try:
            code = resp.json().get("error", {}).get("code", "")
        except Exception:  # noqa: BLE001 - any non-JSON error body
            pass
        shed_hint = " without Retry-After" if status in SHED_STATUSES else ""
        return f"HTTP {status}{(' ' + code) if code else ''}{shed_hint}"

    def search(self) -> None:
        fname, body, ctype = random.choice(PAYLOADS)
        top_k = self.environment.parsed_options.top_k
        got = self._call("POST", f"/v1/search?top_k={top_k}", "/v1/search", expect_json=True,
                         data=body, headers={"Content-Type": ctype})
        if got:
            remember(got["results"])

    def ensure_ids(self) -> None:
        for _ in range(3):
            if KNOWN_IDS:
                return
            self.search()


class SearchUser(GatewayUser):
    weight = 6

    @task
    def search_by_image(self) -> None:
        self.search()


class SimilarUser(GatewayUser):
    weight = 3

    def on_start(self) -> None:
        super().on_start()
        self.ensure_ids()

    @task
    def similar(self) -> None:
        if not KNOWN_IDS:
            self.ensure_ids()
            return
        top_k = self.environment.parsed_options.top_k
        got = self._call("GET", f"/v1/images/{random.choice(KNOWN_IDS)}/similar?top_k={top_k}",
                         "/v1/images/[id]/similar", expect_json=True)
        if got:
            remember(got["results"])


class PageUser(GatewayUser):
    """A person: loads the page, its thumbnails arrive, looks at them for 1-3 s."""

    weight = 1
    think_range = (1.0, 3.0)

    def on_start(self) -> None:
        super().on_start()
        self.ensure_ids()

    @task
    def page_and_thumbs(self) -> None:
        self._call("GET", "/", "/")
        n = min(self.environment.parsed_options.thumbs, len(KNOWN_IDS))
        for rid in random.sample(KNOWN_IDS, n):
            self._call("GET", f"/v1/images/{rid}/thumb", "/v1/images/[id]/thumb")
