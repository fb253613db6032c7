"""Fraud end to end: the provisioner and the fraud service as their own processes on a real
nats-server, alert e-mail to a real local SMTP server (aiosmtpd). One episode, one alert,
one e-mail, however much traffic and across a crash of the fraud service; a new episode
alerts again. Offer times are set by the test (windows are on event time)."""

from __future__ import annotations

import asyncio
import email
import itertools
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.message import Message
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from callplane.broker import publish_all
from callplane.client import send
from callplane.embedded import Stack
from schemas import CallOffered, FraudAlert, FraudAlertPolicy, SecurityPolicy, decode, derived_id, timestamp
from schemas.commands import RegisterNumber, SetPolicy
from tests.nats_server import free_port

NUMBER = "+48123456789"
CALLS, WINDOW_MIN = 3, 10  # alert on more than 3 offers within 10 minutes
OPS = "ops@example.com"
CANARY = "+48999000111"


class Mailbox:
    """An aiosmtpd handler keeping every message it accepted."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, _server, _session, envelope) -> str:  # noqa: ANN001, N802 - aiosmtpd's hook
        with self.lock:
            self.messages.append(email.message_from_bytes(envelope.original_content))
        return "250 OK"

    def received(self) -> list[Message]:
        with self.lock:
            return list(self.messages)


@pytest.fixture
def mailbox() -> Iterator[tuple[Mailbox, int]]:
    box, port = Mailbox(), free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    yield box, port
    controller.stop()


@pytest.fixture
def stack(nats_url: str, js: JetStreamContext, tmp_path: Path, mailbox: tuple[Mailbox, int]) -> Iterator[Stack]:
    env = {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(mailbox[1]), "SMTP_STARTTLS": "false"}
    with Stack(home=tmp_path / "stack", nats_url=nats_url, services=("provisioner", "fraud"), env=env) as running:
        yield running


def offers(first: int, count: int, at: datetime) -> list[CallOffered]:
    return [
        CallOffered(
            event_id=f"ev_offer_{i}",
            occurred_at=timestamp(at + timedelta(milliseconds=10 * (i - first))),
            call_id=f"call_{i}",
            to=NUMBER,
            from_="+15551234567",
            source_ip="203.0.113.7",
        )
        for i in range(first, first + count)
    ]


async def settled(js: JetStreamContext, timeout: float = 60.0) -> None:
    """Detection and e-mail delivery have nothing pending and nothing unacked."""
    deadline = asyncio.get_running_loop().time() + timeout
    for stream, durable in (("CALLS", "fraud"), ("ALERTS", "fraud-email")):
        while True:
            info = await js.consumer_info(stream, durable)
            if info.num_pending == 0 and info.num_ack_pending == 0:
                break
            assert asyncio.get_running_loop().time() < deadline, f"{durable} not settled: {info}"
            await asyncio.sleep(0.05)


async def wait_for(condition, what: str, timeout: float = 60.0) -> None:  # noqa: ANN001
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"no {what} in time"
        await asyncio.sleep(0.05)


async def policies_applied(nc: Client, js: JetStreamContext, published: list[FraudAlert], timeout: float = 30.0) -> None:
    """Wait until the fraud service (another process) has applied every policy set so far:
    a canary number set up after them, alerting on its second offer (no e-mail: no recipient),
    is offered calls until its alert comes (NUMBERS is applied in order)."""
    policy = SecurityPolicy(fraud_alert=FraudAlertPolicy(calls=1, window_minutes=WINDOW_MIN))
    for command in (RegisterNumber(number=CANARY, account_id="acct_canary"), SetPolicy(number=CANARY, policy=policy)):
        assert (await send(nc, "provisioner", command)).ok
    deadline = asyncio.get_running_loop().time() + timeout
    for i in itertools.count():
        at = timestamp(datetime.now(UTC))
        await publish_all(js, [CallOffered(event_id=f"ev_canary_{i}", occurred_at=at, call_id=f"canary_{i}", to=CANARY, from_="+15551234567")])
        for _ in range(4):
            if any(a.number == CANARY for a in published):
                return
            await asyncio.sleep(0.05)
        assert asyncio.get_running_loop().time() < deadline, "the fraud service did not apply the policies in time"


async def test_one_episode_is_one_alert_and_one_email_across_traffic_and_a_crash_and_a_new_episode_alerts_again(
    stack: Stack, nc: Client, js: JetStreamContext, mailbox: tuple[Mailbox, int]
) -> None:
    box, _port = mailbox
    published: list[FraudAlert] = []

    async def collect(msg: Msg) -> None:
        published.append(decode(msg.data))

    await nc.subscribe("fraud.alert.*", cb=collect)
    policy = FraudAlertPolicy(calls=CALLS, window_minutes=WINDOW_MIN, email=OPS)
    for command in (
        RegisterNumber(number=NUMBER, account_id="acct_1"),
        SetPolicy(number=NUMBER, policy=SecurityPolicy(fraud_alert=policy)),
    ):
        assert (await send(nc, "provisioner", command)).ok
    await policies_applied(nc, js, published)
    published.clear()

    start = datetime.now(UTC)
    await publish_all(js, offers(0, CALLS, start))  # exactly the threshold: nothing
    await settled(js)
    assert published == [] and box.received() == []

    await publish_all(js, offers(CALLS, 1, start + timedelta(seconds=1)))  # X + 1 within Y minutes
    await wait_for(lambda: len(box.received()) == 1 and len(published) == 1, "alert and its e-mail")
    [alert] = published
    assert alert.rule == "call_spike" and alert.count == CALLS + 1 and alert.event_id == derived_id("ev_offer_3", "call_spike")
    [mail] = box.received()
    assert mail["To"] == OPS and NUMBER in mail["Subject"] and "call_spike" in mail["Subject"]
    body = mail.get_payload()
    assert alert.event_id in body and f"Count:       {CALLS + 1} calls in {WINDOW_MIN} min" in body
    assert "First call:" in body and "Last call:" in body and "203.0.113.7" in body and "+1555" in body

    # Ten times more traffic in the same episode: no second alert, no second e-mail.
    await publish_all(js, offers(100, 10 * (CALLS + 1), start + timedelta(seconds=2)))
    await settled(js)
    await asyncio.sleep(0.5)
    assert len(published) == 1 and len(box.received()) == 1

    # The fraud service crashes in the middle of the episode; traffic goes on meanwhile.
    stack.kill("fraud")
    await publish_all(js, offers(200, 10, start + timedelta(seconds=3)))
    stack.restart("fraud")  # windows rebuilt from CALLS, then the backlog
    await publish_all(js, offers(300, 10, start + timedelta(seconds=4)))
    await settled(js)
    await asyncio.sleep(0.5)
    assert len(published) == 1 and len(box.received()) == 1

    # Event time moves on: a window later the count is back under the threshold (the episode
    # ends), and a new burst of X + 1 is a new episode: one more alert, one more e-mail.
    later = start + timedelta(minutes=WINDOW_MIN, seconds=30)
    await publish_all(js, offers(400, CALLS + 1, later))
    await wait_for(lambda: len(box.received()) == 2 and len(published) == 2, "second alert and its e-mail")
    await settled(js)
    assert [a.event_id for a in published] == [alert.event_id, derived_id("ev_offer_403", "call_spike")]
    assert len({m["Message-ID"] for m in box.received()}) == 2
