"""Indexer fixtures: a generated image root with broken files, and ways to run ``imgsearch index``.

In-process runs (``index_cli``) are quick and give the JSON report; the crash tests run
``python -m imgsearch.cli index`` as a subprocess so it can be SIGKILLed. Milvus Lite
serves one process per .db file, so ``release_lite`` hands the file back before a
subprocess opens it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.data import bomb_png, make_dataset, truncated_jpeg
from harness.indexer import subprocess_index
from imgsearch.store import content_id

CLASSES, PER_CLASS = 10, 20
BROKEN = {
    "n00000000-class_0/empty.jpg": ("undecodable_image", b""),
    "n00000001-class_1/text.jpg": ("unsupported_media_type", b"just some text, not a JPEG\n" * 3),
    "n00000002-class_2/truncated.jpg": ("undecodable_image", None),  # filled below
    "n00000003-class_3/bomb.png": ("image_too_large", None),
}


@dataclass
class Dataset:
    root: Path
    valid: dict[str, int]  # rel path -> content id
    broken: dict[str, str]  # rel path -> expected error code


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Dataset:
    root = tmp_path_factory.mktemp("images")
    files = make_dataset(root, CLASSES, PER_CLASS)
    valid = {p.relative_to(root).as_posix(): content_id(p.read_bytes()) for p in files}
    broken = {}
    for rel, (code, data) in BROKEN.items():
        if data is None:
            data = truncated_jpeg() if rel.endswith(".jpg") else bomb_png(10000, 10000)
        (root / rel).write_bytes(data)
        broken[rel] = code
    (root / "README.txt").write_text("not an image: ignored by name\n")
    assert len(set(valid.values())) == len(valid)  # generated images are all distinct
    return Dataset(root, valid, broken)


@pytest.fixture
def env(settings_env, triton, repo18, tmp_path) -> dict[str, str]:
    """IMGSEARCH_* for a run against the session Triton and a fresh Milvus Lite file."""
    values = {
        "IMGSEARCH_TRITON_URL": triton.grpc_url,
        "IMGSEARCH_MODEL_REPOSITORY": str(repo18),
        "IMGSEARCH_MILVUS_URI": str(tmp_path / "milvus.db"),
        "IMGSEARCH_COLLECTION": "images",
    }
    for k, v in values.items():
        settings_env.setenv(k, v)
    return values


@dataclass
class Run:
    rc: int
    report: dict
    out: str
    err: str


@pytest.fixture
def index_cli(tmp_path, capsys):
    """``index_cli(root, *options)`` runs ``imgsearch index`` in this process."""
    from imgsearch.cli import main

    counter = iter(range(1000))

    def run(root: Path, *options: str) -> Run:
        out = tmp_path / f"report-{next(counter)}.json"
        capsys.readouterr()
        rc = main(["index", str(root), "--no-progress", "--json", str(out), *options])
        cap = capsys.readouterr()
        report = json.loads(out.read_text()) if out.exists() else {}
        return Run(rc, report, cap.out, cap.err)

    return run


@pytest.fixture
def spawn_index():
    """``spawn_index(root, env, *options, cwd=...)`` -> Popen; whatever is left is killed at teardown."""
    started: list[subprocess.Popen] = []

    def start(root: Path, env: dict[str, str], *options: str, cwd: Path) -> subprocess.Popen:
        proc = subprocess_index(root, env, *options, cwd=cwd)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
