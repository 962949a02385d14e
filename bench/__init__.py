"""One-off benchmarks over the real stack (run from the repository root: ``python -m bench.<name>``).

Their client load comes from :mod:`harness.drive` (closed loop: N clients for S seconds or
R requests) and every percentile they report from :mod:`imgsearch.stats` (nearest rank).
"""

import shlex
import sys


def command_line(module: str, argv: list[str] | None = None) -> str:
    """The shell line that runs benchmark ``module`` again with ``argv`` (this process's own
    arguments when None), as its results file records it: quoted, so it reads back whole."""
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])
