"""The fraud service delivers its alerts from the ALERTS stream, one durable per channel:
the webhook signed per Standard Webhooks, e-mail to the number's recipient or the service
default, and a dead mailbox holds up neither webhooks nor detection. Real nats-server, real
SMTP server (aiosmtpd), a real HTTP receiver; the service runs in this process."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from aiosmtpd.controller import Controller
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from standardwebhooks import Webhook

from callplane.broker import make_broker, publish_all, start_consumers, stop_consumers
from schemas import (
    CallOffered,
    FraudAlert,
    FraudAlertPolicy,
    NumberPolicySet,
    NumberRegistered,
    SecurityPolicy,
    decode,
    timestamp,
)
from services.fraud.app import Fraud
from services.fraud.config import FraudSettings
from services.fraud.delivery import RetryPolicy
from tests.nats_server import free_port
from tests.test_fraud_e2e import Mailbox, wait_for

SECRET = "whsec_" + base64.b64encode(os.urandom(24)).decode()
FAST_RETRY = RetryPolicy(attempts=2, first_delay_s=0.1, max_delay_s=0.1, attempt_timeout_s=2.0)


@pytest.fixture
def smtp_port() -> Iterator[tuple[Mailbox, int]]:
    box, port = Mailbox(), free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    yield box, port
    controller.stop()


class Receiver:
    """A minimal HTTP/1.1 server answering 200 to every POST, keeping (headers, body)."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.port = free_port()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")[1:]
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines if ":" in line)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        self.requests.append((headers, body))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/fraud"


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    hook = Receiver()
    server = await asyncio.start_server(hook.handle, "127.0.0.1", hook.port)
    yield hook
    server.close()


@contextlib.asynccontextmanager
async def fraud_service(nats_url: str, js: JetStreamContext, settings: FraudSettings) -> AsyncIterator[Fraud]:
    broker = make_broker(settings, service="fraud")
    await broker.connect()
    fraud = Fraud(js, settings, retry=FAST_RETRY)
    await fraud.start()
    fraud.register(broker)
    await broker.start()
    await start_consumers(broker)
    try:
        yield fraud
    finally:
        await stop_consumers(broker, timeout=5)
        await broker.stop()
        await fraud.stop()


async def watch(js: JetStreamContext, number: str, policy: FraudAlertPolicy) -> None:
    now = timestamp(datetime.now(UTC))
    await publish_all(
        js,
        [
            NumberRegistered(event_id=f"reg{number}", occurred_at=now, number=number, number_id=f"pn_{number[1:]}", account_id="acct_1", provider="twilio"),  # fmt: skip
            NumberPolicySet(event_id=f"pol{number}", occurred_at=now, number=number, policy=SecurityPolicy(fraud_alert=policy), policy_version=1),  # fmt: skip
        ],
    )


async def burst(js: JetStreamContext, number: str, count: int) -> None:
    at = datetime.now(UTC)
    await publish_all(
        js,
        [
            CallOffered(
                event_id=f"ev{number}_{i}", occurred_at=timestamp(at + timedelta(milliseconds=i)), call_id=f"c{number[1:]}_{i}",
                to=number, from_="+15551234567", source_ip=f"198.51.100.{i}",
            )  # fmt: skip
            for i in range(count)
        ],
    )


async def test_an_alert_is_posted_signed_to_the_numbers_webhook_and_mailed_to_the_default_recipient(
    nats_url: str, js: JetStreamContext, nc: Client, smtp_port: tuple[Mailbox, int], receiver: Receiver
) -> None:
    box, port = smtp_port
    settings = FraudSettings(
        nats_url=nats_url, smtp_host="127.0.0.1", smtp_port=port, smtp_starttls=False, fraud_alert_email="soc@example.com",
        fraud_webhook_secret=SECRET, fraud_webhook_allow_private=True,
    )  # fmt: skip
    await watch(js, "+48111111111", FraudAlertPolicy(calls=2, window_minutes=5, webhook_url=receiver.url))  # no e-mail of its own
    async with fraud_service(nats_url, js, settings) as fraud:
        await burst(js, "+48111111111", 3)
        await wait_for(lambda: receiver.requests and box.received(), "webhook and e-mail")
    [(headers, body)] = receiver.requests
    alert = decode(Webhook(SECRET).verify(body, headers) and body)
    assert isinstance(alert, FraudAlert) and alert.number == "+48111111111" and alert.count == 3
    assert headers["webhook-id"] == alert.event_id
    [mail] = box.received()
    assert mail["To"] == "soc@example.com" and alert.event_id in mail.get_payload()
    assert fraud.delivery.metrics.snapshot() == {
        "email": {"delivered": 1, "retried": 0, "failed": 0},
        "webhook": {"delivered": 1, "retried": 0, "failed": 0},
    }


async def test_a_dead_mailbox_holds_up_neither_webhooks_nor_detection(
    nats_url: str, js: JetStreamContext, nc: Client, receiver: Receiver
) -> None:
    settings = FraudSettings(
        nats_url=nats_url, smtp_host="127.0.0.1", smtp_port=free_port(), smtp_starttls=False,  # nobody listens
        fraud_webhook_secret=SECRET, fraud_webhook_allow_private=True,
    )  # fmt: skip
    published: list[FraudAlert] = []

    async def collect(msg: Msg) -> None:
        published.append(decode(msg.data))

    await nc.subscribe("fraud.alert.*", cb=collect)
    numbers = [f"+4822222222{i}" for i in range(3)]
    for n in numbers:
        await watch(js, n, FraudAlertPolicy(calls=1, window_minutes=5, email="ops@example.com", webhook_url=receiver.url))
    async with fraud_service(nats_url, js, settings) as fraud:
        for n in numbers:
            await burst(js, n, 2)
        await wait_for(lambda: len(receiver.requests) == 3, "three webhooks")
        assert sorted(a.number for a in published) == numbers  # detection went on
        await wait_for(lambda: fraud.delivery.metrics.snapshot()["email"]["failed"] >= 3, "failed e-mails counted")
        counts = fraud.delivery.metrics.snapshot()
        assert counts["webhook"] == {"delivered": 3, "retried": 0, "failed": 0}
        assert counts["email"]["delivered"] == 0 and counts["email"]["retried"] >= 3
