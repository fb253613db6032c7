"""NATS topology as code: every stream and durable consumer, and the one idempotent
step that creates or updates them (`callplane nats setup`).

Services never declare streams or consumers at start-up (a FastStream subscriber
would overwrite a stream's config, and would never update an existing consumer);
they bind to what this module declared and refuse to start if it is missing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
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
    StreamSource,
    SubjectTransform,
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
    # Leading subject tokens a partitioned stream adds ("gatekeeper.<p>."): stripped to
    # recover the event's own subject.
    strip_tokens: int = 0
    # Created to deliver only what is published from then on, not the stream's history
    # (a new notification consumer must not e-mail every alert ever raised).
    deliver_new: bool = False
    # One wide filter for the durable instead of `subjects` (e.g. "call.>"): the runtime acks
    # what falls outside `subjects` without handling it. nats-server slows down ~8x on a
    # durable with several filter subjects once the stream holds many distinct subjects (one
    # per phone number), measured in bench/README.md (the meter); one filter does not.
    server_filter: str = ""
    # Ack unhandled the events this durable's own handler produced (the runtime marks every
    # output with ORIGIN_HEADER = the durable): for a service that applied its outputs to
    # its state already when it produced them (the gatekeeper's auto-answer pick-ups).
    skip_own: bool = False

    def event_subject(self, subject: str) -> str:
        return subject.split(".", self.strip_tokens)[-1] if self.strip_tokens else subject

    def config(self) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=self.durable,
            name=self.durable,
            description=self.description or None,
            deliver_policy=DeliverPolicy.NEW if self.deliver_new else DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=BACKOFF_S[0],  # the server uses backoff[0] for the first redelivery
            max_deliver=MAX_DELIVER,
            backoff=list(BACKOFF_S),
            max_ack_pending=MAX_ACK_PENDING,
            filter_subjects=[self.server_filter] if self.server_filter else list(self.subjects),
        )

    def wants(self) -> Callable[[str], bool] | None:
        """With a wide server filter: which delivered subjects are this consumer's (None: all)."""
        if not self.server_filter:
            return None
        exact_types = {p[:-2] for p in self.subjects if p.endswith(".*") and "*" not in p[:-2] and ">" not in p}
        if len(exact_types) == len(self.subjects):  # "call.ended.*" ...: one set lookup
            return lambda subject: subject.rsplit(".", 1)[0] in exact_types
        return lambda subject: any(_subject_matches(p, subject) for p in self.subjects)


