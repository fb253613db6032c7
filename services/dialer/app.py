"""Dialer adapter: place-call commands in, outbound call.offered out; tracks outcomes."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import msgspec
import structlog
from faststream.nats import NatsBroker
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from callplane import topology
from callplane.broker import consume, publish
from schemas import AnyEvent, Reply, decode_command, encode_message, rpc
from schemas.commands import PlaceCall

from .core import Status, next_status, place_call

log = structlog.get_logger()


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class Dialer:
    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self.outbound: dict[str, Status] = {}  # call_id -> status, for calls this dialer placed

    async def on_command(self, data: bytes) -> Reply:
        try:
            command = decode_command(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return Reply(ok=False, code="invalid", message=str(exc))
        if not isinstance(command, PlaceCall):
            return Reply(ok=False, code="invalid", message=f"the dialer does not handle {type(command).__name__}")
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

    @broker.subscriber(rpc("dialer", "*"), decoder=_raw)
    async def on_command(body: bytes) -> bytes:
        return encode_message(await dialer.on_command(body))

    return None


async def _raw(message) -> bytes:  # noqa: ANN001
    return message.body
