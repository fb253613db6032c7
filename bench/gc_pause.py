"""How long one full garbage collection takes in a gatekeeper process, by heap size.

    .venv/bin/python bench/gc_pause.py [--decisions 20000,100000]

Imports what `python -m services.gatekeeper` imports, then folds offers through the pure
core as the gatekeeper does (`decide`, `complete` with a granted hold, `answered` at once
as for auto_answer calls, each folded in with `evolve`; no NATS, no call ends) so the
state holds as many remembered final decisions and slots in use as asked, and times
`gc.collect()` (best of 3) at each size, then after `gc.freeze()`. No NATS server is
needed; nothing in services/ or callplane/ changes.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def full_collection_ms() -> float:
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        gc.collect()
        best = min(best, (time.perf_counter() - started) * 1000)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decisions", default="20000,100000", help="state sizes to measure, comma-separated")
    sizes = sorted(int(n) for n in parser.parse_args().decisions.split(","))

    import callplane.service  # noqa: F401 - the service runtime: faststream, nats-py, structlog
    import services.gatekeeper.__main__  # noqa: F401
    from schemas import CallOffered, NumberAssigned, NumberRegistered, timestamp
    from services.gatekeeper import core

    print(f"after the gatekeeper's imports: {len(gc.get_objects()):,} tracked objects, "
          f"full collection {full_collection_ms():.1f} ms")
    state = core.State()
    now = datetime.now(UTC)
    ts = timestamp(now)
    number = "+48123456789"
    core.evolve(state, NumberRegistered(event_id="r", occurred_at=ts, number=number, number_id="pn_1",
                                        account_id="acct", provider="sip_trunk"))
    core.evolve(state, NumberAssigned(event_id="a", occurred_at=ts, number=number, agent_id="agent"))
    remembered = getattr(state, "decided", None)
    cap = getattr(core, "REMEMBERED_DECISIONS", None)
    print(f"the core remembers decisions: {remembered is not None} (cap {cap})")
    decided = 0
    for size in sizes:
        while decided < size:
            offer = CallOffered(event_id=f"e{decided}", occurred_at=ts, call_id=f"c{decided}", to=number,
                                from_="+15551234567")
            provisional = core.decide(state, offer, now=now)
            core.evolve(state, provisional)
            hold = core.Held(f"hold_c{decided}", None)
            final = core.complete(provisional, hold=hold, now=now)
            core.evolve(state, final)
            if final.auto_answer:  # as the gatekeeper does: answered at once, no longer ringing
                core.evolve(state, core.answered(final, now=now))
            decided += 1
        held = len(remembered) if remembered is not None else 0
        print(f"after {decided:,} decisions ({held:,} remembered): {len(gc.get_objects()):,} tracked objects, "
              f"full collection {full_collection_ms():.1f} ms")
    gc.freeze()
    print(f"after gc.freeze(): full collection {full_collection_ms():.1f} ms "
          "(objects created later are collected again)")


if __name__ == "__main__":
    main()
