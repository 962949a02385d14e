"""Run the search gateway: the web page, the JSON API and /metrics, in front of Triton and Milvus.

Without IMGSEARCH_TRITON_URL it first starts the local tritonserver (from the
nvidia-pytriton wheel) on the fixed local ports (IMGSEARCH_LOCAL_TRITON_{HTTP,GRPC,METRICS}_PORT,
default 8100/8101/8102) with the model repository's configs/cpu.pbtxt, and stops it on exit.
With it set, the gateway talks to that Triton (a container, another machine) and starts
nothing. Milvus is IMGSEARCH_MILVUS_URI: a .db file is Milvus Lite, embedded in the
gateway process (one process per file: stop `imgsearch index` first).

Ctrl-C / SIGTERM drain in-flight requests for up to IMGSEARCH_GRACEFUL_SHUTDOWN_S seconds.

examples:
  imgsearch serve                                    # http://127.0.0.1:8000/  (page), /docs (API)
  imgsearch serve --host 0.0.0.0 --port 8080         # reachable from other machines
  IMGSEARCH_TRITON_URL=triton:8001 imgsearch serve   # use a running Triton (gRPC host:port)
  IMGSEARCH_API_KEY=secret imgsearch serve           # enable POST/DELETE /v1/images

  curl -F file=@dog.jpg 'http://127.0.0.1:8000/v1/search?top_k=5'
"""

from __future__ import annotations

import argparse
import logging
import os
import signal

from imgsearch.errors import LauncherError
from imgsearch.settings import get_settings

log = logging.getLogger("gateway")


def add_arguments(p: argparse.ArgumentParser) -> None:
    s = get_settings()
    p.add_argument("--host", default=s.host, help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=s.port, help="(default: %(default)s)")
    p.add_argument("--workers", type=int, default=s.workers,
                   help="uvicorn worker processes; >1 needs a Milvus server URI, not a Lite .db file "
                        "(default: %(default)s)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from .protocol import HEAD_DEADLINE_PROTOCOL

    # uvicorn drains on SIGTERM, then re-raises the signal under the previous handler. The
    # default handler would end this process on the spot and leave the local tritonserver
    # (its own session) running: exit through Python instead, so the ExitStack stops it.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    from imgsearch.store import is_lite
    from imgsearch.triton_server import triton_for

    s = get_settings()
    if args.workers > 1 and is_lite(s.milvus_uri):
        raise LauncherError(
            f"--workers {args.workers} with Milvus Lite ({s.milvus_uri}): a Lite file can be opened by one "
            "process only. Use --workers 1, or IMGSEARCH_MILVUS_URI=http://host:19530 (Milvus standalone).")
    if not s.triton_url:
        log.info("starting the local tritonserver for %s (config %s)...", s.model_repository, s.model_config_name)
    with triton_for(s, fixed_ports=True) as triton:
        if triton.server is None:
            log.info("using Triton at %s (IMGSEARCH_TRITON_URL)", triton.url)
        else:
            log.info("triton ready: grpc %s  http %s  metrics %s  (log %s)", triton.server.grpc_url,
                     triton.server.http_url, triton.server.metrics_url, triton.server.log_path)
        # the factory (and every worker) reads its settings from the environment
        os.environ["IMGSEARCH_TRITON_URL"] = triton.url
        os.environ["IMGSEARCH_WORKERS"] = str(args.workers)  # each worker's memory check counts them all
        shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        base = f"http://{shown}:{args.port}"
        log.info("gateway on %s/  (API docs %s/docs, metrics %s/metrics, readiness %s/readyz)",
                 base, base, base, base)
        log.info("try: curl -F file=@some.jpg '%s/v1/search?top_k=5'", base)
        uvicorn.run("imgsearch.gateway.app:app_from_env", factory=True, host=args.host, port=args.port,
                    workers=args.workers, log_level=args.log_level,
                    timeout_graceful_shutdown=int(s.graceful_shutdown_s), proxy_headers=False,
                    limit_concurrency=s.max_connections, timeout_keep_alive=s.keep_alive_s,
                    http=HEAD_DEADLINE_PROTOCOL)
    return 0
