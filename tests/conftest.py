"""Shared fixtures: a small exported model and a real tritonserver, once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

MODEL = "resnet152"  # the served name; the tests export a resnet18 under it for speed


@pytest.fixture(scope="session")
def repo18(tmp_path_factory) -> Path:
    """resnet18, random weights (seed 0), exported to ONNX with both configs."""
    from imgsearch.export.onnx_export import export_model

    repo = tmp_path_factory.mktemp("repo18")
    export_model(arch="resnet18", weights="random", repository=repo, model_name=MODEL)
    return repo


@pytest.fixture(scope="session")
def triton(repo18):
    """The real tritonserver binary from the nvidia-pytriton wheel, on loopback ports."""
    from imgsearch.triton_server import LocalTriton

    server = LocalTriton(repo18, "cpu", exit_timeout_s=5)
    with server:
        yield server


@pytest.fixture
def settings_env(monkeypatch):
    """Clear IMGSEARCH_* from the environment so a developer's .env cannot leak in."""
    for k in list(os.environ):
        if k.startswith("IMGSEARCH_"):
            monkeypatch.delenv(k)
    return monkeypatch
