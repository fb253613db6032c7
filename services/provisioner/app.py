"""Provisioner adapter: commands over NATS request/reply in, events on JetStream out."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import msgspec
import structlog
from faststream.nats import NatsBroker, NatsMessage
from nats.js import JetStreamContext

from callplane.broker import publish_all
from callplane.projection import Projection
from schemas import Reply, decode_command, encode_message, rpc

from .config import ProvisionerSettings
from .core import Refusal, Registry, decide, evolve

log = structlog.get_logger()


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class Provisioner:
    def __init__(self, js: JetStreamContext, settings: ProvisionerSettings) -> None:
        self.js = js
        self.settings = settings
        self.registry = Registry()
        self.projections = [Projection(js, s, lambda e: evolve(self.registry, e)) for s in ("NUMBERS", "ACCOUNTS")]

    async def handle(self, data: bytes) -> Reply:
        try:
            command = decode_command(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return Reply(ok=False, code="invalid", message=str(exc), field=_field_of(exc))
        outcome = decide(
            self.registry, command, now=datetime.now(UTC), new_id=new_id, sip_domain=self.settings.sip_domain
        )
        if isinstance(outcome, Refusal):
            log.info("command_refused", command=type(command).__name__, code=outcome.code)
            return Reply(ok=False, code=outcome.code, message=outcome.message, field=outcome.field)
        await publish_all(self.js, outcome)
        for event in outcome:
            evolve(self.registry, event)
        log.info("command_applied", command=type(command).__name__, events=[e.event_id for e in outcome])
        return Reply(ok=True, event_ids=[e.event_id for e in outcome])


def _field_of(exc: Exception) -> str | None:
    """msgspec says 'Expected ..., got ... - at `$.number`': name the field."""
    text = str(exc)
    return text.rsplit("$.", 1)[1].rstrip("`").split(".")[0].split("[")[0] if "$." in text else None


async def wire(broker: NatsBroker, js: JetStreamContext, settings: ProvisionerSettings):
    provisioner = Provisioner(js, settings)
    for projection in provisioner.projections:
        await projection.follow()

    @broker.subscriber(rpc("provisioner", "*"), decoder=_raw)
    async def on_command(body: bytes, message: NatsMessage) -> bytes:
        return encode_message(await provisioner.handle(body))

    async def stop() -> None:
        for projection in provisioner.projections:
            await projection.stop()

    return stop


async def _raw(message: NatsMessage) -> bytes:
    return message.body
