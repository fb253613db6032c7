"""Dialer adapter: place-call commands in, outbound call.offered out; tracks outcomes."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import structlog
from faststream.nats import NatsBroker
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from callplane import topology
from callplane.broker import consume, publish
from callplane.commands import serve_commands
from schemas import AnyEvent, Reply
from schemas.commands import PlaceCall

from .core import Status, next_status, place_call

log = structlog.get_logger()


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class Dialer:
    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self.outbound: dict[str, Status] = {}  # call_id -> status, for calls this dialer placed

    async def place(self, command: PlaceCall) -> Reply:
        offer = place_call(command, now=datetime.now(UTC), new_id=new_id)
        await publish(self.js, offer)
        self.outbound[offer.call_id] = "dispatched"
        log.info("call_dispatched", call_id=offer.call_id, to=offer.to)
        return Reply(ok=True, event_ids=[offer.event_id])

    async def on_call_event(self, event: AnyEvent, _meta: Msg.Metadata) -> list:
        call_id = getattr(event, "call_id", None)
        if call_id in self.outbound and (status := next_status(event)):
            self.outbound[call_id] = status
            log.info("outbound_call_status", status=status)
        return []


async def wire(broker: NatsBroker, js: JetStreamContext, _settings: object):
    dialer = Dialer(js)
    consume(broker, topology.consumer("dialer"), dialer.on_call_event)

    serve_commands(broker, "dialer", dialer.place, accepts=(PlaceCall,))
    return None
