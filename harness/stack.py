"""A whole stack on loopback ports, for tests, benchmarks and ``bench/flood.py``.

The gateway runs as in production (``uvicorn imgsearch.gateway.app:app_from_env --factory`` or
``imgsearch serve``) on a free 127.0.0.1 port, configured by IMGSEARCH_* variables; images
are generated, indexed through the real Triton into Milvus Lite; Milvus can also run as a
server process that a test kills and restarts. One harness, so the gateway, load-test and
reliability tests and the published flood figures all start the stack the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from harness.milvus_lite_server import POLICY_MARKER
from imgsearch.triton_server import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL = "resnet152"  # the served name (tests export a resnet18 under it)
COLLECTION = "images"

def clean_env(env: dict[str, str]) -> dict[str, str]:
    """This process's environment with exactly ``env`` as its IMGSEARCH_* settings: a developer's
    own settings never leak into a server or a CLI run the harness starts."""
    return {k: v for k, v in os.environ.items() if not k.startswith("IMGSEARCH_")} | env


@functools.cache
def _log_dir() -> tempfile.TemporaryDirectory:
    """Where a server's log goes when its caller names none; removed when this process exits."""
    return tempfile.TemporaryDirectory(prefix="imgsearch-harness-logs-")


def _default_log(prefix: str) -> Path:
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=".log", dir=_log_dir().name)
    os.close(fd)
    return Path(name)


def release_lite(path: str | Path) -> None:
    """Milvus Lite runs inside the process that opened it and keeps its lock until released."""
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_server(str(path))


def encode_served(url: str, model: str, pixels, batch: int | None = None):
    """``pixels`` (N, H, W, 3 uint8) through the served ``model`` at Triton's gRPC ``url``, ``batch``
    images per request (all at once when None): one :class:`~imgsearch.triton_client.Encoded`."""
    import numpy as np

    from imgsearch.triton_client import Encoded, TritonEncoder

    step = batch or len(pixels)

    async def encode() -> Encoded:
        enc = TritonEncoder(url, model)
        try:
            parts = [await enc.encode(pixels[i:i + step]) for i in range(0, len(pixels), step)]
        finally:
            await enc.close()
        probs = None if parts[0].probs is None else np.concatenate([p.probs for p in parts])
        return Encoded(np.concatenate([p.embeddings for p in parts]), probs)

    return asyncio.run(encode())


def index_images(root: Path, milvus_uri: str, triton_grpc: str, repo: Path, model: str = MODEL,
                 collection: str = COLLECTION, extra: Sequence = (), limit: int | None = None) -> dict[str, int]:
    """Encode every .jpg image under ``root`` (the first ``limit``) through Triton and upsert it
    (plus ``extra`` ready-made rows); rel path -> id. Labels follow the indexer's folder rule."""
    import numpy as np

    from imgsearch.imaging import decode_image, sniff_format
    from imgsearch.labels import folder_label
    from imgsearch.model_card import read_card
    from imgsearch.store import Row, VectorStore, content_id, is_lite

    card = read_card(repo, model)
    paths = sorted(p for p in root.rglob("*.jpg") if p.is_file() and not p.is_symlink())
    read = ((p, p.read_bytes()) for p in paths)  # each file read once; past ``limit``, never
    picked = list(islice(((p, b) for p, b in read if sniff_format(b)), limit))
    files, blobs = [p for p, _ in picked], [b for _, b in picked]
    pixels = np.stack([decode_image(b) for b in blobs])

    emb = encode_served(triton_grpc, model, pixels, batch=16).embeddings
    rels = [p.relative_to(root).as_posix() for p in files]
    rows = [Row(content_id(b), rel, folder_label(rel.split("/")[0]) if "/" in rel else "", e)
            for rel, b, e in zip(rels, blobs, emb)]
    store = VectorStore(str(milvus_uri), collection)
    try:
        store.open(card.embedding_dim, card.model_sha, card.name, patient=True)
        store.upsert(rows + list(extra), bulk=True)
    finally:
        store.close()
        if is_lite(str(milvus_uri)):
            release_lite(milvus_uri)
    return {r.path: r.id for r in rows}


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def gateway_env(repo: Path, triton_grpc: str, milvus_uri: str | Path, image_root: Path,
                **extra: object) -> dict[str, str]:
    env = {
        "IMGSEARCH_TRITON_URL": triton_grpc,
        "IMGSEARCH_MODEL_REPOSITORY": str(repo),
        "IMGSEARCH_MODEL_NAME": MODEL,
        "IMGSEARCH_MILVUS_URI": str(milvus_uri),
        "IMGSEARCH_COLLECTION": COLLECTION,
        "IMGSEARCH_IMAGE_ROOT": str(image_root),
        "IMGSEARCH_DECODE_THREADS": "2",
        "IMGSEARCH_TRITON_TIMEOUT_S": "10",
    }
    env.update({f"IMGSEARCH_{k.upper()}": str(v) for k, v in extra.items()})
    return env


