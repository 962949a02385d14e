"""Run the real tritonserver binary from the nvidia-pytriton wheel, in the foreground.

It prepares the Python-backend directory and LD_LIBRARY_PATH itself, waits until the
models are ready, prints the URLs, and stops on Ctrl-C / SIGTERM (draining in-flight
requests for up to --exit-timeout seconds). A model that fails to load makes it exit
non-zero with the relevant log lines.

examples:
  imgsearch triton                                  # model_repository, configs/cpu.pbtxt
  imgsearch triton --config-name gpu --http-port 8000 --grpc-port 8001 --metrics-port 8002
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from .settings import get_settings
from .triton_server import LocalTriton


def add_arguments(p: argparse.ArgumentParser) -> None:
    s = get_settings()
    p.add_argument("--repository", type=Path, default=s.model_repository, help="model repository (default: %(default)s)")
    p.add_argument("--config-name", default=s.model_config_name,
                   help="configs/<name>.pbtxt per model, passed as --model-config-name; 'default' = config.pbtxt "
                        "(default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--http-port", type=int, default=s.local_triton_http_port, help="(default: %(default)s)")
    p.add_argument("--grpc-port", type=int, default=s.local_triton_grpc_port, help="(default: %(default)s)")
    p.add_argument("--metrics-port", type=int, default=s.local_triton_metrics_port, help="(default: %(default)s)")
    p.add_argument("--exit-timeout", type=int, default=s.triton_exit_timeout_s,
                   help="seconds to drain in-flight requests on shutdown (default: %(default)s)")
    p.add_argument("--log-file", type=Path, default=None, help="tritonserver log (default: a temp file)")


def run(args: argparse.Namespace) -> int:
    server = LocalTriton(
        args.repository, None if args.config_name == "default" else args.config_name,
        http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port, host=args.host,
        exit_timeout_s=args.exit_timeout, log_file=args.log_file)
    stop = {"now": False}

    def on_signal(signum, _frame):
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with server:
        print(f"triton ready: grpc {server.grpc_url}  http {server.http_url}  metrics {server.metrics_url}"
              f"  (log {server.log_path})", flush=True)
        while not stop["now"]:
            if server.proc.poll() is not None:
                print(f"tritonserver exited ({server.proc.returncode}):\n{server.log_excerpt()}", file=sys.stderr)
                return 1
            time.sleep(0.5)
        print("stopping tritonserver (draining in-flight requests)...", flush=True)
    return 0
