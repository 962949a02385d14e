"""The gateway's memory budget from its settings, and the container limit it is checked against."""

from __future__ import annotations

import pytest

from imgsearch.gateway.memory import (
    BASE_BYTES,
    CONNECTION_READ_AHEAD_BYTES,
    MIB,
    container_memory_limit,
    memory_budget,
    memory_warning,
)
from imgsearch.settings import Settings


def settings(**values) -> Settings:
    return Settings(_env_file=None, triton_url="127.0.0.1:1", **values)


def test_every_part_follows_its_setting(settings_env):
    s = settings(max_inflight=8, max_reading=4, max_upload_bytes=2 * MIB, max_connections=100,
                 decode_memory_bytes=300 * MIB, max_pixels=10_000_000, thumb_cache_items=10, thumb_max_side=100)
    b = memory_budget(s)
    assert b.base == BASE_BYTES
    assert b.uploads == (8 + 4 + 1) * 2 * MIB  # in flight, arriving, and the one being copied
    assert b.connections == 100 * CONNECTION_READ_AHEAD_BYTES
    assert b.decodes == 300 * MIB  # the shared budget, larger than one 10 MP raster
    assert b.thumbnails == 10 * 100 * 100 * 3
    assert b.triton_requests == 0  # pixels mode: the upload is not copied into the Triton request
    assert b.total == BASE_BYTES + 26 * MIB + 100 * CONNECTION_READ_AHEAD_BYTES + 300 * MIB + 300_000
    assert b.decode_knob == "IMGSEARCH_DECODE_MEMORY_BYTES"
    # one image larger than the whole decode budget runs alone: then it is the bound, and its setting
    big = memory_budget(settings(decode_memory_bytes=10 * MIB, max_pixels=50_000_000))
    assert (big.decodes, big.decode_knob) == (200_000_000, "IMGSEARCH_MAX_PIXELS")
    # bytes mode: each in-flight upload is copied into its request to Triton as well
    by = memory_budget(settings(triton_input="bytes", max_inflight=8, max_upload_bytes=2 * MIB))
    assert by.triton_requests == 16 * MIB and by.total == memory_budget(
        settings(max_inflight=8, max_upload_bytes=2 * MIB)).total + 16 * MIB
    text = b.describe()
    assert text.startswith(f"{b.total / MIB:,.0f} MiB (") and "uploads 26" in text and "triton_requests" not in text


NO_LIMIT_V1 = "9223372036854771712\n"  # cgroup v1's page-rounded 2**63


@pytest.mark.parametrize(("proc", "files", "want"), [
    # cgroup v2 inside a container's namespace: its own cgroup is the root
    ("0::/\n", {"memory.max": "2684354560\n"}, 2684354560),
    ("0::/\n", {"memory.max": "max\n"}, None),
    # v2 without a namespace (a systemd unit): the lowest limit from its cgroup up
    ("0::/system.slice/imgsearch.service\n", {"system.slice/imgsearch.service/memory.max": "max\n",
                                               "system.slice/memory.max": "1073741824\n"}, 1073741824),
    # cgroup v1, namespaced, then a container's cgroup seen from the host with its parent's limit
    ("4:memory:/\n", {"memory/memory.limit_in_bytes": "1073741824\n"}, 1073741824),
    ("4:memory:/docker/abc\n", {"memory/docker/abc/memory.limit_in_bytes": NO_LIMIT_V1,
                                "memory/docker/abc/memory.stat": "cache 0\nhierarchical_memory_limit 536870912\n"},
     536870912),
    ("4:memory:/\n", {"memory/memory.limit_in_bytes": NO_LIMIT_V1}, None),
    ("", {}, None),
])
def test_the_limit_that_applies_to_this_process(tmp_path, proc, files, want):
    root = tmp_path / "cgroup"
    root.mkdir()
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (tmp_path / "proc_cgroup").write_text(proc)
    assert container_memory_limit(root, tmp_path / "proc_cgroup") == want


def test_a_limit_under_the_budget_is_named_with_what_to_change(settings_env):
    b = memory_budget(settings())
    assert memory_warning(b, None) is None and memory_warning(b, b.total) is None
    warning = memory_warning(b, b.total - 1)
    assert warning and b.describe() in warning and "Raise the limit" in warning
    # the defaults' three largest parts, largest first, each with what lowers it
    assert [part for part, _ in b.largest()] == ["uploads", "decodes", "connections"]
    assert "uploads (IMGSEARCH_MAX_INFLIGHT, IMGSEARCH_MAX_READING, IMGSEARCH_MAX_UPLOAD_BYTES)" in warning
    assert "decodes (IMGSEARCH_DECODE_MEMORY_BYTES)" in warning and "thumbnails" not in warning.split("largest")[-1]
    big = memory_budget(settings(decode_memory_bytes=10 * MIB))
    assert "decodes (IMGSEARCH_MAX_PIXELS)" in memory_warning(big, 1)
    # every worker process holds its own budget in the one container
    assert memory_warning(b, 2 * b.total - 1, workers=1) is None
    two = memory_warning(b, 2 * b.total - 1, workers=2)
    assert two and two.startswith("2 worker processes, each holding up to") and memory_warning(b, 2 * b.total, 2) is None


def test_the_process_factory_warns_when_its_container_is_too_small(settings_env, monkeypatch, caplog):
    from imgsearch.gateway import app as gateway_app

    settings_env.setenv("IMGSEARCH_TRITON_URL", "127.0.0.1:1")
    budget = memory_budget(Settings(_env_file=None))
    monkeypatch.setattr(gateway_app, "unmap_large_allocations", lambda: True)  # leave this process's allocator be
    frozen = []  # and its garbage collector
    monkeypatch.setattr(gateway_app, "freeze_start_up_objects", lambda: frozen.append(True))
    monkeypatch.setattr(gateway_app, "container_memory_limit", lambda: budget.total - MIB)
    with caplog.at_level("INFO", logger="gateway"):
        app = gateway_app.app_from_env()
    assert [r.levelname for r in caplog.records if "memory" in r.getMessage()] == ["WARNING"]
    assert memory_warning(budget, budget.total - MIB) in caplog.text
    assert app.state.metrics.memory_budget._value.get() == budget.total
    assert frozen == [True]  # what start-up built is out of the collections that requests trigger

    caplog.clear()
    monkeypatch.setattr(gateway_app, "container_memory_limit", lambda: budget.total)
    with caplog.at_level("INFO", logger="gateway"):
        gateway_app.app_from_env()
    assert f"memory budget {budget.describe()} per process, 1 process(es); container limit " \
           f"{budget.total / MIB:,.0f} MiB" in caplog.text
    assert "more than its container's memory limit" not in caplog.text


def test_freezing_takes_what_is_alive_out_of_the_collections():
    import gc

    from imgsearch.gateway.app import freeze_start_up_objects

    assert gc.get_freeze_count() == 0
    try:
        freeze_start_up_objects()
        assert gc.get_freeze_count() > 10_000  # this process's modules, classes and functions at least
    finally:
        gc.unfreeze()  # back to the oldest generation: the rest of the test run collects them as before
