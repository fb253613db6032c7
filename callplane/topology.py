"""NATS topology as code: every stream and durable consumer, and the one idempotent
step that creates or updates them (`callplane nats setup`).

Services never declare streams or consumers at start-up (a FastStream subscriber
would overwrite a stream's config, and would never update an existing consumer);
they bind to what this module declared and refuse to start if it is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BucketNotFoundError, NotFoundError

from schemas import STREAMS

# How long JetStream remembers a Nats-Msg-Id to drop a re-published duplicate.
# Consumers still dedupe by event id themselves: this window only narrows the gap.
DUPLICATE_WINDOW_S = 120.0

# Redelivery of a message whose handler failed: bounded, with backoff. After the
# last attempt the consumer helper moves the message to the DLQ.
MAX_DELIVER = 5
BACKOFF_S = (1.0, 5.0, 15.0, 30.0)
MAX_ACK_PENDING = 10_000


@dataclass(frozen=True)
class ConsumerSpec:
    """A durable pull consumer: which stream, which subjects, owned by which service."""

    durable: str
    stream: str
    subjects: tuple[str, ...]
    service: str
    description: str = ""

    def config(self) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=self.durable,
            name=self.durable,
            description=self.description or None,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=BACKOFF_S[0],  # the server uses backoff[0] for the first redelivery
            max_deliver=MAX_DELIVER,
            backoff=list(BACKOFF_S),
            max_ack_pending=MAX_ACK_PENDING,
            filter_subjects=list(self.subjects),
        )


CONSUMERS: tuple[ConsumerSpec, ...] = (
    ConsumerSpec(
        "gatekeeper",
        "CALLS",
        ("call.offered.*", "call.answered.*", "call.missed.*", "call.ended.*"),
        "gatekeeper",
        "admission decisions and the slots they hold",
    ),
    ConsumerSpec(
        "meter-calls",
        "CALLS",
        ("call.accepted.*", "call.rejected.*", "call.missed.*", "call.agent_replied.*", "call.ended.*"),
        "meter",
        "rates calls into the ledger",
    ),
    ConsumerSpec("meter-accounts", "ACCOUNTS", ("account.>",), "meter", "account settings and credits"),
    ConsumerSpec("fraud", "CALLS", ("call.offered.*",), "fraud", "traffic windows per number"),
    ConsumerSpec(
        "dialer",
        "CALLS",
        ("call.accepted.*", "call.rejected.*", "call.answered.*", "call.ended.*"),
        "dialer",
        "outcome of outbound calls",
    ),
)


# Key-value buckets (JetStream KV). SECRETS holds sealed secrets (ciphertext and a
# masked hint) under their secret_ref: events carry the reference only.
KV_BUCKETS: tuple[str, ...] = ("SECRETS",)


def consumer(durable: str) -> ConsumerSpec:
    return next(c for c in CONSUMERS if c.durable == durable)


def stream_config(name: str, *, replicas: int = 1) -> StreamConfig:
    """Streams keep every event: no limits, and a full stream refuses new events
    (discard new) rather than silently dropping old ones."""
    return StreamConfig(
        name=name,
        subjects=[STREAMS[name]],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.NEW,
        num_replicas=replicas,
        duplicate_window=DUPLICATE_WINDOW_S,
        allow_direct=True,
    )


@dataclass
class SetupReport:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.created or self.updated)

    def lines(self) -> list[str]:
        return (
            [f"created   {name}" for name in self.created]
            + [f"updated   {name}" for name in self.updated]
            + [f"unchanged {name}" for name in self.unchanged]
        )


def _differs(wanted: Any, current: Any) -> bool:
    """True if any field that `wanted` sets has another value in `current`."""
    have = current.as_dict()
    return any(have.get(key) != value for key, value in wanted.as_dict().items())


async def setup(js: JetStreamContext, *, replicas: int = 1) -> SetupReport:
    """Create or update every stream and consumer. A second run changes nothing."""
    report = SetupReport()
    for name in STREAMS:
        wanted = stream_config(name, replicas=replicas)
        try:
            current = (await js.stream_info(name)).config
        except NotFoundError:
            await js.add_stream(wanted)
            report.created.append(f"stream {name}")
            continue
        if _differs(wanted, current):
            await js.update_stream(wanted)
            report.updated.append(f"stream {name}")
        else:
            report.unchanged.append(f"stream {name}")
    for bucket in KV_BUCKETS:
        try:
            await js.key_value(bucket)
            report.unchanged.append(f"kv {bucket}")
        except BucketNotFoundError:
            await js.create_key_value(KeyValueConfig(bucket=bucket, history=1, storage=StorageType.FILE, replicas=replicas))
            report.created.append(f"kv {bucket}")
    for spec in CONSUMERS:
        label = f"consumer {spec.stream}/{spec.durable}"
        wanted = spec.config()
        try:
            current = (await js.consumer_info(spec.stream, spec.durable)).config
        except NotFoundError:
            await js.add_consumer(spec.stream, wanted)
            report.created.append(label)
            continue
        if _differs(wanted, current):
            await js.add_consumer(spec.stream, wanted)  # updates the editable fields
            report.updated.append(label)
        else:
            report.unchanged.append(label)
    return report


async def check(js: JetStreamContext, specs: tuple[ConsumerSpec, ...]) -> None:
    """Fail fast, with the fix in the message, when setup has not been run."""
    for spec in specs:
        try:
            await js.consumer_info(spec.stream, spec.durable)
        except NotFoundError:
            raise RuntimeError(
                f"consumer {spec.stream}/{spec.durable} does not exist: run `callplane nats setup` first"
            ) from None
