"""The Milvus Lite server the tests run (harness.stack.MilvusServer) keeps a client that has
been idle, as Milvus does: pymilvus pings every 10 s, and Milvus's own gRPC servers accept a
ping every 5 s. With Python gRPC's default policy the server sent the idle client away after ~30 s, and
the next store the process opened failed to connect."""

from __future__ import annotations

import time

import pytest

from harness.stack import MilvusServer
from imgsearch.store import VectorStore

pytestmark = pytest.mark.integration
IDLE_S = 40  # > three of pymilvus's 10 s keepalive pings with no call between them


def test_a_store_opened_after_idle_seconds_connects(tmp_path):
    server = MilvusServer(tmp_path / "server.db", log_path=tmp_path / "milvus.log").start()
    try:
        first = VectorStore(server.uri, "images", timeout_s=5)
        first.open(8, "sha")
        assert first.count() == 0
        first.close()
        time.sleep(IDLE_S)
        later = VectorStore(server.uri, "other", timeout_s=5)
        later.open(8, "sha")  # StoreUnavailable "Fail connecting" when the server sent the client away
        assert later.count() == 0
        later.close()
    finally:
        server.stop()
