"""One-off benchmarks over the real stack (run from the repository root: ``python -m bench.<name>``)."""
