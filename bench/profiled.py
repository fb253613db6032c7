"""Run a module as `python -m MODULE` does, under cProfile switched on by SIGUSR1 and off by
SIGUSR2, and write the stats to OUT when the module returns (a service returns after SIGTERM).

    python bench/profiled.py OUT MODULE [ARGS...]

Used by bench/meter.py (BENCH_PROFILE=1) to profile the meter's process over the timed phase
only. cProfile sees the main thread only (the event loop), not worker threads (the meter's
DuckDB writer). The bench puts the repository on PYTHONPATH, so MODULE imports as with -m.
"""

from __future__ import annotations

import cProfile
import runpy
import signal
import sys


def main() -> None:
    out, module = sys.argv[1], sys.argv[2]
    profile = cProfile.Profile()
    # Python runs these on the main thread between bytecodes, so enable() profiles the loop.
    signal.signal(signal.SIGUSR1, lambda *_: profile.enable())
    signal.signal(signal.SIGUSR2, lambda *_: profile.disable())
    sys.argv = [module, *sys.argv[3:]]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        profile.disable()
        profile.dump_stats(out)


if __name__ == "__main__":
    main()
