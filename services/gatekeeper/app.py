"""Gatekeeper adapter: NATS in, pure core, NATS out."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import structlog
from faststream.nats import NatsBroker
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from callplane import topology
from callplane.broker import consume
from callplane.projection import Projection
from schemas import AnyEvent, CallAccepted, CallOffered, Event

from .core import State, decide, evolve

log = structlog.get_logger()


class Gatekeeper:
    def __init__(self, js: JetStreamContext, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.js = js
        self.clock = clock
        self.state = State()
        self.numbers = Projection(js, "NUMBERS", lambda e: evolve(self.state, e))

    async def on_call_event(self, event: AnyEvent, _meta: Msg.Metadata) -> list[Event]:
        if not isinstance(event, CallOffered):
            evolve(self.state, event)  # answered / missed / ended free or keep slots
            return []
        outcome = decide(self.state, event, now=self.clock())
        evolve(self.state, outcome)  # take the slot before any await: exact under concurrency
        if isinstance(outcome, CallAccepted):
            log.info("call_accepted", number=outcome.number, agent_id=outcome.agent_id)
        else:
            log.info("call_rejected", number=outcome.number, reason=outcome.reason, sip_status=outcome.sip_status)
        return [outcome]


async def wire(broker: NatsBroker, js: JetStreamContext, _settings: object):
    gatekeeper = Gatekeeper(js)
    await gatekeeper.numbers.follow()
    consume(broker, topology.consumer("gatekeeper"), gatekeeper.on_call_event)
    return gatekeeper.numbers.stop
