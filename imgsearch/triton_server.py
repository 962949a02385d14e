"""Run the real ``tritonserver`` binary shipped in the nvidia-pytriton wheel, no Docker.

``LocalTriton`` is a context manager (tests, ``imgsearch serve``, the indexer) and the
engine of ``imgsearch triton``; ``triton_for`` picks between ``IMGSEARCH_TRITON_URL`` and a
``LocalTriton`` the way every command that needs Triton does. It prepares what the wheel leaves to its own launcher:
a backend directory holding the Python-backend stub for this interpreter, the library
path, and a ``PATH`` whose first ``python3`` is this environment's (the stub finds its
packages through it, not through ``PYTHONPATH``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import LauncherError

if TYPE_CHECKING:
    from .settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TritonPaths:
    binary: Path
    libs: Path
    python_backend: Path
    stub: Path


def find_triton() -> TritonPaths:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise LauncherError("nvidia-pytriton is not installed: pip install 'imgsearch[local]' (make setup does)")
    pkg = Path(next(iter(spec.submodule_search_locations)))
    root = pkg / "tritonserver"
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    paths = TritonPaths(
        binary=root / "bin" / "tritonserver",
        libs=pkg.parent / "nvidia_pytriton.libs",
        python_backend=root / "backends" / "python",
        stub=root / "python_backend_stubs" / ver / "triton_python_backend_stub",
    )
    for p in (paths.binary, paths.libs, paths.python_backend, paths.stub):
        if not p.exists():
            raise LauncherError(f"the nvidia-pytriton wheel lacks {p} (Python {ver} supported?)")
    return paths


def check_stub_libraries(paths: TritonPaths) -> None:
    """Fail with the fix instead of a load timeout when libpython is missing."""
    env = dict(os.environ, LD_LIBRARY_PATH=_ld_path(paths))
    try:
        out = subprocess.run(["ldd", str(paths.stub)], capture_output=True, text=True, env=env, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return  # no ldd: let the server speak for itself
    missing = [line.split()[0] for line in out.splitlines() if "not found" in line]
    if missing:
        ver = f"{sys.version_info.major}.{sys.version_info.minor}"
        hint = f" (apt install libpython{ver})" if any("libpython" in m for m in missing) else ""
        raise LauncherError(f"the Python-backend stub cannot find {', '.join(missing)}{hint}")


def check_numpy(python_bin: Path | None = None) -> None:
    """numpy<2 where the stub will find its packages (this interpreter, or ``python_bin/python3``)."""
    if python_bin is None:
        import numpy

        version = numpy.__version__
    else:
        try:
            version = subprocess.run([str(Path(python_bin) / "python3"), "-c", "import numpy; print(numpy.__version__)"],
                                     capture_output=True, text=True, timeout=60, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            raise LauncherError(f"cannot run numpy in the stub's python {python_bin}/python3: {e}") from None
    if int(version.split(".")[0]) >= 2:
        raise LauncherError(
            f"numpy {version} is installed: the Triton Python-backend stub silently corrupts tensors "
            "with numpy 2 (docs/design.md). Install numpy<2 (make setup pins it)."
        )


def _ld_path(paths: TritonPaths) -> str:
    return ":".join(x for x in [str(paths.libs), os.environ.get("LD_LIBRARY_PATH", "")] if x)


def port_in_use(host: str, port: int) -> bool:
    """True when something listens on host:port (SO_REUSEADDR: TIME_WAIT leftovers do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports. The sockets stay bound until all are chosen: ports asked for
    one at a time may come back equal (the OS reuses a just-closed port), and tritonserver
    refuses to start with its gRPC and metrics endpoints on one port."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def free_port() -> int:
    return free_ports(1)[0]


def prepare_backend_dir(paths: TritonPaths, dest: Path) -> Path:
    """``dest/python/`` = libtriton_python.so + utils + the stub for this Python."""
    py = dest / "python"
    py.mkdir(parents=True, exist_ok=True)
    for f in paths.python_backend.iterdir():
        if f.is_file():
            shutil.copy2(f, py / f.name)
    shutil.copy2(paths.stub, py / paths.stub.name)
    return dest


class LocalTriton:
    """A tritonserver child process serving ``repository``.

    >>> with LocalTriton("model_repository") as t:  # doctest: +SKIP
    ...     print(t.grpc_url)
    """

    def __init__(
        self,
        repository: str | Path,
        config_name: str | None = "cpu",
        http_port: int = 0,
        grpc_port: int = 0,
        metrics_port: int = 0,
        host: str = "127.0.0.1",
        exit_timeout_s: int = 20,
        startup_timeout_s: float = 300.0,
        log_file: str | Path | None = None,
        extra_args: list[str] | None = None,
        stub_python: str | Path | None = None,
        allow_numpy2: bool = False,
    ) -> None:
        self.repository = Path(repository).resolve()
        self.config_name = config_name
        self.host = host
        # the free ports come from one call, and never one the caller gave: three distinct ports
        given = {p for p in (http_port, grpc_port, metrics_port) if p}
        picked = iter([p for p in free_ports(3 + len(given)) if p not in given])
        self.http_port = http_port or next(picked)
        self.grpc_port = grpc_port or next(picked)
        self.metrics_port = metrics_port or next(picked)
        self.exit_timeout_s = exit_timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.extra_args = extra_args or []
        # a folder whose python3 the Python-backend stub takes its packages from (default:
        # this interpreter's); e.g. an environment with numpy<2 on a box whose own has numpy 2
        self.stub_python = Path(stub_python) if stub_python else None
        # only for repositories whose models move every tensor with DLPack (torch engine)
        self.allow_numpy2 = allow_numpy2
        self._tmp = Path(tempfile.mkdtemp(prefix="imgsearch-triton-"))
        self.log_path = Path(log_file) if log_file else self._tmp / "tritonserver.log"
        self.proc: subprocess.Popen | None = None

    # --- URLs -----------------------------------------------------------------------
    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def client_url(self, protocol: str) -> str:
        """host:port for ``TritonEncoder`` (``IMGSEARCH_TRITON_URL``) over ``grpc`` or ``http``."""
        return self.grpc_url if protocol == "grpc" else f"{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    # --- lifecycle ------------------------------------------------------------------
    def command(self, paths: TritonPaths, backend_dir: Path) -> list[str]:
        cmd = [
            str(paths.binary),
            "--model-repository", str(self.repository),
            "--backend-directory", str(backend_dir),
            "--model-control-mode", "none",  # no remote loading/unloading, in every config we ship
            "--http-address", self.host, "--http-port", str(self.http_port),
            "--grpc-address", self.host, "--grpc-port", str(self.grpc_port),
            "--metrics-address", self.host, "--metrics-port", str(self.metrics_port),
            "--allow-metrics", "true", "--allow-gpu-metrics", "false",
            "--exit-timeout-secs", str(self.exit_timeout_s),
            "--strict-readiness", "true",
            "--log-verbose", "0",
        ]
        if self.config_name:
            cmd += ["--model-config-name", self.config_name]
        return cmd + self.extra_args

    def environment(self, paths: TritonPaths) -> dict[str, str]:
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = _ld_path(paths)
        # the stub's embedded interpreter finds site-packages via the first python3 on PATH
        stub_bin = self.stub_python or Path(sys.executable).parent
        env["PATH"] = os.pathsep.join([str(stub_bin), env.get("PATH", "")])
        env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
        return env

    def start(self) -> "LocalTriton":
        if not self.repository.is_dir():
            raise LauncherError(f"model repository {self.repository} does not exist: run imgsearch export first")
        busy = [p for p in (self.http_port, self.grpc_port, self.metrics_port) if port_in_use(self.host, p)]
        if busy:
            # otherwise the readiness probe may be answered by whatever already listens there
            raise LauncherError(
                f"port(s) {', '.join(map(str, busy))} on {self.host} already in use (another tritonserver?): "
                "stop it, or choose other ports (IMGSEARCH_LOCAL_TRITON_{HTTP,GRPC,METRICS}_PORT)")
        paths = find_triton()
        check_stub_libraries(paths)
        if not self.allow_numpy2:
            check_numpy(self.stub_python)
        backend_dir = prepare_backend_dir(paths, self._tmp / "backends")
        logf = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.command(paths, backend_dir), stdout=logf, stderr=subprocess.STDOUT,
            env=self.environment(paths), start_new_session=True,
        )
        logf.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            code = self.proc.poll() if self.proc else None
            if code is not None:
                raise LauncherError(
                    f"tritonserver exited with code {code} while loading {self.repository}:\n{self.log_excerpt()}"
                )
            # tritonserver starts its metrics endpoint after gRPC and HTTP: a caller that reads
            # metrics_url right after start() would otherwise meet a refused connection
            if self.is_ready() and port_in_use(self.host, self.metrics_port):
                return
            time.sleep(0.25)
        self.stop()
        raise LauncherError(f"tritonserver not ready after {self.startup_timeout_s:.0f}s:\n{self.log_excerpt()}")

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_excerpt(self, limit: int = 40) -> str:
        """The log lines that explain a failure: errors, failed loads, python tracebacks."""
        lines = self.log_text().splitlines()
        keep = [
            ln for ln in lines
            if ln.startswith(("E", "W")) or "failed" in ln.lower() or "error" in ln.lower()
            or "Traceback" in ln or ln.startswith("  ") or "UNAVAILABLE" in ln
        ]
        return "\n".join((keep or lines)[-limit:])

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM (Triton drains in-flight work for up to exit_timeout_s), then SIGKILL."""
        if not self.proc or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout if timeout is not None else self.exit_timeout_s + 10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the server and its stubs (fault-injection tests)."""
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def cleanup(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "LocalTriton":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self.log_path.is_relative_to(self._tmp):
            self.cleanup()


@dataclass(frozen=True)
class TritonEndpoint:
    """Where a command reaches Triton: ``url`` (host:port) over ``protocol``."""

    url: str
    protocol: str
    server: LocalTriton | None  # the tritonserver started for the command; None with IMGSEARCH_TRITON_URL


@contextlib.contextmanager
def triton_for(settings: Settings, repository: str | Path | None = None, *,
               fixed_ports: bool = False) -> Iterator[TritonEndpoint]:
    """``IMGSEARCH_TRITON_URL`` when set; else a local tritonserver serving ``repository``
    (default ``settings.model_repository``, config ``settings.model_config_name``) for the block.

    ``fixed_ports``: the ``IMGSEARCH_LOCAL_TRITON_*_PORT`` ports (a server others connect to),
    instead of free ones (a server only this process uses).
    """
    if settings.triton_url:
        yield TritonEndpoint(settings.triton_url, settings.triton_protocol, None)
        return
    ports = dict(http_port=settings.local_triton_http_port, grpc_port=settings.local_triton_grpc_port,
                 metrics_port=settings.local_triton_metrics_port) if fixed_ports else {}
    with LocalTriton(repository if repository is not None else settings.model_repository, settings.model_config_name,
                     exit_timeout_s=settings.triton_exit_timeout_s, **ports) as server:
        yield TritonEndpoint(server.client_url(settings.triton_protocol), settings.triton_protocol, server)
