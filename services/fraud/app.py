"""Fraud adapter: call.offered and number.* in, fraud.alert out; alerts delivered by
e-mail and webhook from the ALERTS stream, one durable per channel.

Detection and delivery are decoupled on purpose. The `fraud` durable (CALLS,
call.offered.*) feeds the pure core and publishes what it returns as fraud.alert
(Nats-Msg-Id = the alert's deterministic event id); it never waits for a mailbox.
`fraud-email` and `fraud-webhook` (ALERTS, fraud.alert.*) each send one channel:
a transient failure raises, so the runtime naks it with backoff (other alerts keep
flowing meanwhile); a permanent one is logged and counted, and the alert acked.

Restarts (replay). Windows live in memory, so on start they are rebuilt before the
durable is consumed: the offers stored from (the last one the `fraud` durable delivered,
minus the core's horizon) up to that last one go through the core again, their alerts
dropped, because they were published already. Two cases need care:

  - Offers delivered but not acked when the process died come back from the durable.
    They were counted by the replay, so every delivery at or below the replayed
    position (and, later on, below the highest position seen: a nak'd offer) is not
    counted again; it returns the alerts it produced the first time, if any (same ids:
    JetStream drops a copy already stored).
  - An offer above the durable's ack floor may have produced an alert that never got
    stored (killed between deciding and publishing). Alerts the replay produces above
    the ack floor are looked up in ALERTS; a missing one is kept and published when its
    offer is redelivered, so no episode is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime

import structlog
from faststream.nats import NatsBroker
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from callplane import topology
from callplane.broker import consume
from callplane.projection import Projection
from callplane.webhooks import make_client
from schemas import (
    AnyEvent,
    CallOffered,
    DecodeError,
    Event,
    FraudAlert,
    decode,
)

from . import core
from .config import FraudSettings
from .delivery import AlertDelivery, DeliveryMetrics, DeliveryResult, RetryPolicy, SmtpSettings

log = structlog.get_logger()

REMEMBERED_ALERTS = 10_000  # offers whose alerts are kept for their redelivery (alerts are rare)
REPLAY_TIMEOUT_S = 600.0  # a replay that has not reached its end by then fails the start


class Fraud:
    def __init__(
        self,
        js: JetStreamContext,
        settings: FraudSettings | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        retry: RetryPolicy = RetryPolicy(),
    ) -> None:
        """`retry`: how often and how long one delivery is retried in process before the
        alert is nak'd (and redelivered by JetStream later)."""
        self.js = js
        self.settings = settings or FraudSettings()
        self.clock = clock
        self.state = core.State()
        self.detectors = self.settings.detectors()
        self.numbers = Projection(js, "NUMBERS", lambda event: core.evolve(self.state, event))
        self.replayed_to = 0  # stream sequence up to which the replay counted the offers
        self.high_water = 0  # highest CALLS sequence counted: a delivery at or below it is a repeat
        # CALLS sequence -> the alerts its offer produced (or, after a replay, the ones never stored):
        # a redelivered offer returns them again instead of being counted twice.
        self.produced: OrderedDict[int, list[FraudAlert]] = OrderedDict()
        self.alerts_raised = 0
        self.http = make_client() if self.settings.fraud_webhook_secret else None  # one shared client
        self.delivery = AlertDelivery(
            smtp=smtp_settings(self.settings),
            client=self.http,
            webhook_secret=self.settings.fraud_webhook_secret,
            webhook_timeout_s=self.settings.fraud_webhook_timeout_ms / 1000,
            allow_private=self.settings.fraud_webhook_allow_private,
            policy=retry,
            metrics=DeliveryMetrics(),
            clock=clock,
        )

    # -- start-up ------------------------------------------------------------------------

    async def start(self) -> None:
        await self.numbers.follow()
        await self.replay()

    async def stop(self) -> None:
        await self.numbers.stop()
        if self.http is not None:
            await self.http.aclose()

    async def replay(self) -> None:
        """Rebuild the windows from CALLS up to what the `fraud` durable delivered (see the
        module docstring); alerts already published are dropped, lost ones kept."""
        spec = topology.consumer("fraud")
        info = await self.js.consumer_info(spec.stream, spec.durable)
        delivered, floor = info.delivered.stream_seq, info.ack_floor.stream_seq
        if delivered == 0:
            log.info("fraud_replay_skipped", reason="nothing delivered yet")
            return
        # The windows reach back `horizon` from the last offer processed (stored time).
        anchor = self.clock()
        with contextlib.suppress(NotFoundError):
            last = await self.js.get_msg(spec.stream, seq=delivered)
            if last.time is not None:
                anchor = min(anchor, _aware(last.time))
        since = anchor - core.horizon(self.detectors, self.state)
        if floor < delivered:  # the unsettled offers are replayed whatever their age
            with contextlib.suppress(NotFoundError):
                first_unsettled = await self.js.get_msg(spec.stream, seq=floor + 1)
                if first_unsettled.time is not None:
                    since = min(since, _aware(first_unsettled.time))
        unsettled: dict[int, list[FraudAlert]] = {}
        counted = 0

        def count(seq: int, event: AnyEvent) -> None:
            nonlocal counted
            if isinstance(event, CallOffered):
                counted += 1
                alerts = core.observe(self.state, event, self.detectors)
                if alerts and seq > floor:
                    unsettled[seq] = alerts

        await scan(self.js, spec.stream, spec.subjects[0], since=since, until=delivered, apply=count)
        self.replayed_to = self.high_water = delivered
        lost = 0
        if unsettled:
            stored = await published_alert_ids(self.js, since=since)
            for seq, alerts in unsettled.items():
                missing = [alert for alert in alerts if alert.event_id not in stored]
                if missing:
                    self._remember(seq, missing)
                    lost += len(missing)
        log.info(
            "fraud_replayed",
            offers=counted,
            since=since.isoformat(),
            up_to=delivered,
            ack_floor=floor,
            unpublished_alerts=lost,
        )

    # -- detection -----------------------------------------------------------------------

    async def on_offered(self, event: AnyEvent, meta: Msg.Metadata) -> list[Event]:
        if not isinstance(event, CallOffered):
            return []
        seq = meta.sequence.stream
        if seq <= self.high_water:  # counted already (the replay, or a nak'd delivery)
            return list(self.produced.get(seq, ()))
        self.high_water = seq
        alerts = core.observe(self.state, event, self.detectors)
        if not alerts:
            return []
        self._remember(seq, alerts)
        self.alerts_raised += len(alerts)
        for alert in alerts:
            log.warning(
                "fraud_alert",
                number=alert.number,
                rule=alert.rule,
                count=alert.count,
                threshold=alert.threshold,
                window_s=alert.window_s,
                alert_id=alert.event_id,
            )
        return list(alerts)

    def _remember(self, seq: int, alerts: list[FraudAlert]) -> None:
        self.produced[seq] = alerts
        while len(self.produced) > REMEMBERED_ALERTS:
            self.produced.popitem(last=False)

    # -- delivery (fraud-email, fraud-webhook) ---------------------------------------------

    def recipients(self, alert: FraudAlert) -> tuple[str | None, str | None]:
        """(e-mail, webhook URL): the number's fraud_alert policy, else the service defaults."""
        info = self.state.numbers.get(alert.number)
        policy = info.policy if info is not None else None
        email = (policy.email if policy else None) or self.settings.fraud_alert_email
        webhook = (policy.webhook_url if policy else None) or self.settings.fraud_alert_webhook_url
        return email, webhook

    async def on_alert_email(self, event: AnyEvent, _meta: Msg.Metadata) -> list[Event]:
        email, _ = self.recipients(event) if isinstance(event, FraudAlert) else (None, None)
        if email and self.delivery.email_on:
            settle(await self.delivery.email(event, email), self.delivery.metrics)
        return []

    async def on_alert_webhook(self, event: AnyEvent, _meta: Msg.Metadata) -> list[Event]:
        _, url = self.recipients(event) if isinstance(event, FraudAlert) else (None, None)
        if url and self.delivery.webhooks_on:
            settle(await self.delivery.webhook(event, url), self.delivery.metrics)
        return []

    def register(self, broker: NatsBroker) -> None:
        """Detection and one consumer per delivery channel, each its own durable."""
        consume(broker, topology.consumer("fraud"), self.on_offered)
        consume(broker, topology.consumer("fraud-email"), self.on_alert_email)
        consume(broker, topology.consumer("fraud-webhook"), self.on_alert_webhook)


