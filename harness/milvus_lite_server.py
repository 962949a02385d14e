"""``python -m harness.milvus_lite_server server --data-dir D --host H --port P``: Milvus Lite's
gRPC server (``python -m milvus_lite``) with the keepalive policy of Milvus's own servers.

Milvus's gRPC servers accept a client's keepalive ping every 5 s, on an idle connection too.
Python gRPC's default server policy accepts one per 5 minutes without calls and sends away a
client that pings more often ("too_many_pings"). pymilvus pings every 10 s, so after about 30 s of idleness the
Lite server closed its connection, and the next client the same process opened for that
address failed to connect: a fault real Milvus does not have.
"""

from __future__ import annotations

import grpc

MILVUS_PING_POLICY = [
    ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
]


def main() -> int:
    build = grpc.server

    def server(*args, options=(), **kwargs):
        return build(*args, options=[*options, *MILVUS_PING_POLICY], **kwargs)

    grpc.server = server  # milvus_lite builds its server with grpc.server and fixed options
    from milvus_lite.cmdline import main as lite_main

    return lite_main()


if __name__ == "__main__":
    raise SystemExit(main())
