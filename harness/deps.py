"""What ``uv export`` writes (requirements/*.txt, from uv.lock): one reader for the tests of
the lock, of the gateway image and of the dependency floors."""

from __future__ import annotations

import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def read_export(path: Path, *, here: bool = True) -> dict[str, tuple[Requirement, set[str]]]:
    """Canonical name -> (requirement, its hashes) of each requirement in the file; ``here``: only
    those whose marker holds on this machine (else every platform's, the last line of a name winning)."""
    out: dict[str, tuple[Requirement, set[str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#") or line.startswith("-"):  # comments, pip options
            continue
        if not line[0].isspace():
            req = Requirement(line.rstrip(" \\"))
            current = None
            if not here or req.marker is None or req.marker.evaluate():
                current = canonicalize_name(req.name)
                out[current] = (req, set())
        elif current and (m := re.match(r"\s+--hash=(\S+)", line)):
            out[current][1].add(m.group(1))
    return out
