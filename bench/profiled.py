"""Run a module under yappi (CPU clock, every thread) and write a pstats file at exit.

``python -m bench.profiled OUT.prof -m uvicorn imgsearch.gateway.app:app_from_env --factory ...``:
cProfile sees only the main thread, but a gateway spends part of its CPU in its thread
pools (Milvus client calls, decoding); yappi profiles them all. Profiling starts on
SIGUSR1 (after start-up and warm-up, which are not what is measured) and the file is
written when the process exits.
"""

from __future__ import annotations

import atexit
import runpy
import signal
import sys


def main() -> None:
    import yappi

    if len(sys.argv) < 4 or sys.argv[2] != "-m":
        sys.exit("usage: python -m bench.profiled OUT.prof -m MODULE [ARGS...]")
    out, module = sys.argv[1], sys.argv[3]

    def dump() -> None:
        yappi.stop()
        yappi.get_func_stats().save(out, type="pstat")

    yappi.set_clock_type("cpu")
    signal.signal(signal.SIGUSR1, lambda *_: yappi.start(builtins=False))
    atexit.register(dump)
    # uvicorn restores this handler after its graceful shutdown and raises SIGTERM again: exit
    # through SystemExit so that atexit writes the profile (the default action would not)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sys.argv = [module, *sys.argv[4:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
