"""What-if runs of bench/admission.py: the same benchmark with one cost of the shipped
gatekeeper path removed by an in-process monkeypatch, to measure what that cost is.

Nothing in services/ or callplane/ changes: the patches live in this process only, and
exist to put a number on each finding in bench/README.md.

    .venv/bin/python bench/whatif.py PATCH[,PATCH...] [admission.py options]
    .venv/bin/python bench/whatif.py gc-freeze --consumers gatekeeper

Patches:
  none           nothing (the shipped path; for a like-for-like comparison)
  no-thread-hop  fast_depends runs sync dependencies inline instead of in a worker thread
                 (FastStream resolves the handler's `message: NatsMessage` argument with a
                 sync `Context.use`, which fast_depends sends to anyio's thread pool)
  raw-decoder    callplane.broker.consume variant whose decoder returns the nats Msg and whose
                 handler takes only that (no context-injected `message` argument at all)
  gc-freeze      gc.collect(); gc.freeze() once the gatekeeper is wired, so the full
                 collections no longer walk the ~55,000 objects of the imported frameworks
  no-gc          gc.disable() for the whole run (an upper bound for gc-freeze)
  no-puback-wait the gatekeeper publishes its decision with publish_async and does not wait
                 for the PubAck before acking the offer: NOT at-least-once safe, measurement
                 only (what awaiting one PubAck per decision costs)
Use --log-level warning (an admission.py option, the service's LOG_LEVEL) for the cost of
the per-decision INFO line.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PATCHES = ("none", "no-thread-hop", "raw-decoder", "gc-freeze", "no-gc", "no-puback-wait")


def no_thread_hop() -> None:
    import fast_depends.utils

    async def inline(func, *args, **kwargs):  # noqa: ANN001, ANN202
        return func(*args, **kwargs)

    fast_depends.utils.run_in_threadpool = inline  # run_async looks it up in this module


def raw_decoder() -> None:
    from faststream import AckPolicy
    from faststream.nats import JStream, NatsMessage, PullSub

    import services.gatekeeper.app as gatekeeper_app
    from callplane.broker import deliver

    async def raw_msg(message: NatsMessage) -> Any:
        return message.raw_message

    def consume(router, spec, handle, *, batch: int = 64) -> None:  # noqa: ANN001
        @router.subscriber(
            spec.subjects[0],
            stream=JStream(spec.stream, declare=False),
            durable=spec.durable,
            pull_sub=PullSub(batch_size=batch, timeout=1.0),
            ack_policy=AckPolicy.MANUAL,
            decoder=raw_msg,
            title=f"{spec.service}:{spec.durable}",
        )
        async def on_message(msg: Any) -> None:
            await deliver(msg, handle)

    gatekeeper_app.consume = consume  # wire() calls the name it imported


def no_puback_wait() -> None:
    import services.gatekeeper.app as gatekeeper_app
    from schemas import encode, subject_for

    async def publish(js, event):  # noqa: ANN001, ANN202
        return await js.publish_async(subject_for(event), encode(event), headers={"Nats-Msg-Id": event.event_id})

    gatekeeper_app.publish = publish


def gc_freeze() -> None:
    from bench import admission

    prepare = admission.ShippedGatekeeper.prepare

    async def prepare_then_freeze(self) -> None:  # noqa: ANN001
        await prepare(self)
        gc.collect()
        gc.freeze()

    admission.ShippedGatekeeper.prepare = prepare_then_freeze


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        print(__doc__)
        sys.exit(2)
    chosen = sys.argv.pop(1).split(",")
    for patch in chosen:
        if patch not in PATCHES:
            sys.exit(f"unknown patch {patch!r}: one of {', '.join(PATCHES)}")
    if "no-thread-hop" in chosen:
        no_thread_hop()
    if "raw-decoder" in chosen:
        raw_decoder()
    if "no-puback-wait" in chosen:
        no_puback_wait()
    if "gc-freeze" in chosen:
        gc_freeze()
    if "no-gc" in chosen:
        gc.disable()
    from bench import admission

    admission.ShippedGatekeeper.label = f"gatekeeper + {'+'.join(chosen)}"
    print(f"what-if: {','.join(chosen)} (monkeypatched in this process only)", file=sys.stderr)
    admission.main()


if __name__ == "__main__":
    main()
