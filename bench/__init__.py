"""One-off benchmarks over the real stack (run from the repository root: ``python -m bench.<name>``).

Their client load comes from :mod:`harness.drive` (closed loop: N clients for S seconds or
R requests) and every percentile they report from :mod:`imgsearch.stats` (nearest rank).
"""

import json
import shlex
import sys
import time
from pathlib import Path


def command_line(module: str, argv: list[str] | None = None) -> str:
    """The shell line that runs benchmark ``module`` again with ``argv`` (this process's own
    arguments when None), as its results file records it: quoted, so it reads back whole."""
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def write_results(res: dict, args, module: str, argv: list[str] | None, started: float) -> None:
    """Add how and where the run was made (its options, the machine, the command line, its wall
    time from ``started``, a ``time.perf_counter()``) to ``res`` and write it to ``args.out``."""
    from imgsearch.loadtest.cli import machine_info

    res["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    res["machine"] = machine_info()
    res["command"] = command_line(module, argv)
    res["wall_s"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
