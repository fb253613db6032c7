"""What-if runs of bench/admission.py: the same benchmark with one setting of the shipped
path changed by an in-process monkeypatch, to measure what that setting is worth.

Nothing in services/ or callplane/ changes: the patches live in this process only.

    .venv/bin/python bench/whatif.py PATCH[,PATCH...] [admission.py options]
    .venv/bin/python bench/whatif.py gc-threshold=10000 --consumers runtime,gatekeeper

Patches:
  none             nothing (the shipped path; for a like-for-like comparison)
  default-gc       callplane.service.open_service leaves the GC alone (no gc.freeze(), the
                   default thresholds 700, 10, 10): the service before tune_gc
  no-freeze        open_service sets the thresholds but does not gc.freeze() the start-up heap
  gc-threshold=N[:M:K]  open_service sets these thresholds instead of GC_THRESHOLDS (M, K
                   as there when not given)
  no-gc            gc.disable() for the whole run (an upper bound for the GC settings)
  batch=N          callplane.broker.consume's default in-flight window (DEFAULT_BATCH)
  no-pickup        the gatekeeper publishes call.accepted without the auto_answer call.answered
                   (which its own durable also delivers back to it): measurement only, calls
                   would ring until missed
  no-hold-batching the gatekeeper asks the meter for each hold on its own (HOLD_BATCHING=false)

(The FastStream-era patches of the first version of this script, no-thread-hop,
raw-decoder and no-puback-wait, measured costs of a path that is gone: see the history
in bench/README.md.)
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PATCHES = ("none", "default-gc", "no-freeze", "gc-threshold", "no-gc", "batch", "no-pickup", "no-hold-batching")


def default_gc() -> None:
    import callplane.service

    callplane.service.tune_gc = lambda: None  # open_service looks it up in the module


def no_freeze() -> None:
    import callplane.service

    callplane.service.tune_gc = lambda: gc.set_threshold(*callplane.service.GC_THRESHOLDS)


def gc_threshold(value: str) -> None:
    import callplane.service

    given = [int(v) for v in value.split(":")]
    callplane.service.GC_THRESHOLDS = (*given, *callplane.service.GC_THRESHOLDS[len(given):])


def batch(value: str) -> None:
    import callplane.broker

    callplane.broker.DEFAULT_BATCH = int(value)
    callplane.broker.consume.__kwdefaults__["batch"] = int(value)


def no_pickup() -> None:
    from services.gatekeeper.app import Gatekeeper

    Gatekeeper._outputs = lambda self, final: [final]


def no_hold_batching() -> None:
    import services.gatekeeper.config as config

    original = config.GatekeeperSettings

    class Unbatched(original, frozen=True, kw_only=True):
        hold_batching: bool = False

    config.GatekeeperSettings = Unbatched


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        print(__doc__)
        sys.exit(2)
    chosen = sys.argv.pop(1).split(",")
    for patch in chosen:
        name, _, value = patch.partition("=")
        if name not in PATCHES or (name in ("gc-threshold", "batch")) != bool(value):
            sys.exit(f"unknown patch {patch!r}: one of {', '.join(PATCHES)} (gc-threshold=N[:M:K], batch=N)")
        if name == "default-gc":
            default_gc()
        elif name == "no-freeze":
            no_freeze()
        elif name == "gc-threshold":
            gc_threshold(value)
        elif name == "no-gc":
            gc.disable()
        elif name == "batch":
            batch(value)
        elif name == "no-pickup":
            no_pickup()
        elif name == "no-hold-batching":
            no_hold_batching()
    from bench import admission

    admission.ShippedGatekeeper.label = f"gatekeeper + {'+'.join(chosen)}"
    admission.RuntimeBaseline.label = f"runtime + {'+'.join(chosen)}"
    print(f"what-if: {','.join(chosen)} (monkeypatched in this process only)", file=sys.stderr)
    admission.main()


if __name__ == "__main__":
    main()
