"""Fraud adapter: call.offered and number.* in, fraud.alert out."""

from __future__ import annotations

import structlog
from faststream.nats import NatsBroker
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from callplane import topology
from callplane.broker import consume
from callplane.projection import Projection
from schemas import AnyEvent, CallOffered, Event

from .core import State, evolve, observe

log = structlog.get_logger()


class Fraud:
    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self.state = State()
        self.numbers = Projection(js, "NUMBERS", lambda e: evolve(self.state, e))

    async def on_offered(self, event: AnyEvent, _meta: Msg.Metadata) -> list[Event]:
        if not isinstance(event, CallOffered):
            return []
        alert = observe(self.state, event)
        if alert is None:
            return []
        log.warning("fraud_alert", number=alert.number, rule=alert.rule, count=alert.count, threshold=alert.threshold)
        return [alert]


async def wire(broker: NatsBroker, js: JetStreamContext, _settings: object):
    fraud = Fraud(js)
    await fraud.numbers.follow()
    consume(broker, topology.consumer("fraud"), fraud.on_offered)
    return fraud.numbers.stop
