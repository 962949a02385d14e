"""One-off benchmarks over the real stack (run from the repository root: ``python -m bench.<name>``).

Their client load comes from :mod:`harness.drive` (closed loop: N clients for S seconds or
R requests) and every percentile they report from :mod:`imgsearch.stats` (nearest rank).
"""

import os
import platform
import shlex
import sys
from pathlib import Path


def command_line(module: str, argv: list[str] | None = None) -> str:
    """The shell line that runs benchmark ``module`` again with ``argv`` (this process's own
    arguments when None), as its results file records it: quoted, so it reads back whole."""
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def machine() -> dict:
    """What a results file records of the machine that measured it. Absolute CPU times differ
    severalfold between machines of the same size (a shared host, another processor), so the
    processor and the load at the start are kept beside the figures."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "processor": model, "platform": platform.platform(),
            "python": platform.python_version(), "load_avg": [round(x, 2) for x in os.getloadavg()]}
