"""The one percentile definition every latency figure in the project uses.

Nearest rank: the q-th percentile of n values is the smallest value that at least q % of
them do not exceed, i.e. the ``ceil(q / 100 * n)``-th smallest (the smallest for q = 0).
It is always an observed value, never one interpolated between two requests (numpy's
default, linear interpolation, reports latencies no request had); numpy names this
definition ``method="inverted_cdf"``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from fractions import Fraction

import numpy as np


def percentiles(values: Iterable[float] | np.ndarray, qs: Sequence[float]) -> list[float | None]:
    """Nearest-rank percentiles ``qs`` (each in 0..100) of ``values``; None for each when empty.

    The values are sorted once for all of ``qs``.
    """
    data = np.sort(np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=float).ravel())
    n = data.size
    out: list[float | None] = []
    for q in qs:
        if not 0 <= q <= 100:
            raise ValueError(f"percentile {q} is outside 0..100")
        if n == 0:
            out.append(None)
            continue
        # exact arithmetic: 99.9 / 100 * 1000 in floats is 999.0000000000001, whose ceiling is one rank too high
        rank = max(1, math.ceil(Fraction(str(q)) * n / 100))
        out.append(float(data[rank - 1]))
    return out


def percentile(values: Iterable[float] | np.ndarray, q: float) -> float | None:
    """Nearest-rank percentile ``q`` (0..100) of ``values`` (see the module); None when empty."""
    return percentiles(values, [q])[0]
