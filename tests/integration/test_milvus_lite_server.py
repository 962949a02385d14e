"""The Milvus Lite server the tests run (harness.stack.MilvusServer) keeps an idle client's
connection, as Milvus's own servers do (a keepalive ping every 5 s is allowed, idle or not).
pymilvus pings every 10 s; under Python gRPC's default policy the plain Lite server closes an
idle client's connection about 40 s after its last call, and the next store the process opens
for that address fails to connect."""

from __future__ import annotations

import time

import pytest

from harness.stack import MilvusServer
from imgsearch.store import VectorStore

pytestmark = pytest.mark.integration
IDLE_S = 55  # well past the fourth of pymilvus's 10 s pings with no call between them


def test_a_store_opened_after_an_idle_spell_connects(tmp_path):
    server = MilvusServer(tmp_path / "server.db", log_path=tmp_path / "milvus.log").start()
    try:
        first = VectorStore(server.uri, "images", timeout_s=5)
        first.open(8, "sha")
        assert first.count() == 0
        first.close()
        time.sleep(IDLE_S)
        later = VectorStore(server.uri, "other", timeout_s=5)
        later.open(8, "sha")  # StoreUnavailable "Fail connecting" under the default policy
        assert later.count() == 0
        later.close()
    finally:
        server.stop()