@dataclass
class GatewayProc:
    url: str
    port: int
    proc: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_bytes(self) -> bytes:
        try:
            return self.log_path.read_bytes()
        except OSError:
            return b""

    def stop(self, timeout_s: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def _file_size_limit(nbytes: int):
    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))  # Python ignores SIGXFSZ: EFBIG

    return limit


def start_gateway(env: dict[str, str], *, serve_cli: bool = False, log_level: str = "info",
                  log_path: Path | None = None, startup_timeout_s: float = 120.0,
                  extra_env: dict[str, str] | None = None, python_args: Sequence[str] = (),
                  max_file_bytes: int | None = None, checkout: Path | None = None) -> GatewayProc:
    """The gateway as in production, on a free loopback port; returns once /healthz answers.

    ``serve_cli``: through ``imgsearch serve`` (its uvicorn settings: graceful shutdown
    timeout), else ``uvicorn imgsearch.gateway.app:app_from_env --factory``. stdout and stderr go
    to ``log_path``. The caller's IMGSEARCH_* variables are dropped first. ``python_args`` go
    before the module (``["-m", "cProfile", "-o", path]`` profiles the gateway). ``max_file_bytes``:
    no file the gateway writes may grow past this (RLIMIT_FSIZE), as on a full disk.
    ``checkout``: the gateway of another revision of this project (:func:`checkout`), run in
    its folder so that its own packages are imported: a benchmark's baseline. Without
    ``serve_cli``, a revision from before the components moved under ``imgsearch`` runs as
    uvicorn ran it then (``gateway.app:app_from_env``, no head-deadline protocol).
    """
    port = free_port()
    clean = clean_env({**env, **(extra_env or {})})
    clean.setdefault("PYTHONUNBUFFERED", "1")
    if serve_cli:
        cmd = [sys.executable, *python_args, "-m", "imgsearch.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--log-level", log_level]
    elif checkout is not None and not (checkout / "imgsearch" / "gateway").exists():
        cmd = [sys.executable, *python_args, "-m", "uvicorn", "gateway.app:app_from_env", "--factory",
               "--host", "127.0.0.1", "--port", str(port), "--log-level", log_level]
    else:
        cmd = [sys.executable, *python_args, "-m", "uvicorn", "imgsearch.gateway.app:app_from_env", "--factory",
               "--http", "imgsearch.gateway.protocol:HeadDeadlineProtocol", "--host", "127.0.0.1",
               "--port", str(port), "--log-level", log_level]
    if log_path is None:
        log_path = _default_log("gateway-")
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, cwd=checkout or REPO_ROOT, env=clean, stdout=logf, stderr=subprocess.STDOUT,
                                preexec_fn=None if max_file_bytes is None else _file_size_limit(max_file_bytes))
    gw = GatewayProc(f"http://127.0.0.1:{port}", port, proc, log_path)
    deadline = time.monotonic() + startup_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}:\n{gw.log_text()[-4000:]}")
        try:
            with urllib.request.urlopen(gw.url + "/healthz", timeout=2) as r:
                if r.status == 200:
                    return gw
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    gw.stop()
    raise RuntimeError(f"gateway not up after {startup_timeout_s}s:\n{gw.log_text()[-4000:]}")


def commit(rev: str) -> str:
    """The full hash of ``rev`` in this repository."""
    return subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--verify", rev + "^{commit}"],
                          check=True, capture_output=True, text=True).stdout.strip()


def checkout(rev: str, dest: Path) -> Path:
    """This repository's files at ``rev`` (``git archive``: no .git, nothing untracked) in
    ``dest``, importable from there: each component folder that pyproject.toml installs as
    ``imgsearch.<name>`` is linked under ``imgsearch/``, where the installed project has it (the
    editable install would otherwise import this checkout's component)."""
    import tomllib

    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", "--format=tar", rev],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    package_dir = tomllib.loads((dest / "pyproject.toml").read_text()).get("tool", {}).get(
        "setuptools", {}).get("package-dir", {})
    for name, folder in package_dir.items():
        if name.startswith("imgsearch.") and name.count(".") == 1:
            (dest / "imgsearch" / name.split(".")[1]).symlink_to(Path("..") / folder)
    return dest


@contextlib.contextmanager
def served_folder(folder: Path, repo: Path, work: Path, model_name: str) -> Iterator[str]:
    """Triton on ``repo``, ``folder`` indexed by ``imgsearch index`` into Milvus Lite under
    ``work``, then the gateway over them; yields the gateway's URL."""
    from imgsearch.triton_server import LocalTriton

    db = work / "milvus.db"
    with LocalTriton(repo, "cpu") as triton:
        env = gateway_env(repo, triton.grpc_url, db, folder, model_name=model_name)
        cmd = [sys.executable, "-m", "imgsearch.cli", "index", str(folder), "--recreate"]
        r = subprocess.run(cmd, cwd=REPO_ROOT, env=clean_env(env), capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"imgsearch index failed ({r.returncode}):\n{r.stderr[-3000:]}")
        release_lite(db)
        gw = start_gateway(env)
        try:
            yield gw.url
        finally:
            gw.stop()


