"""The broker factory and the one way services consume and publish events.

FastStream (`make_broker`) keeps the connection and the request/reply subscribers.
Durable consumers are read with nats-py directly: FastStream's per-message pipeline
cost ~10x the CPU of the work itself (bench/README.md). `consume()` registers a
`Consumer` on the broker; `start_consumers(broker)` starts them once the broker is
connected and `stop_consumers(broker)` drains them before `broker.stop()`
(`callplane.service` does both).

How a consumer reads: a continuous pull on the durable declared by `callplane nats
setup`. Pull requests ($JS.API.CONSUMER.MSG.NEXT) are answered on one inbox and ask
for no more than the window has room for, topped up when half of it is free; they
expire after PULL_EXPIRES_S and carry an idle heartbeat, so a request lost to a
reconnect or a consumer leader change is noticed (reconnect counter, missing
heartbeats, 408/409/503 statuses) and pulled again.

The window: at most `batch` messages in flight (delivered, not yet settled), and fewer
when handlers keep the event loop busy: the time each message's handling kept the loop
busy is measured (a moving average), and the window holds no more than ACK_WAIT_SHARE
of the durable's ack wait worth of it. A slow synchronous handler (a database write)
thus never leaves delivered messages queued behind it until JetStream redelivers them;
a handler that awaits I/O does not shrink the window.

Ordering and concurrency, which handlers may rely on:

    - Messages are decoded and their handlers STARTED in the order they are delivered,
      which is stream order for first deliveries (a redelivered message comes back
      whenever JetStream redelivers it). Each message gets a task, created in delivery
      order; asyncio runs each task until its first await in creation order, so what a
      handler does before its first await (e.g. the gatekeeper taking a slot) happens
      before the next message's handler starts.
    - After their first await, handlers of the messages in the window run concurrently
      (a message whose handler awaits does not hold up the next ones). An event of the
      same call may thus be handled while an earlier one's handler is still awaiting.
    - A handler returns the events it produced. They are published in order, pipelined
      (Nats-Msg-Id = event_id), and the input is acked only once JetStream acknowledged
      every one of them. Outputs to a stream with `allow_batched` (every stream of
      `callplane nats setup`) go out as an ADR-50 fast-ingest batch per stream and
      event-loop turn: JetStream stores each as it arrives and answers the batch once, when
      the turn's last output commits it (an error names the message it refused). Other
      streams answer each output with a PubAck on a reply subject of the consumer's own.
    - structlog's contextvars `event_id` and `call_id` are bound in the message's task
      (its own copy of the context): every line the handler logs carries them.

Acknowledgement policy, chosen on purpose (FastStream's NATS default TERMs a message
on any exception, i.e. drops it):

    decoded and handled         -> its output events published, then ack once every
                                   PubAck arrived
    undecodable, or breaks the contract (bad JSON, unknown type, wrong subject)
                                -> copied to dlq.<subject> with reason headers, then ack
    handler raised              -> nak with backoff, up to topology.MAX_DELIVER times;
                                   on the last delivery copied to the DLQ, then ack
    an output not stored (error, no stream, no PubAck within PUBACK_TIMEOUT_S)
                                -> never acked: nak with backoff and handled again (the
                                   outputs' ids are deterministic, so JetStream drops
                                   the copies already stored); on the last delivery
                                   copied to the DLQ, then ack
    the DLQ copy itself failed  -> nak with backoff (tried again)

So a poison message never loops and never stops the consumer, and nothing is lost.

A message in flight for longer than half the durable's ack wait gets a +WPI (work in
progress) so JetStream does not redeliver it while its handler is still busy.

Batches: `consume_batches` hands the messages delivered together to one call of the
handler (a list, in delivery order), for handlers whose cost is per call rather than per
event (the meter commits each batch in one transaction). The handler returns each
message's outputs, or the exception that fails that message alone; the ack policy above
applies per message. One batch is handled at a time, or up to `overlap` when the handler
awaits something slow (the meter: its commit in another process) and takes its batch in
hand, in order, before its first await; what arrives meanwhile is the next.

Deliveries are seen as the connection reads them (`natswire.divert`), before nats-py
builds a message and queues it for the subscription's task: while the window has room a
delivery goes to its handler at once; one read while the window is full (it shrank after
a pull request), and every one after it until it caught up, waits in the subscription's
callback.

A wide server filter (`ConsumerSpec.server_filter`, e.g. "call.>" for a consumer of most
call events): the durable has one filter subject, and the runtime acks whatever falls
outside the spec's `subjects` as it is read, before decoding it. Every output carries the
header Callplane-Origin = the durable that produced it; with `ConsumerSpec.skip_own` that
durable acks its own outputs unhandled (it applied them when it produced them).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import types
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from time import perf_counter

import msgspec
import nats.errors
import nats.js.errors
import structlog
from fast_depends.msgspec import MsgSpecSerializer
from faststream.nats import NatsBroker, NatsRouter
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import NotFoundError

from schemas import STREAMS, AnyEvent, DecodeError, Event, decode, dlq, encode, subject_for

from . import natswire, topology
from .config import NatsSettings

log = structlog.get_logger()

# A handler gets one decoded event and returns the events it produced; the runtime
# publishes them (in order, Nats-Msg-Id = event_id) and acks the input only after
# JetStream has acknowledged every one, so a crash in between redelivers the input.
Handler = Callable[[AnyEvent, Msg.Metadata], Awaitable[Sequence[Event]]]
# A batch handler gets the decoded events delivered together, in delivery order, and returns
# for each one (same order) the events it produced, or the exception that failed it alone
# (that message is retried by the ack policy; the others go on). Raising fails them all.
BatchHandler = Callable[[list[tuple[AnyEvent, Msg.Metadata]]], Awaitable[Sequence[Sequence[Event] | Exception]]]

# On every output the runtime publishes: the durable whose handler produced it
# (ConsumerSpec.skip_own lets that durable pass over its own outputs).
ORIGIN_HEADER = "Callplane-Origin"

# Headers on a dead-lettered message.
DLQ_REASON = "Callplane-Dlq-Reason"
DLQ_SUBJECT = "Callplane-Original-Subject"
DLQ_STREAM = "Callplane-Original-Stream"
DLQ_SEQUENCE = "Callplane-Original-Sequence"

# The most messages in flight per consumer (delivered, not yet settled) unless consume()
# says otherwise; the window is smaller when handlers are slow (see the module docstring).
DEFAULT_BATCH = 256
INITIAL_WINDOW = 16  # messages in flight until the handler's cost has been measured
ACK_WAIT_SHARE = 0.25  # a full window of handler time stays under this share of the ack wait
COST_SMOOTHING = 0.1  # weight of the newest message in the moving average of handler time
PULL_EXPIRES_S = 30.0  # a pull request's life; an expired one is replaced
PULL_HEARTBEAT_S = 5.0  # idle heartbeat of a pull request; two missed ones: pull again
PULL_RETRY_S = 1.0  # pause before pulling again when the durable refused a request
PUBACK_TIMEOUT_S = 5.0  # an output whose PubAck has not come by then counts as not stored
FAST_BATCH_FLOW = 500  # ADR-50 fast ingest: a flow ack every this many messages (the server's most)
STOP_TIMEOUT_S = 30.0  # how long stop_consumers waits for handlers in flight


class ContractError(ValueError):
    """A message decoded but does not belong where it was published."""


def make_broker(settings: NatsSettings, *, service: str) -> NatsBroker:
    """A FastStream NATS broker with msgspec bodies and structlog doing the logging."""
    return NatsBroker(
        settings.nats_url.split(","),
        name=f"callplane-{service}",
        serializer=MsgSpecSerializer(),
        user_credentials=settings.nats_creds,
        logger=None,  # the per-message INFO line costs ~45% of throughput; we log ourselves
    )


# -- registration and life cycle ------------------------------------------------------

_registered: weakref.WeakKeyDictionary[object, list[Consumer]] = weakref.WeakKeyDictionary()


def consume(
    router: NatsRouter | NatsBroker, spec: topology.ConsumerSpec, handle: Handler, *, batch: int = DEFAULT_BATCH
) -> Consumer:
    """Feed every event of a durable consumer (declared by `callplane nats setup`) to `handle`.

    Registers the consumer on `router` (a broker, or a router included in one); it runs
    between `start_consumers(broker)` and `stop_consumers(broker)`.
    """
    consumer = Consumer(spec, handle, batch=batch)
    _registered.setdefault(router, []).append(consumer)
    return consumer


def consume_batches(
    router: NatsRouter | NatsBroker,
    spec: topology.ConsumerSpec,
    handle: BatchHandler,
    *,
    batch: int = DEFAULT_BATCH,
    overlap: int = 1,
) -> Consumer:
    """Like `consume`, but `handle` gets every message delivered since it was last called, as
    one list: for handlers whose cost is mostly per call (a database commit), not per event.

    The same guarantees otherwise: delivery order within a batch, outputs published in order
    and each input acked once its outputs are stored, the same ack policy per message. One
    batch is handled at a time (up to `overlap`: the next batch starts while the last one's
    handler awaits; each is started in delivery order); what arrives meanwhile makes up the
    next. Nothing binds a message's ids to the log context: the handler names the call it
    logs about.
    """
    consumer = BatchConsumer(spec, handle, batch=batch, overlap=overlap)
    _registered.setdefault(router, []).append(consumer)
    return consumer


def consumers(broker: NatsRouter | NatsBroker) -> list[Consumer]:
    """The consumers registered on `broker` and on the routers included in it."""
    found = list(_registered.get(broker, ()))
    for router in getattr(broker, "routers", ()):
        found += consumers(router)
    return found


async def start_consumers(broker: NatsBroker) -> None:
    """Start every consumer registered on `broker` (connecting it if needed)."""
    connection = await broker.connect()
    for consumer in consumers(broker):
        await consumer.start(connection)


async def stop_consumers(broker: NatsBroker, timeout: float = STOP_TIMEOUT_S) -> None:
    """Stop pulling, wait for the handlers in flight to publish and ack, then return.

    Call it before `broker.stop()`, which closes the connection they publish on.
    """
    await asyncio.gather(*(consumer.stop(timeout) for consumer in consumers(broker)))


# -- the consumer ---------------------------------------------------------------------


class _Work:
    """One delivered message until it is settled (acked, nak'd or dead-lettered)."""

    __slots__ = ("msg", "received", "progressed", "published", "pending", "tokens", "settled")

    def __init__(self, msg: Msg, now: float) -> None:
        self.msg = msg
        self.received = self.progressed = now
        self.published = 0.0  # when its outputs were sent (0: not yet)
        self.pending = 0  # outputs whose PubAck has not arrived
        self.tokens: list[str] = []  # the reply subjects of its outputs' PubAcks
        self.settled = False  # its fate is decided: ack, nak or DLQ under way or done


class _LazyMetadata(Msg.Metadata):
    """A delivery's Msg.Metadata, parsed from its reply subject the first time a field is
    read: parsing costs ~2-3 us a message, and most handlers never look (the gatekeeper's)."""

    def __init__(self, msg: Msg) -> None:  # noqa: D107 - the fields come later, from the reply subject
        object.__setattr__(self, "_msg", msg)

    def __getattr__(self, name: str) -> object:  # only for what is not set yet: the fields, once
        if name.startswith("_"):
            raise AttributeError(name)
        parsed = self._msg.metadata
        for field in _METADATA_FIELDS:
            object.__setattr__(self, field, getattr(parsed, field))
        return getattr(parsed, name)


_METADATA_FIELDS = tuple(field.name for field in dataclasses.fields(Msg.Metadata))


class _PubAck(msgspec.Struct):
    """What a PubAck says, as far as the runtime cares (stored, or the error)."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: dict | None = None


_decode_puback = msgspec.json.Decoder(_PubAck).decode


class _BatchReply(msgspec.Struct):
    """What nats-server answers to an ADR-50 fast-ingest batch: a flow ack (`type` "ack"),
    a message it refused ("err", with `seq`), messages it never got ("gap"), or, with no
    type, the batch refused at its start (`error`) or the commit's PubAck (`batch`)."""

    type: str = ""
    seq: int = 0
    error: dict | None = None
    batch: str = ""


_decode_batch_reply = msgspec.json.Decoder(_BatchReply).decode


class _Batch:
    """A turn's outputs to one stream, published as one fast-ingest batch: each is stored as
    it arrives, and the last one, sent when the turn ends, commits the batch and is answered
    with one PubAck for all of them. (So every message of a batch is an event: a commit
    marker of its own would reach core subscribers of the subject as an empty message.)"""

    __slots__ = ("id", "prefix", "works", "held", "opened")

    def __init__(self, batch_id: str, prefix: str, now: float) -> None:
        self.id = batch_id
        self.prefix = f"{prefix}{batch_id}.{FAST_BATCH_FLOW}.ok."  # ADR-50: <inbox>.<flow>.<gap mode>.
        self.works: list[_Work] = []  # whose output has batch sequence i + 1
        self.held: tuple[str, bytes, bytes] | None = None  # the latest output, sent by the next or the commit
        self.opened = now  # committed when this turn ends

    def reply(self, sequence: int, operation: int) -> str:
        """The reply subject of the message with this batch sequence: operation 0 starts the
        batch, 1 appends, 2 commits (the batch id is the inbox's last token)."""
        return f"{self.prefix}{sequence}.{operation}.$FI"


class Consumer:
    """A continuous pull on one durable, feeding `handle` (see the module docstring)."""

    def __init__(self, spec: topology.ConsumerSpec, handle: Handler, *, batch: int = DEFAULT_BATCH) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self.spec = spec
        self.handle = handle
        self.batch = batch
        # A partitioned stream files events under extra leading tokens (topology.ConsumerSpec.strip_tokens).
        self._strip = getattr(spec, "strip_tokens", 0)
        self._wants = spec.wants() if hasattr(spec, "wants") else None  # None: every delivery is ours
        self._skip_own = getattr(spec, "skip_own", False)
        self._origin = natswire.header_line(ORIGIN_HEADER, spec.durable)  # on every output
        self._own_line = b"\r\n" + self._origin  # how an own output's header block shows it
        self._origin_name = ORIGIN_HEADER.encode()
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._sub = None  # deliveries (the pull requests' inbox)
        self._ack_sub = None  # PubAcks of the outputs
        self._inbox = ""
        self._ack_prefix = ""
        self._seq = 0
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{spec.stream}.{spec.durable}"
        self._runner: asyncio.Task | None = None
        self._inflight: set[_Work] = set()
        self._tasks: set[asyncio.Task] = set()
        self._acks: dict[str, _Work] = {}  # PubAck reply subject -> the input it settles
        self._batched: dict[str, str] = {}  # subject's first token -> its stream, if it takes fast batches
        self._open: dict[str, _Batch] = {}  # stream -> the batch this turn's outputs join
        self._batches: dict[str, _Batch] = {}  # batch id -> the batch, until its commit is answered
        self._requested = 0  # messages asked for and not yet delivered (nor expired)
        self._deferred = 0  # deliveries `_take` left to `_on_message` that it has not taken yet
        self._room = asyncio.Event()  # a message was settled: room for one more
        self._wake = asyncio.Event()  # the runner has something to do
        self._idle = asyncio.Event()  # stopping, and nothing is in flight any more
        self._stopping = False
        self._heard = 0.0  # last time the server said anything on the inbox
        self._pull_after = 0.0  # no pull request before this time (after a refusal)
        self._unavailable = False  # the durable refused a request (deleted, not found)
        self._reconnects = 0
        self._progress_after = 0.5  # +WPI after half the durable's ack wait (set at start)
        # The window: messages in flight at most, at most `batch`, sized so that a full window
        # of handler time (`_cost` each, measured) stays within `_budget` (a share of the ack wait).
        self._window = min(batch, INITIAL_WINDOW)
        self._cost = 0.0
        self._budget = 0.25
        self._time: Callable[[], float] = lambda: 0.0  # the event loop's clock, set at start

    @property
    def running(self) -> bool:
        return self._runner is not None and not self._runner.done()

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    async def start(self, nc: Client) -> None:
        if self._runner is not None:
            return
        loop = asyncio.get_running_loop()
        natswire.install()
        self._time = loop.time
        self._nc = nc
        self._js = nc.jetstream()
        try:
            info = await self._js.consumer_info(self.spec.stream, self.spec.durable)
        except NotFoundError:
            raise RuntimeError(
                f"consumer {self.spec.stream}/{self.spec.durable} does not exist: run `callplane nats setup` first"
            ) from None
        first_wait = (info.config.backoff or [info.config.ack_wait or 30.0])[0]
        self._progress_after = max(0.05, first_wait / 2)
        self._budget = first_wait * ACK_WAIT_SHARE
        self._stopping = False
        self._idle.clear()
        self._requested = 0
        self._deferred = 0
        self._heard = self._time()
        self._reconnects = nc.stats["reconnects"]
        self._batched = await _batched_streams(self._js)
        self._ack_prefix = nc.new_inbox() + "."
        self._ack_sub = await nc.subscribe(self._ack_prefix + ">", cb=self._on_puback)
        self._inbox = nc.new_inbox()
        self._sub = await nc.subscribe(self._inbox, cb=self._on_message)
        natswire.divert(nc, self._sub._id, self._take)
        self._runner = loop.create_task(self._run(), name=f"consume:{self.spec.durable}")
        log.info("consumer_started", stream=self.spec.stream, durable=self.spec.durable, batch=self.batch)

    async def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        if self._runner is None:
            return
        self._stopping = True
        self._room.set()  # a delivery waiting for room goes on (and is nak'd)
        deadline = self._time() + timeout
        usable = not (self._nc.is_closed or self._nc.is_draining)
        # No more deliveries: what is already queued in the inbox is nak'd (redelivered at once).
        if usable:
            try:
                await asyncio.wait_for(self._sub.drain(), timeout)
            except Exception as exc:  # noqa: BLE001 - shutting down: log and go on
                log.warning("consumer_drain_failed", durable=self.spec.durable, error=repr(exc))
        # Messages in flight finish: outputs published, PubAcks in, inputs acked (the runner
        # still times out late PubAcks), unless the connection is gone already.
        if self._inflight and usable:
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), max(0.0, deadline - self._time()))
        if self._inflight:
            log.warning(
                "consumer_stopped_with_work_in_flight",  # not acked: JetStream redelivers them
                durable=self.spec.durable,
                in_flight=len(self._inflight),
                reason="timeout" if usable else "connection closed",
            )
            self._abandon()
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=1.0)
            self._inflight.clear()
            self._acks.clear()
            self._batches.clear()
        self._runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._runner
        natswire.divert(self._nc, self._sub._id, None)
        if usable:
            with contextlib.suppress(Exception):
                await self._ack_sub.unsubscribe()
        self._runner = self._sub = self._ack_sub = None
        log.info("consumer_stopped", durable=self.spec.durable)

    def _abandon(self) -> None:
        """Stopping on a timeout: start no more handling (what is in flight is redelivered)."""

    # -- deliveries (the inbox subscription's callback: one message at a time, in order)

    def _take(self, subject: bytes, reply: bytes, headers: bytes | None) -> natswire.Verdict:
        """A delivery as the connection reads it (`natswire.divert`), in delivery order: one
        this consumer does not handle is acked at once; the others are taken at once while
        the window has room, else left to `_on_message`, which waits for room (and so does
        every one after them until it caught up: handlers start in delivery order)."""
        if (self._wants is not None and not self._wants(subject.decode(errors="replace"))) or (
            self._skip_own and self._is_own(headers)
        ):  # not ours (under a wide server filter), or our own output
            self._delivered()
            if self._wants_pull():
                self._wake.set()
            return natswire.ack_command(reply)
        if self._deferred or self._stopping or len(self._inflight) >= self._window:
            self._deferred += 1
            return None
        self._delivered()
        return self._accept

    def _is_own(self, headers: bytes | None) -> bool:
        """Whether a raw header block names this durable as the origin, as nats-py would
        parse it (the block is parsed only when it is not simply our own line)."""
        if headers is None or self._origin_name not in headers:
            return False
        if self._own_line in headers and headers.count(self._origin_name) == 1:
            return True
        return natswire.parse_header_lines(headers).get(ORIGIN_HEADER) == self.spec.durable

    def _accept(self, msg: Msg) -> None:
        work = _Work(msg, self._time())
        self._inflight.add(work)
        self._dispatch(work)

    def _delivered(self) -> None:
        self._heard = self._time()
        self._requested -= 1
        if self._unavailable:
            self._unavailable = False
            log.info("consumer_available", stream=self.spec.stream, durable=self.spec.durable)

    async def _on_message(self, msg: Msg) -> None:
        """The subscription's callback, for what `_take` left to nats-py: statuses about
        the pull requests, and deliveries waiting for room in the window."""
        if not msg.reply:
            self._heard = self._time()
            self._on_status(msg)
            return
        self._delivered()
        try:
            if (self._wants is not None and not self._wants(msg.subject)) or (
                self._skip_own and msg.headers and msg.headers.get(ORIGIN_HEADER) == self.spec.durable
            ):  # as in `_take`
                await natswire.ack(msg)
                if self._wants_pull():
                    self._wake.set()
                return
            while len(self._inflight) >= self._window and not self._stopping:  # over-delivered: wait for room
                self._room.clear()
                await self._room.wait()
            if self._stopping:
                await msg.nak()
                return
            self._accept(msg)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - never let one message stop the subscription
            log.error("consumer_delivery_failed", durable=self.spec.durable, exc_info=exc)
        finally:
            if self._deferred:
                self._deferred -= 1

    def _dispatch(self, work: _Work) -> None:
        # One task per message, created in delivery order: asyncio runs each until its
        # first await in creation order (the start-order guarantee of the module docstring).
        self._spawn(_timed(self._process(work), self._measured))

    def _spawn(self, coro: Awaitable) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_status(self, msg: Msg) -> None:
        headers = msg.headers or {}
        status = headers.get("Status")
        if status == "100":  # idle heartbeat: the requests are alive
            return
        pending = headers.get("Nats-Pending-Messages")
        if status in ("408", "409") and pending is not None:
            self._requested = max(0, self._requested - int(pending))  # the unfilled part of an ended request
        else:
            # No count (409 Consumer Deleted, 503 no such consumer, ...): every request is
            # void; pull again after a pause, so a missing durable is not hammered.
            self._requested = 0
            self._pull_after = self._time() + PULL_RETRY_S
            if not self._unavailable:
                self._unavailable = True
                log.warning(
                    "consumer_unavailable",
                    stream=self.spec.stream,
                    durable=self.spec.durable,
                    status=status,
                    reason=headers.get("Description", "").strip(),
                )
        self._wake.set()

    # -- one message --------------------------------------------------------------------

    async def _process(self, work: _Work) -> None:
        """Decode, check, hand to the handler, publish what it returned (its PubAcks settle
        the message in `_on_puback`), or settle it here by the ack policy."""
        msg = work.msg
        try:
            meta = _LazyMetadata(msg)
            event = await self._decode(work, meta)
            if event is None:
                return
            # This task's own context (a copy made when it was created): bound for this
            # message only, and for whatever the handler starts.
            structlog.contextvars.bind_contextvars(event_id=event.event_id, call_id=getattr(event, "call_id", None))
            try:
                produced = await self.handle(event, meta)
            except Exception as exc:  # noqa: BLE001 - the ack policy is the handler of last resort
                await self._retry_or_dead_letter(work, meta, "handler_failed", exc)
                return
            await self._settle(work, meta, produced)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. the connection closed under an ack: redelivered later
            self._settle_failed(work, exc)

    async def _decode(self, work: _Work, meta: Msg.Metadata) -> AnyEvent | None:
        """The message's event, or None once it has been dead-lettered (undecodable, or on
        the wrong subject)."""
        event = self._event_or_reason(work.msg)
        if isinstance(event, str):
            await self._dead_letter(work, meta, event)
            return None
        return event

    def _event_or_reason(self, msg: Msg) -> AnyEvent | str:
        """The message's event, or why it must be dead-lettered."""
        try:
            event = decode(msg.data)
            subject = msg.subject if not self._strip else msg.subject.split(".", self._strip)[-1]
            if (expected := subject_for(event)) != subject:
                raise ContractError(f"{event.__struct_config__.tag} belongs on {expected}, not {subject}")
        except (*DecodeError, ContractError) as exc:
            return f"undecodable: {exc}"
        return event

    async def _settle(self, work: _Work, meta: Msg.Metadata, produced: Sequence[Event]) -> None:
        """Handled: ack it now if it produced nothing, else publish its outputs (their
        PubAcks ack it, in `_on_puback`)."""
        if not produced:
            work.settled = True
            try:
                await natswire.ack(work.msg)
            finally:
                self._release(work)
            return
        try:
            await self._publish(work, produced)
        except Exception as exc:  # noqa: BLE001 - outputs not stored: never ack the input
            self._forget_pubacks(work)
            await self._retry_or_dead_letter(work, meta, "publish_failed", exc)

    def _settle_failed(self, work: _Work, exc: BaseException) -> None:
        log.warning("consumer_settle_failed", durable=self.spec.durable, subject=work.msg.subject, error=repr(exc))
        self._forget_pubacks(work)
        self._release(work)

    async def _publish(self, work: _Work, events: Sequence[Event]) -> None:
        """Send the outputs in order: into this turn's batch of their stream
        (`_on_batch_reply`), or each with its own PubAck (`_on_puback`); the input is acked
        when all of them came back stored."""
        events = list(events)
        work.pending = len(events)  # all of them, before a PubAck can arrive
        work.published = self._time()
        for event in events:
            subject = subject_for(event)
            header = natswire.header_block(natswire.header_line("Nats-Msg-Id", event.event_id), self._origin)
            stream = self._batched.get(subject.split(".", 1)[0])
            if stream is not None:
                await self._add_to_batch(stream, work, (subject, encode(event), header))
                continue
            self._seq += 1
            reply = f"{self._ack_prefix}{self._seq}"
            self._acks[reply] = work
            work.tokens.append(reply)
            await natswire.publish_with_header(self._nc, subject, encode(event), reply=reply, header=header)

    async def _add_to_batch(self, stream: str, work: _Work, output: tuple[str, bytes, bytes]) -> None:
        """Add an output to this turn's batch for `stream`; the one before it goes out now."""
        batch = self._open.get(stream)
        if batch is None:
            self._seq += 1
            batch = self._open[stream] = self._batches[str(self._seq)] = _Batch(str(self._seq), self._ack_prefix, self._time())
            if len(self._open) == 1:  # the first batch of this turn: commit them all when it ends
                asyncio.get_running_loop().call_soon(self._commit_batches)
        batch.works.append(work)
        before, batch.held = batch.held, output
        if before is not None:
            sequence = len(batch.works) - 1
            subject, payload, header = before
            reply = batch.reply(sequence, 0 if sequence == 1 else 1)
            await natswire.publish_with_header(self._nc, subject, payload, reply=reply, header=header)

    def _commit_batches(self) -> None:
        """The turn is over: each open batch's last output goes out and commits it. Outputs
        published from now on start new batches."""
        opened, self._open = self._open, {}
        self._spawn(self._send_commits(list(opened.values())))

    async def _send_commits(self, batches: list[_Batch]) -> None:
        for batch in batches:
            (subject, payload, header), batch.held = batch.held, None
            try:
                await natswire.publish_with_header(
                    self._nc, subject, payload, reply=batch.reply(len(batch.works), 2), header=header
                )
            except Exception as exc:  # noqa: BLE001 - e.g. the connection closed: never answered, retried
                self._batch_failed(batch, exc)

    async def _on_puback(self, msg: Msg) -> None:
        if msg.subject.endswith(".$FI"):
            await self._on_batch_reply(msg)
            return
        work = self._acks.pop(msg.subject, None)
        if work is None or work.settled:
            return  # late: the input was settled already (a failure or a timeout)
        error: Exception | None = None
        if msg.headers and msg.headers.get("Status") == "503":
            error = nats.js.errors.NoStreamResponseError()
        else:
            try:
                answer = _decode_puback(msg.data)
                if answer.error is not None:
                    error = _api_error(answer.error)
            except msgspec.DecodeError as exc:
                error = exc
        if error is not None:
            self._publish_failed(work, error)
            return
        await self._output_stored(work)

    async def _on_batch_reply(self, msg: Msg) -> None:
        """A fast-ingest batch's answer: a flow ack (nothing to do), one message refused (its
        input fails), or the commit's PubAck (every other output of the batch is stored).
        Anything else (the batch refused, a gap, no stream) fails the whole batch."""
        batch = self._batches.get(msg.subject[len(self._ack_prefix) :].split(".", 1)[0])
        if batch is None:
            return  # late: the batch failed or timed out already
        try:
            if msg.headers and msg.headers.get("Status") == "503":
                raise nats.js.errors.NoStreamResponseError()
            answer = _decode_batch_reply(msg.data)
            if answer.type == "ack":
                return
            if answer.type == "err" and 0 < answer.seq <= len(batch.works):
                work = batch.works[answer.seq - 1]
                if not work.settled:
                    self._publish_failed(work, _api_error(answer.error or {}))
                return
            if answer.error is not None:
                raise _api_error(answer.error)
            if answer.type or answer.batch != batch.id:
                raise nats.js.errors.Error(f"fast batch {batch.id}: unexpected answer {msg.data[:200]!r}")
        except Exception as exc:  # noqa: BLE001 - undecodable counts as not stored
            self._batch_failed(batch, exc)
            return
        del self._batches[batch.id]
        for work in batch.works:
            if not work.settled:
                await self._output_stored(work)

    def _batch_failed(self, batch: _Batch, error: BaseException) -> None:
        self._batches.pop(batch.id, None)
        for work in batch.works:
            if not work.settled:
                self._publish_failed(work, error)

    async def _output_stored(self, work: _Work) -> None:
        """One of the input's outputs is stored; once all are, ack the input."""
        work.pending -= 1
        if work.pending == 0:
            work.settled = True
            try:
                await natswire.ack(work.msg)
            except Exception as exc:  # noqa: BLE001 - not acked: JetStream redelivers it, the outputs dedupe
                log.warning("consumer_ack_failed", durable=self.spec.durable, error=repr(exc))
            finally:
                self._release(work)

    def _publish_failed(self, work: _Work, error: BaseException) -> None:
        """An output was not stored: settle the input by the policy, in a task of its own
        (a dead-letter waits for its own PubAck)."""
        work.settled = True  # once: a late PubAck or the next sweep leave it alone
        self._forget_pubacks(work)
        task = asyncio.get_running_loop().create_task(
            self._retry_or_dead_letter(work, work.msg.metadata, "publish_failed", error)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _measured(self, busy: float, messages: int = 1) -> None:
        """Handling `messages` kept the event loop busy `busy` seconds: adjust the window."""
        busy /= messages
        self._cost = busy if not self._cost else self._cost + COST_SMOOTHING * (busy - self._cost)
        self._window = max(1, min(self.batch, int(self._budget / max(self._cost, 1e-6))))

    def _forget_pubacks(self, work: _Work) -> None:
        for token in work.tokens:
            self._acks.pop(token, None)

    def _release(self, work: _Work) -> None:
        """The message left the process's hands: room for another."""
        self._inflight.discard(work)
        self._room.set()
        if self._stopping:
            if not self._inflight:
                self._idle.set()
        elif self._wants_pull():
            self._wake.set()

    async def _retry_or_dead_letter(self, work: _Work, meta: Msg.Metadata, what: str, exc: BaseException) -> None:
        work.settled = True
        msg = work.msg
        try:
            if meta.num_delivered >= topology.MAX_DELIVER:
                log.error(f"{what}_dead_lettered", subject=msg.subject, exc_info=exc)
                await self._dead_letter(work, meta, f"{what} after {meta.num_delivered} deliveries: {_describe(exc)}")
            else:
                delay = _backoff(meta.num_delivered)
                log.warning(f"{what}_will_retry", subject=msg.subject, delay_s=delay, exc_info=exc)
                await msg.nak(delay=delay)
        except Exception as error:  # noqa: BLE001 - e.g. the connection closed: JetStream redelivers it
            log.warning("consumer_settle_failed", durable=self.spec.durable, subject=msg.subject, error=repr(error))
        finally:
            self._release(work)

    async def _dead_letter(self, work: _Work, meta: Msg.Metadata, reason: str) -> None:
        work.settled = True
        msg = work.msg
        try:
            await dead_letter(msg, reason, js=self._js)
        except Exception as exc:  # noqa: BLE001 - the DLQ is unavailable: try again later
            log.error("dead_letter_failed", subject=msg.subject, origin=f"{meta.stream}:{meta.sequence.stream}", exc_info=exc)
            with contextlib.suppress(Exception):  # if even the nak fails, the ack wait redelivers it
                await msg.nak(delay=_backoff(meta.num_delivered))
        finally:
            self._release(work)

    # -- the runner: pull requests, their health, late PubAcks, work in progress -------

    def _wants_pull(self) -> bool:
        free = self._window - len(self._inflight) - self._requested
        return free > 0 and (self._requested <= 0 or free >= self._window // 2) and not self._stopping

    async def _run(self) -> None:
        tick = min(self._progress_after, PULL_HEARTBEAT_S) / 2
        while True:
            self._wake.clear()
            try:
                if self._nc.is_closed:
                    log.warning("consumer_connection_closed", durable=self.spec.durable)
                    return
                now = self._time()
                self._check_requests(now)
                if self._wants_pull() and self._nc.is_connected and now >= self._pull_after:
                    await self._pull()
                await self._sweep(now)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - e.g. a reconnect in progress: try again shortly
                log.warning("consumer_pull_failed", durable=self.spec.durable, error=repr(exc))
                self._wake.clear()
                await asyncio.sleep(min(1.0, tick * 2))
            try:
                await asyncio.wait_for(self._wake.wait(), tick)
            except (nats.errors.TimeoutError, TimeoutError):
                pass

    def _check_requests(self, now: float) -> None:
        reconnects = self._nc.stats["reconnects"]
        if reconnects != self._reconnects:
            self._reconnects = reconnects
            log.info("consumer_reconnected_pulling_again", durable=self.spec.durable)
            self._requested = 0
        elif self._requested > 0 and now - self._heard > 2 * PULL_HEARTBEAT_S + 1:
            log.warning("pull_requests_lost", durable=self.spec.durable, requested=self._requested)
            self._requested = 0
            self._heard = now

    async def _pull(self) -> None:
        want = self._window - len(self._inflight) - self._requested
        request = {
            "batch": want,
            "expires": int(PULL_EXPIRES_S * 1e9),
            "idle_heartbeat": int(PULL_HEARTBEAT_S * 1e9),
        }
        await self._nc.publish(self._next, json.dumps(request).encode(), reply=self._inbox)
        if self._requested <= 0:
            self._heard = self._time()  # the heartbeat clock starts with the first request
        self._requested += want

    async def _sweep(self, now: float) -> None:
        """Late PubAcks count as failed publishes; long-running messages get a +WPI."""
        for batch in [b for b in self._batches.values() if now - b.opened > PUBACK_TIMEOUT_S]:
            self._batch_failed(batch, nats.errors.TimeoutError(f"fast batch not answered within {PUBACK_TIMEOUT_S:g} s"))
        for work in list(self._inflight):
            if work.settled:
                continue
            if work.published and now - work.published > PUBACK_TIMEOUT_S:
                self._publish_failed(work, nats.errors.TimeoutError(f"no PubAck within {PUBACK_TIMEOUT_S:g} s"))
            elif now - work.progressed > self._progress_after:
                work.progressed = now
                with contextlib.suppress(Exception):
                    await work.msg.in_progress()


class BatchConsumer(Consumer):
    """A Consumer whose handler takes the messages delivered together as one list
    (`consume_batches`): messages arriving while a batch is handled make up the next one."""

    def __init__(
        self, spec: topology.ConsumerSpec, handle: BatchHandler, *, batch: int = DEFAULT_BATCH, overlap: int = 1
    ) -> None:
        super().__init__(spec, handle, batch=batch)  # type: ignore[arg-type]
        if overlap < 1:
            raise ValueError("overlap must be at least 1")
        self._gathered: list[_Work] = []
        self._overlap = overlap
        self._handling = 0  # batches being handled

    def _dispatch(self, work: _Work) -> None:
        self._gathered.append(work)
        if len(self._gathered) == 1 and self._handling < self._overlap:
            # After the deliveries already read from the socket have been gathered too.
            asyncio.get_running_loop().call_soon(self._next_batch)

    def _abandon(self) -> None:
        self._gathered.clear()  # else the cancelled batch's end would hand them to the handler

    def _next_batch(self) -> None:
        if self._handling >= self._overlap or not self._gathered:
            return
        works, self._gathered = self._gathered, []
        self._handling += 1
        self._spawn(_timed(self._process_batch(works), lambda busy: self._measured(busy, len(works))))

    async def _process_batch(self, works: list[_Work]) -> None:
        try:
            items: list[tuple[AnyEvent, Msg.Metadata]] = []
            handled: list[tuple[_Work, Msg.Metadata]] = []
            undecodable: list[tuple[_Work, Msg.Metadata, str]] = []
            for work in works:  # no await before the handler: batches start in delivery order
                meta = _LazyMetadata(work.msg)
                event = self._event_or_reason(work.msg)
                if isinstance(event, str):
                    undecodable.append((work, meta, event))
                else:
                    items.append((event, meta))
                    handled.append((work, meta))
            try:
                results = await self.handle(items) if items else []  # type: ignore[arg-type,call-arg]
                if len(results) != len(items):
                    raise ContractError(f"the batch handler answered {len(results)} results for {len(items)} events")
            except Exception as exc:  # noqa: BLE001 - the ack policy is the handler of last resort
                results = [exc] * len(items)
            for work, meta, reason in undecodable:
                await self._dead_letter(work, meta, reason)
            for (work, meta), result in zip(handled, results, strict=True):
                try:
                    if isinstance(result, Exception):
                        await self._retry_or_dead_letter(work, meta, "handler_failed", result)
                    else:
                        await self._settle(work, meta, result)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - e.g. the connection closed under an ack
                    self._settle_failed(work, exc)
        finally:
            self._handling -= 1
            if self._gathered:
                asyncio.get_running_loop().call_soon(self._next_batch)


@types.coroutine
def _timed(coro: Awaitable, report: Callable[[float], None]):  # noqa: ANN202 - a generator-based coroutine
    """Run `coro` as `yield from` would, and report how long its steps kept the event loop
    busy (the time it spent waiting for something else does not count)."""
    busy = 0.0
    send, throw = coro.send, coro.throw
    value: object = None
    error: BaseException | None = None
    try:
        while True:
            started = perf_counter()
            try:
                yielded = send(value) if error is None else throw(error)
            except StopIteration as stop:
                busy += perf_counter() - started
                return stop.value
            busy += perf_counter() - started
            try:
                value, error = (yield yielded), None
            except BaseException as exc:  # noqa: BLE001 - cancellation and the like: the coroutine's to handle
                value, error = None, exc
    finally:
        report(busy)


async def _batched_streams(js: JetStreamContext) -> dict[str, str]:
    """First subject token -> stream, for the streams that take fast-ingest batches (ADR-50,
    `allow_batched`: set by `callplane nats setup`; a stream set up before is answered one
    PubAck per message until setup runs again and the service restarts)."""
    batched = {}
    for name, pattern in STREAMS.items():
        with contextlib.suppress(NotFoundError):
            if (await js.stream_info(name)).config.allow_batched:
                batched[pattern.split(".", 1)[0]] = name
    return batched


def _api_error(error: dict) -> nats.js.errors.APIError:
    """The JetStream API error an answer carries (nats-py's `from_error` raises it)."""
    try:
        nats.js.errors.APIError.from_error(error)
    except nats.js.errors.APIError as exc:
        return exc
    return nats.js.errors.APIError(**error)  # pragma: no cover - from_error always raises


def _describe(exc: BaseException) -> str:
    """An error for a reason header: its type and what it says (repr hides an API error's)."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else repr(exc)


def _backoff(num_delivered: int) -> float:
    return topology.BACKOFF_S[min(max(num_delivered, 1), len(topology.BACKOFF_S)) - 1]


# -- publishing -------------------------------------------------------------------------


async def dead_letter(msg: Msg, reason: str, *, js: JetStreamContext | None = None) -> None:
    """Copy a message to dlq.<subject> with headers naming why and where from, then ack it."""
    meta = msg.metadata
    js = js or msg._client.jetstream()
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


async def publish_all(js: JetStreamContext, events: Iterable[Event], timeout: float = PUBACK_TIMEOUT_S) -> list[PubAck]:
    """Publish several events with pipelined acks (much faster than one at a time), in order.

    Raises if any of them is not stored (an error, or no PubAck within `timeout`)."""
    futures = []
    try:
        for e in events:
            futures.append(await js.publish_async(subject_for(e), encode(e), headers={"Nats-Msg-Id": e.event_id}))
        return list(await asyncio.wait_for(asyncio.gather(*futures), timeout))
    finally:
        for future in futures:
            if not future.done():
                future.cancel()
