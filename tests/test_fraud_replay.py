"""The fraud service rebuilds its windows from the stream on start: a restart in the middle
of an episode repeats no alert and loses none, whatever the `fraud` durable held unsettled
when the process died. The service runs in this process (callplane.service.open_service, as
`python -m services.fraud` does); a crash is simulated by pulling from its durable with
another connection and leaving the messages unacked, as a killed process leaves them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import nats
import nats.errors
import pytest
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from callplane import topology
from callplane.broker import publish_all
from callplane.service import open_service
from schemas import (
    CallOffered,
    FraudAlert,
    FraudAlertPolicy,
    NumberPolicySet,
    NumberRegistered,
    SecurityPolicy,
    decode,
    derived_id,
    timestamp,
)
from services.fraud.app import wire
from services.fraud.config import FraudSettings

NUMBER = "+48123456789"
CALLS = 3  # alert on more than 3 offers ...
WINDOW_MIN = 10  # ... within 10 minutes


@contextlib.asynccontextmanager
async def fraud_service(nats_url: str) -> AsyncIterator[None]:
    service = await open_service("fraud", FraudSettings(nats_url=nats_url), wire)
    await service.start()
    try:
        yield
    finally:
        await service.stop()


async def watch_number(js: JetStreamContext) -> None:
    now = timestamp(datetime.now(UTC))
    policy = SecurityPolicy(fraud_alert=FraudAlertPolicy(calls=CALLS, window_minutes=WINDOW_MIN, email="ops@example.com"))
    await publish_all(
        js,
        [
            NumberRegistered(event_id="ev_reg", occurred_at=now, number=NUMBER, number_id="pn_1", account_id="acct_1", provider="twilio"),
            NumberPolicySet(event_id="ev_pol", occurred_at=now, number=NUMBER, policy=policy, policy_version=1),
        ],
    )


def offers(first: int, count: int, at: datetime | None = None) -> list[CallOffered]:
    at = at or datetime.now(UTC)
    return [
        CallOffered(
            event_id=f"ev_offer_{i}",
            occurred_at=timestamp(at + timedelta(milliseconds=i)),
            call_id=f"call_{i}",
            to=NUMBER,
            from_="+15551234567",
        )
        for i in range(first, first + count)
    ]


async def alerts(js: JetStreamContext) -> list[FraudAlert]:
    """Every fraud.alert stored, in order (as many as the consumer counted pending at its start)."""
    config = ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL)
    sub = await js.pull_subscribe("fraud.alert.*", stream="ALERTS", config=config)
    try:
        remaining = (await sub.consumer_info()).num_pending
        found: list[FraudAlert] = []
        while len(found) < remaining:
            batch = await sub.fetch(remaining - len(found), timeout=10)
            found += [decode(m.data) for m in batch]
        return found
    finally:
        await sub.unsubscribe()


async def settled(js: JetStreamContext, timeout: float = 60.0) -> None:
    """Wait until the `fraud` durable has nothing pending and nothing unacked."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        info = await js.consumer_info("CALLS", "fraud")
        if info.num_pending == 0 and info.num_ack_pending == 0:
            return
        assert asyncio.get_running_loop().time() < deadline, f"not settled: {info}"
        await asyncio.sleep(0.05)


async def crash_after_delivery(nats_url: str, count: int) -> list:
    """Take `count` offers from the `fraud` durable and die without acking them."""
    nc = await nats.connect(nats_url)
    sub = await nc.jetstream().pull_subscribe_bind("fraud", "CALLS")
    taken = []
    while len(taken) < count:
        taken += await sub.fetch(count - len(taken), timeout=5)
    await nc.close()
    return taken


@pytest.fixture
async def js_short_dedup(js: JetStreamContext) -> JetStreamContext:
    """ALERTS with a 0.1 s duplicate window: a republished alert is stored again unless the
    service itself knows it was published (JetStream's dedup must not be what saves us)."""
    config = topology.stream_config("ALERTS")
    config.duplicate_window = 0.1
    await js.update_stream(config)
    return js