class MilvusServer:
    """Milvus Lite's gRPC server in its own process: a Milvus "server URI" that can die and return."""

    def __init__(self, data_dir: Path, port: int | None = None, log_path: Path | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.log_path = log_path or _default_log("milvus-")
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> "MilvusServer":
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "harness.milvus_lite_server", "server", "--data-dir", str(self.data_dir),
                 "--host", "127.0.0.1", "--port", str(self.port)], cwd=REPO_ROOT, stdout=logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"milvus-lite server exited: {self.log_path.read_text(errors='replace')[-2000:]}")
            if port_open(self.port):
                if POLICY_MARKER not in self.log_path.read_text(errors="replace"):
                    self.kill()
                    raise RuntimeError("milvus-lite built its server without harness.milvus_lite_server's "
                                       "keepalive policy: see that module")
                return self
            time.sleep(0.05)
        raise RuntimeError(f"milvus-lite server not listening on {self.port} after {timeout_s}s")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class LockHolder:
    """Another process holding the Milvus Lite data dir's flock, as a running indexer does."""

    CODE = ("import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "time.sleep(3600)\n")

    def __init__(self, db_dir: Path) -> None:
        self.lock_file = Path(db_dir) / "LOCK"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "LockHolder":
        self.proc = subprocess.Popen([sys.executable, "-c", self.CODE, str(self.lock_file)],
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if line.strip() != "locked":
            self.release()
            raise RuntimeError(f"the lock holder did not lock {self.lock_file}")
        return self

    def release(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def export_repo(dest: Path, *extra: str) -> Path:
    """``imgsearch export --arch resnet18`` (random weights) into ``dest``, with extra CLI flags."""
    cmd = [sys.executable, "-m", "imgsearch.cli", "export", "--arch", "resnet18", "--weights", "random", "--repository", str(dest),
           "--model-name", MODEL, *extra]
    res = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"export failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return dest


def backend_bound_repo(dest: Path) -> Path:
    """ResNet-152 (random weights) served by one ONNX Runtime thread: the flood's backend.

    With resnet18 on an idle 2-core box capacity is ~60 searches/s, and 10x that (600
    uploads/s) is more than one Python client plus the gateway can send and parse on the core
    Triton leaves them: a flood then measures the load generator. This model serves ~9/s on
    one core, leaving the other to the gateway and the client, so a 10x flood (~90/s) is a
    load this box can really offer.
    """
    from imgsearch.export.onnx_export import export_model
    from imgsearch.export.triton_config import CPU_DEFAULTS, cpu_config
    from imgsearch.model_card import read_card

    export_model(arch="resnet152", repository=dest, model_name=MODEL, parity_images_n=2)
    cfg = cpu_config(read_card(dest, MODEL), CPU_DEFAULTS, intra_op_threads=1)
    (dest / MODEL / "configs" / "cpu.pbtxt").write_text(cfg)
    return dest


def copy_db(template: Path, dest: Path) -> Path:
    """Milvus Lite allows one process per .db: each gateway gets its own copy."""
    shutil.copytree(template, dest)
    with contextlib.suppress(FileNotFoundError):
        (dest / "LOCK").unlink()
    return dest


def drip(socks: Sequence[socket.socket], chunk: bytes, every_s: float, stop: threading.Event) -> threading.Thread:
    """Slow clients: send ``chunk`` on each socket every ``every_s`` seconds until ``stop`` is set
    (a socket the server has closed is skipped). Returns the started thread."""
    def run() -> None:
        while not stop.wait(every_s):
            for s in socks:
                try:
                    s.send(chunk)
                except OSError:
                    pass

    t = threading.Thread(target=run, name="drip", daemon=True)
    t.start()
    return t


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` now."""
    return _status_kib(pid, "VmRSS") * 1024


def rss_tree_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and its children now (a gateway with an embedded Milvus Lite
    has one); a child that ends meanwhile counts as nothing."""
    import psutil

    p = psutil.Process(pid)
    total = p.memory_info().rss
    for child in p.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += child.memory_info().rss
    return total


def peak_rss_bytes(pid: int) -> int:
    """The most resident memory ``pid`` has had (its high-water mark)."""
    return _status_kib(pid, "VmHWM") * 1024


class ConnectionWatcher(threading.Thread):
    """Reads every socket as data comes, and notes when each one is closed by the server."""

    def __init__(self, socks: list[socket.socket], limit_s: float) -> None:
        super().__init__(daemon=True)
        self.sel = selectors.DefaultSelector()
        for s in socks:
            s.setblocking(False)
            self.sel.register(s, selectors.EVENT_READ)
        self.got: dict[socket.socket, bytes] = {s: b"" for s in socks}
        self.closed: dict[socket.socket, float] = {}
        self.deadline = time.monotonic() + limit_s

    def run(self) -> None:
        while len(self.closed) < len(self.got) and time.monotonic() < self.deadline:
            for key, _ in self.sel.select(timeout=0.05):
                s = key.fileobj
                try:
                    chunk = s.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:  # reset or aborted by the server: closed too
                    chunk = b""
                if chunk:
                    self.got[s] += chunk
                else:
                    self.closed[s] = time.monotonic()
                    self.sel.unregister(s)
