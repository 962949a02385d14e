"""``triton_for``: IMGSEARCH_TRITON_URL when set, else a local tritonserver for the block.

The local server is replaced by a recorder here: what is checked is which server the
commands ask for (repository, config, ports, exit timeout) and the URL they are given;
starting the real binary is the integration tests' part (tests/integration/test_triton.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from imgsearch import triton_server
from imgsearch.settings import Settings
from imgsearch.triton_server import triton_for


class Recorder:
    made: list[Recorder] = []

    def __init__(self, repository, config_name, **kw):
        self.repository, self.config_name, self.kw = Path(repository), config_name, kw
        self.entered = self.exited = False
        Recorder.made.append(self)

    def client_url(self, protocol: str) -> str:
        return f"local-{protocol}"

    def __enter__(self):
        self.entered = True
        return self

    def __exit__(self, *exc):
        self.exited = True


@pytest.fixture
def recorder(settings_env):
    Recorder.made = []
    settings_env.setattr(triton_server, "LocalTriton", Recorder)
    return Recorder


def settings(**kw) -> Settings:
    return Settings(_env_file=None, model_repository=Path("/repo"), model_config_name="gpu", triton_exit_timeout_s=7,
                    local_triton_http_port=9100, local_triton_grpc_port=9101, local_triton_metrics_port=9102, **kw)


def test_the_url_when_set_and_no_server(recorder):
    with triton_for(settings(triton_url="triton:8001", triton_protocol="http")) as t:
        assert (t.url, t.protocol, t.server) == ("triton:8001", "http", None)
    assert recorder.made == []


def test_a_local_server_on_free_ports_for_the_block(recorder):
    with triton_for(settings(triton_protocol="grpc")) as t:
        (server,) = recorder.made
        assert t.server is server and server.entered and not server.exited
        assert (t.url, t.protocol) == ("local-grpc", "grpc")
    assert server.exited
    assert (server.repository, server.config_name) == (Path("/repo"), "gpu")
    assert server.kw == {"exit_timeout_s": 7}  # no ports given: LocalTriton picks free ones


def test_fixed_ports_and_another_repository(recorder):
    with triton_for(settings(), Path("/other"), fixed_ports=True):
        pass
    (server,) = recorder.made
    assert server.repository == Path("/other")
    assert server.kw == {"exit_timeout_s": 7, "http_port": 9100, "grpc_port": 9101, "metrics_port": 9102}


def test_a_local_triton_s_three_ports_are_distinct():
    from imgsearch.triton_server import LocalTriton, free_ports

    assert all(len(set(free_ports(3))) == 3 for _ in range(200))
    server = LocalTriton(Path("."), "cpu", grpc_port=free_ports(1)[0])
    assert len({server.http_port, server.grpc_port, server.metrics_port}) == 3
