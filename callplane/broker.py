"""The broker factory and the one way services consume and publish events.

Acknowledgement policy, chosen on purpose (FastStream's NATS default TERMs a message
on any exception, i.e. drops it):

    decoded and handled         -> its output events published, then ack
    undecodable, or breaks the contract (bad JSON, unknown type, wrong subject)
                                -> copied to dlq.<subject> with reason headers, then ack
    handler raised              -> nak with backoff, up to topology.MAX_DELIVER times;
                                   on the last delivery copied to the DLQ, then ack

So a poison message never loops and never stops the consumer, and nothing is lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence

import nats.errors
import structlog
from fast_depends.msgspec import MsgSpecSerializer
from faststream import AckPolicy
from faststream.nats import JStream, NatsBroker, NatsMessage, NatsRouter, PullSub
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import PubAck

from schemas import AnyEvent, DecodeError, Event, decode, dlq, encode, subject_for

from . import topology
from .config import NatsSettings

log = structlog.get_logger()

# A handler gets one decoded event and returns the events it produced; the runtime
# publishes them (in order, Nats-Msg-Id = event_id) and acks the input only after
# JetStream has acknowledged every one, so a crash in between redelivers the input.
Handler = Callable[[AnyEvent, Msg.Metadata], Awaitable[Sequence[Event]]]

# Headers on a dead-lettered message.
DLQ_REASON = "Callplane-Dlq-Reason"
DLQ_SUBJECT = "Callplane-Original-Subject"
DLQ_STREAM = "Callplane-Original-Stream"
DLQ_SEQUENCE = "Callplane-Original-Sequence"


class ContractError(ValueError):
    """A message decoded but does not belong where it was published."""


def make_broker(settings: NatsSettings, *, service: str) -> NatsBroker:
    """A FastStream NATS broker with msgspec bodies and structlog doing the logging."""
    guard_fetch_timeouts()
    return NatsBroker(
        settings.nats_url.split(","),
        name=f"callplane-{service}",
        serializer=MsgSpecSerializer(),
        user_credentials=settings.nats_creds,
        logger=None,  # the per-message INFO line costs ~45% of throughput; we log ourselves
    )


def consume(router: NatsRouter | NatsBroker, spec: topology.ConsumerSpec, handle: Handler, *, batch: int = 64) -> None:
    """Feed every event of a durable consumer (declared by `callplane nats setup`) to `handle`."""

    @router.subscriber(
        spec.subjects[0],  # informational: binding an existing durable keeps its own filters
        stream=JStream(spec.stream, declare=False),
        durable=spec.durable,
        pull_sub=PullSub(batch_size=batch, timeout=1.0),
        ack_policy=AckPolicy.MANUAL,
        decoder=_raw_body,
        title=f"{spec.service}:{spec.durable}",
    )
    async def on_message(body: bytes, message: NatsMessage) -> None:
        await deliver(message.raw_message, handle)


async def _raw_body(message: NatsMessage) -> bytes:
    return message.body


async def deliver(msg: Msg, handle: Handler) -> None:
    """Decode, check, hand to `handle`, and settle the message by the policy above."""
    meta = msg.metadata
    try:
        event = decode(msg.data)
        if (expected := subject_for(event)) != msg.subject:
            raise ContractError(f"{event.__struct_config__.tag} belongs on {expected}, not {msg.subject}")
    except (*DecodeError, ContractError) as exc:
        await dead_letter(msg, f"undecodable: {exc}")
        return
    call_id = getattr(event, "call_id", None)
    with structlog.contextvars.bound_contextvars(event_id=event.event_id, call_id=call_id):
        try:
            produced = await handle(event, meta)
            if produced:
                await publish_all(msg._client.jetstream(), produced)
        except Exception as exc:  # noqa: BLE001 - the ack policy above is the handler of last resort
            if meta.num_delivered >= topology.MAX_DELIVER:
                log.error("handler_failed_dead_lettered", subject=msg.subject, exc_info=exc)
                await dead_letter(msg, f"handler_failed after {meta.num_delivered} deliveries: {exc!r}")
            else:
                delay = topology.BACKOFF_S[min(meta.num_delivered, len(topology.BACKOFF_S)) - 1]
                log.warning("handler_failed_will_retry", subject=msg.subject, delay_s=delay, exc_info=exc)
                await msg.nak(delay=delay)
            return
    await msg.ack()


async def dead_letter(msg: Msg, reason: str) -> None:
    """Copy a message to dlq.<subject> with headers naming why and where from, then ack it."""
    meta = msg.metadata
    js = msg._client.jetstream()
    origin = f"{meta.stream}:{meta.sequence.stream}"
    await js.publish(
        dlq(msg.subject),
        msg.data,
        headers={
            DLQ_REASON: reason[:1000].replace("\r", " ").replace("\n", " "),
            DLQ_SUBJECT: msg.subject,
            DLQ_STREAM: meta.stream,
            DLQ_SEQUENCE: str(meta.sequence.stream),
            "Nats-Msg-Id": f"dlq/{origin}",
        },
    )
    log.warning("dead_lettered", subject=msg.subject, origin=origin, reason=reason[:200])
    await msg.ack()


async def publish(js: JetStreamContext, event: Event) -> PubAck:
    """Publish one event on its subject with Nats-Msg-Id = event_id; waits for the PubAck."""
    return await js.publish(subject_for(event), encode(event), headers={"Nats-Msg-Id": event.event_id})


async def publish_all(js: JetStreamContext, events: Iterable[Event]) -> list[PubAck]:
    """Publish several events with pipelined acks (much faster than one at a time), in order."""
    futures = [
        await js.publish_async(subject_for(e), encode(e), headers={"Nats-Msg-Id": e.event_id}) for e in events
    ]
    return list(await asyncio.gather(*futures))


_guarded = False


def guard_fetch_timeouts() -> None:
    """Make nats-py's pull fetch raise only nats.errors.TimeoutError on a timeout.

    nats-py sometimes raises the builtin TimeoutError (from asyncio) when little of
    the fetch timeout remains. FastStream 0.7.8's pull loop suppresses only the
    nats.errors subclass, so the builtin one crashes its consume task, which
    restarts and drops the batch in flight until ack_wait redelivers it.
    """
    global _guarded
    if _guarded:
        return
    original = JetStreamContext.PullSubscription.fetch

    async def fetch(self: JetStreamContext.PullSubscription, *args: object, **kwargs: object) -> list[Msg]:
        try:
            return await original(self, *args, **kwargs)
        except nats.errors.TimeoutError:
            raise
        except TimeoutError as exc:
            raise nats.errors.TimeoutError from exc

    JetStreamContext.PullSubscription.fetch = fetch  # type: ignore[method-assign]
    _guarded = True
