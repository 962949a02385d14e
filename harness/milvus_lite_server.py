"""``python -m harness.milvus_lite_server server --data-dir D --host H --port P``: Milvus Lite's
gRPC server (``python -m milvus_lite``) with the keepalive policy of Milvus's own servers.

Milvus's gRPC servers accept a client's keepalive ping every 5 s, on an idle connection too.
Python gRPC's default server policy takes a client's pings on a connection without calls as
abuse and, after a few, closes it ("too_many_pings"). pymilvus pings every 10 s, so about 40 s
after its last call an idle client loses its connection to the plain Lite server, and the next
client the same process opens for that address fails to connect.
"""

from __future__ import annotations

import inspect

import grpc

POLICY_MARKER = "milvus_lite_server: Milvus's keepalive policy set"
MILVUS_PING_POLICY = [
    ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
]


def main() -> int:
    build = grpc.server
    signature = inspect.signature(build)

    def server(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.arguments["options"] = [*(bound.arguments.get("options") or ()), *MILVUS_PING_POLICY]
        print(POLICY_MARKER, flush=True)  # harness.stack.MilvusServer checks for it
        return build(*bound.args, **bound.kwargs)

    grpc.server = server  # milvus_lite builds its server with grpc.server and fixed options
    from milvus_lite.cmdline import main as lite_main

    return lite_main()


if __name__ == "__main__":
    raise SystemExit(main())
