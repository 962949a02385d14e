"""One-off benchmarks over the real stack (run from the repository root: ``python -m bench.<name>``).

Their client load comes from :mod:`harness.drive` (closed loop: N clients for S seconds or
R requests) and every percentile they report from :mod:`imgsearch.stats` (nearest rank).
"""
