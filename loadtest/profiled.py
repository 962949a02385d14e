"""Run a module under yappi (CPU clock, every thread) and write a pstats file at exit.

``python -m loadtest.profiled OUT.prof -m uvicorn gateway.app:app_from_env --factory ...``:
cProfile sees only the main thread, but a gateway spends part of its CPU in its thread
pools (Milvus client calls, decoding); yappi profiles them all.
"""

from __future__ import annotations

import atexit
import runpy
import sys


def main() -> None:
    import yappi

    if len(sys.argv) < 4 or sys.argv[2] != "-m":
        sys.exit("usage: python -m loadtest.profiled OUT.prof -m MODULE [ARGS...]")
    out, module = sys.argv[1], sys.argv[3]

    def dump() -> None:
        yappi.stop()
        yappi.get_func_stats().save(out, type="pstat")

    yappi.set_clock_type("cpu")
    yappi.start(builtins=False)
    atexit.register(dump)
    sys.argv = [module, *sys.argv[4:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