def _subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` is one token, a final `>` one or more."""
    wanted, given = pattern.split("."), subject.split(".")
    for i, token in enumerate(wanted):
        if token == ">":
            return len(given) > i
        if i >= len(given) or (token != "*" and token != given[i]):
            return False
    return len(given) == len(wanted)


CONSUMERS: tuple[ConsumerSpec, ...] = (
    ConsumerSpec(
        "gatekeeper",
        "CALLS",
        ("call.offered.*", "call.answered.*", "call.missed.*", "call.ended.*"),
        "gatekeeper",
        "admission decisions and the slots they hold",
        server_filter="call.>",
        skip_own=True,
    ),
    ConsumerSpec(
        "meter-calls",
        "CALLS",
        ("call.accepted.*", "call.rejected.*", "call.missed.*", "call.answered.*", "call.agent_replied.*", "call.ended.*"),
        "meter",
        "rates calls into the ledger",
        server_filter="call.>",
    ),
    ConsumerSpec("meter-accounts", "ACCOUNTS", ("account.>",), "meter", "account settings and credits"),
    ConsumerSpec("fraud", "CALLS", ("call.offered.*",), "fraud", "traffic windows per number"),
    # Alert delivery, one durable per channel: a failing mailbox never holds up webhooks
    # (nor detection, which only publishes fraud.alert).
    ConsumerSpec("fraud-email", "ALERTS", ("fraud.alert.*",), "fraud", "fraud alerts by e-mail", deliver_new=True),
    ConsumerSpec("fraud-webhook", "ALERTS", ("fraud.alert.*",), "fraud", "fraud alerts by webhook", deliver_new=True),
    ConsumerSpec(
        "dialer",
        "CALLS",
        ("call.accepted.*", "call.rejected.*", "call.answered.*", "call.ended.*"),
        "dialer",
        "outcome of outbound calls",
        server_filter="call.>",
    ),
)


# Key-value buckets (JetStream KV). SECRETS holds sealed secrets (ciphertext and a
# masked hint) under their secret_ref: events carry the reference only.
KV_BUCKETS: tuple[str, ...] = ("SECRETS",)


# Gatekeeper scale-out: with N > 1 partitions, a work-queue stream sources the calls the
# gatekeeper needs from CALLS and files each under `gatekeeper.<p>.` where p is a hash of
# the number token (NATS's partition() mapping). Instance i consumes partition i only, so
# every number's offers and ends reach exactly one instance, in order: counting stays exact.
GATEKEEPER_STREAM = "GATEKEEPER"
GATEKEEPER_CALL_TYPES = ("offered", "answered", "missed", "ended")


def gatekeeper_partition(index: int) -> ConsumerSpec:
    return ConsumerSpec(
        f"gatekeeper-{index}",
        GATEKEEPER_STREAM,
        (f"gatekeeper.{index}.>",),
        "gatekeeper",
        f"admission for partition {index} of the numbers",
        strip_tokens=2,
        skip_own=True,
    )


def gatekeeper_stream_config(partitions: int, *, replicas: int = 1, start: datetime | None = None) -> StreamConfig:
    transforms = [
        SubjectTransform(
            src=f"call.{kind}.*",
            dest=f"gatekeeper.{{{{partition({partitions},1)}}}}.call.{kind}.{{{{wildcard(1)}}}}",
        )
        for kind in GATEKEEPER_CALL_TYPES
    ]
    return StreamConfig(
        name=GATEKEEPER_STREAM,
        sources=[StreamSource(name="CALLS", opt_start_time=start, subject_transforms=transforms)],
        retention=RetentionPolicy.WORK_QUEUE,  # a work list: CALLS stays the record
        storage=StorageType.FILE,
        discard=DiscardPolicy.NEW,
        num_replicas=replicas,
    )


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
        allow_batched=True,  # ADR-50 fast ingest: the consumer runtime's outputs (callplane.broker)
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


async def setup(js: JetStreamContext, *, replicas: int = 1, gatekeeper_partitions: int = 1) -> SetupReport:
    """Create or update every stream and consumer. A second run changes nothing."""
    if gatekeeper_partitions < 1:
        raise ValueError("gatekeeper partitions: 1 or more")
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
    partitioned = gatekeeper_partitions > 1
    specs = [spec for spec in CONSUMERS if not (partitioned and spec.durable == "gatekeeper")]
    if partitioned:
        await _ensure_gatekeeper_stream(js, gatekeeper_partitions, replicas, report)
        specs += [gatekeeper_partition(i) for i in range(gatekeeper_partitions)]
    await _remove_stale_gatekeeper_consumers(js, gatekeeper_partitions, report)
    for spec in specs:
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


async def _ensure_gatekeeper_stream(js: JetStreamContext, partitions: int, replicas: int, report: SetupReport) -> None:
    try:
        current = (await js.stream_info(GATEKEEPER_STREAM)).config
    except NotFoundError:
        # Source only what arrives from now on: older offers were decided already.
        await js.add_stream(gatekeeper_stream_config(partitions, replicas=replicas, start=datetime.now(UTC)))
        report.created.append(f"stream {GATEKEEPER_STREAM} ({partitions} partitions)")
        return
    start = current.sources[0].opt_start_time if current.sources else None
    wanted = gatekeeper_stream_config(partitions, replicas=replicas, start=start)
    if _differs(wanted, current):
        await js.update_stream(wanted)
        report.updated.append(f"stream {GATEKEEPER_STREAM} ({partitions} partitions)")
    else:
        report.unchanged.append(f"stream {GATEKEEPER_STREAM}")


async def _remove_stale_gatekeeper_consumers(js: JetStreamContext, partitions: int, report: SetupReport) -> None:
    """One way of consuming at a time: the single durable, or one per partition."""
    if partitions > 1:
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer("CALLS", "gatekeeper")
            report.updated.append("consumer CALLS/gatekeeper removed (partitioned now)")
        for info in await _consumers(js, GATEKEEPER_STREAM):
            index = info.name.removeprefix("gatekeeper-")
            if index.isdigit() and int(index) >= partitions:
                await js.delete_consumer(GATEKEEPER_STREAM, info.name)
                report.updated.append(f"consumer {GATEKEEPER_STREAM}/{info.name} removed")
    else:
        with contextlib.suppress(NotFoundError):
            await js.delete_stream(GATEKEEPER_STREAM)
            report.updated.append(f"stream {GATEKEEPER_STREAM} removed (one gatekeeper partition)")


async def _consumers(js: JetStreamContext, stream: str) -> list:
    try:
        return await js.consumers_info(stream)
    except NotFoundError:
        return []


async def check(js: JetStreamContext, specs: tuple[ConsumerSpec, ...]) -> None:
    """Fail fast, with the fix in the message, when setup has not been run."""
    for spec in specs:
        try:
            await js.consumer_info(spec.stream, spec.durable)
        except NotFoundError:
            raise RuntimeError(
                f"consumer {spec.stream}/{spec.durable} does not exist: run `callplane nats setup` first"
            ) from None