def smtp_settings(settings: FraudSettings) -> SmtpSettings | None:
    if not settings.smtp_host:
        return None
    return SmtpSettings(
        host=settings.smtp_host,
        port=settings.smtp_port,
        starttls=settings.smtp_starttls,
        tls=settings.smtp_tls,
        username=settings.smtp_username,
        password=settings.smtp_password,
        sender=settings.smtp_from,
        timeout_s=settings.smtp_timeout_s,
        ca_file=settings.smtp_ca_file,
    )


def settle(result: DeliveryResult, metrics: DeliveryMetrics) -> None:
    """Delivered, or failed for good (logged and counted by the delivery helper): ack.
    Still failing after the retry policy's attempts, but transient: raise, so the consumer
    runtime naks it with backoff (and dead-letters it after topology.MAX_DELIVER deliveries)."""
    if result.delivered:
        return
    totals = {f"{channel}_{outcome}": n for channel, row in metrics.snapshot().items() for outcome, n in row.items()}
    log.warning("alert_delivery_counters", **totals)
    if result.error is not None and result.error.transient:
        raise result.error


# -- reading a stream range ------------------------------------------------------------------


async def scan(
    js: JetStreamContext,
    stream: str,
    subject: str,
    *,
    since: datetime,
    until: int,
    apply: Callable[[int, AnyEvent], None],
    timeout: float = REPLAY_TIMEOUT_S,
) -> None:
    """Feed `apply(sequence, event)` every event on `subject` stored from `since` on, up to
    and including stream sequence `until`, in stream order (an ordered consumer)."""
    if until == 0:
        return
    with contextlib.suppress(NotFoundError):
        last = await js.get_msg(stream, seq=until)
        if last.time is not None and _aware(last.time) < since:
            return  # nothing stored in the range
    done = asyncio.Event()

    async def on_message(msg: Msg) -> None:
        meta = msg.metadata
        seq = meta.sequence.stream
        if done.is_set():
            return
        if seq <= until:
            try:
                apply(seq, decode(msg.data))
            except DecodeError as exc:  # the durable dead-letters such a message; a replay skips it
                log.warning("replay_skipped_undecodable", stream=stream, sequence=seq, error=str(exc))
        if seq >= until or meta.num_pending == 0:
            done.set()

    sub = await js.subscribe(
        subject,
        stream=stream,
        ordered_consumer=True,
        cb=on_message,
        deliver_policy=DeliverPolicy.BY_START_TIME,
        config=ConsumerConfig(opt_start_time=since.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")),
    )
    try:
        await asyncio.wait_for(done.wait(), timeout)
    except TimeoutError:
        raise RuntimeError(f"replay of {stream} {subject} did not reach sequence {until} within {timeout:.0f} s") from None
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def published_alert_ids(js: JetStreamContext, *, since: datetime) -> set[str]:
    """The event ids of the fraud.alert events ALERTS stored from `since` on."""
    last = (await js.stream_info("ALERTS")).state.last_seq
    ids: set[str] = set()

    def collect(_seq: int, event: AnyEvent) -> None:
        ids.add(event.event_id)

    await scan(js, "ALERTS", "fraud.alert.*", since=since, until=last, apply=collect)
    return ids


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo else when.replace(tzinfo=UTC)


async def wire(broker: NatsBroker, js: JetStreamContext, settings: FraudSettings):
    fraud = Fraud(js, settings)
    await fraud.start()
    fraud.register(broker)
    return fraud.stop