async def test_a_restart_in_the_middle_of_an_episode_repeats_no_alert_and_the_next_episode_alerts(
    nats_url: str, js_short_dedup: JetStreamContext
) -> None:
    js = js_short_dedup
    await watch_number(js)
    start = datetime.now(UTC)
    async with fraud_service(nats_url):
        await publish_all(js, offers(0, CALLS + 1, start))  # one more than allowed: the episode starts
        await settled(js)
        assert [a.count for a in await alerts(js)] == [CALLS + 1]
    await asyncio.sleep(0.2)  # past the duplicate window
    async with fraud_service(nats_url):  # restarted: the windows come back from the stream
        await publish_all(js, offers(10, 10 * (CALLS + 1), start + timedelta(seconds=1)))  # the same episode
        await settled(js)
        assert len(await alerts(js)) == 1
        # Event time moves past the window: the count falls to 1 <= 3, the episode ends;
        # the next burst is a new episode.
        later = start + timedelta(minutes=WINDOW_MIN, seconds=30)
        await publish_all(js, offers(100, CALLS + 1, later))
        await settled(js)
    found = await alerts(js)
    assert [a.event_id for a in found] == [derived_id("ev_offer_3", "call_spike"), derived_id("ev_offer_103", "call_spike")]


async def test_offers_delivered_but_unacked_at_a_crash_are_counted_once(nats_url: str, js: JetStreamContext) -> None:
    await watch_number(js)
    await publish_all(js, offers(0, CALLS))  # exactly the threshold: no alert
    await crash_after_delivery(nats_url, CALLS)
    async with fraud_service(nats_url):  # replays them, then gets them again from the durable
        await settled(js)  # the redeliveries came and were acked
        assert await alerts(js) == []  # counted twice, 6 > 3 would have alerted
        await publish_all(js, offers(CALLS, 1))
        await settled(js)
        [alert] = await alerts(js)
    assert alert.count == CALLS + 1 and alert.event_id == derived_id(f"ev_offer_{CALLS}", "call_spike")


async def test_an_alert_decided_but_never_stored_before_a_crash_is_published_after_the_restart(
    nats_url: str, js: JetStreamContext
) -> None:
    await watch_number(js)
    await publish_all(js, offers(0, CALLS + 1))
    await crash_after_delivery(nats_url, CALLS + 1)  # died before publishing the alert
    async with fraud_service(nats_url):
        await settled(js)
        [alert] = await alerts(js)
    assert alert.event_id == derived_id(f"ev_offer_{CALLS}", "call_spike") and alert.count == CALLS + 1


async def test_an_alert_stored_before_a_crash_whose_offer_was_not_acked_is_not_published_again(
    nats_url: str, js_short_dedup: JetStreamContext
) -> None:
    js = js_short_dedup
    await watch_number(js)
    burst = offers(0, CALLS + 1)
    await publish_all(js, burst)
    await crash_after_delivery(nats_url, CALLS + 1)
    # What the dead process had published: the alert, with the id the core derives.
    now = burst[-1].occurred_at
    stored = FraudAlert(
        event_id=derived_id(burst[-1].event_id, "call_spike"), occurred_at=now, number=NUMBER, account_id="acct_1",
        rule="call_spike", count=CALLS + 1, threshold=CALLS, window_s=WINDOW_MIN * 60, first_at=burst[0].occurred_at,
        last_at=now,
    )  # fmt: skip
    await publish_all(js, [stored])
    await asyncio.sleep(0.2)  # past the duplicate window: only the service can avoid a second copy
    async with fraud_service(nats_url):
        await settled(js)
        await publish_all(js, offers(10, 5))  # the episode goes on
        await settled(js)
        assert [a.event_id for a in await alerts(js)] == [stored.event_id]
