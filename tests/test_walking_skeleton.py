"""End to end over a real nats-server, every service its own process: a registered
number is offered a call, the gatekeeper accepts it, the call is answered and ends,
the meter charges it into the DuckDB ledger, and the fraud service counts it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from callplane import topology
from callplane.broker import publish
from callplane.client import send
from callplane.embedded import Stack
from schemas import (
    STREAMS,
    AnyEvent,
    CallAnswered,
    CallEnded,
    CallOffered,
    FraudAlertPolicy,
    SecurityPolicy,
    decode,
    timestamp,
)
from schemas.commands import AssignAgent, ConfigureAccount, CreditAccount, RegisterNumber, SetPolicy

NUMBER = "+48123456789"
ACCOUNT = "acct_e2e"


@pytest.fixture
def stack(nats_url: str, js: JetStreamContext, tmp_path: Path) -> Iterator[Stack]:
    with Stack(home=tmp_path / "stack", nats_url=nats_url) as running:
        yield running


def now() -> str:
    return timestamp(datetime.now(UTC))


class Inbox:
    """Every event published on some subjects, as the services publish them."""

    def __init__(self) -> None:
        self.events: list[AnyEvent] = []

    async def collect(self, msg: Msg) -> None:
        self.events.append(decode(msg.data))

    def of(self, tag: str) -> list[AnyEvent]:
        return [e for e in self.events if e.__struct_config__.tag == tag]

    async def wait_for(self, tag: str, count: int = 1, timeout: float = 15.0) -> list[AnyEvent]:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self.of(tag)) < count:
            assert asyncio.get_running_loop().time() < deadline, f"no {count} x {tag} within {timeout}s: {self.events}"
            await asyncio.sleep(0.05)
        return self.of(tag)


async def test_a_call_flows_through_every_service_and_is_charged_in_the_ledger(
    stack: Stack, nc: Client, js: JetStreamContext
) -> None:
    inbox = Inbox()
    for subject in ("call.>", "ledger.>", "fraud.>"):
        await nc.subscribe(subject, cb=inbox.collect)
    for command in (
        ConfigureAccount(account_id=ACCOUNT, rate_millicredits_per_minute=30_000, text_price_millicredits=500),
        CreditAccount(account_id=ACCOUNT, amount_millicredits=1_000_000, reference="topup-1"),
        RegisterNumber(number=NUMBER, account_id=ACCOUNT),
        AssignAgent(number=NUMBER, agent_id="agent_7"),
        SetPolicy(number=NUMBER, policy=SecurityPolicy(fraud_alert=FraudAlertPolicy(calls=1, window_minutes=5))),
    ):
        assert (await send(nc, "provisioner", command)).ok
    await inbox.wait_for("ledger.credited")  # the meter has the credit: holds can be granted

    offer = CallOffered(
        event_id="ev_offer_1", occurred_at=now(), call_id="call_1", to=NUMBER, from_="+15551234567", source_ip="198.51.100.7"
    )
    await publish(js, offer)
    [accepted] = await inbox.wait_for("call.accepted")
    assert (accepted.call_id, accepted.account_id, accepted.agent_id) == ("call_1", ACCOUNT, "agent_7")
    assert accepted.hold_id == "hold_call_1"  # the meter held the first minute
    [held] = await inbox.wait_for("ledger.held")
    assert (held.amount_millicredits, held.hold_id) == (30_000, "hold_call_1")
    assert accepted.dynamic_variables["system__caller_id"] == "+15551234567"

    await publish(js, CallAnswered(event_id="ev_answer_1", occurred_at=now(), call_id="call_1", number=NUMBER))
    await publish(
        js,
        CallEnded(event_id="ev_end_1", occurred_at=now(), call_id="call_1", number=NUMBER, duration_ms=90_500, silent_ms=10_000),
    )
    [charged] = await inbox.wait_for("ledger.charged")
    # billable ceil(80.5 s) = 81 s; 30,000 millicredits/min * 81 / 60 = 40,500
    assert (charged.amount_millicredits, charged.charged_s, charged.balance_millicredits) == (40_500, 81, 959_500)

    # The fraud service counts offers: a second one crosses "more than 1 call in 5 minutes".
    await publish(js, CallOffered(event_id="ev_offer_2", occurred_at=now(), call_id="call_2", to=NUMBER, from_="+15557654321"))
    [alert] = await inbox.wait_for("fraud.alert")
    assert (alert.number, alert.count, alert.threshold) == (NUMBER, 2, 1)

    stack.__exit__(None, None, None)  # the meter owns its DuckDB file while it runs
    ledger = duckdb.connect(str(stack.home / "data" / "meter" / "ledger.duckdb"), read_only=True)
    rows = ledger.execute("SELECT call_id, charged_s, total_millicredits FROM call_charges").fetchall()
    assert rows == [("call_1", 81, 40_500)]
    assert ledger.execute("SELECT balance_millicredits FROM balances").fetchall() == [(959_500,)]


async def test_nats_setup_twice_in_a_row_changes_nothing_the_second_time(js: JetStreamContext) -> None:
    await js.delete_stream("LEDGER")
    first = await topology.setup(js)
    second = await topology.setup(js)
    assert first.created == ["stream LEDGER"] and first.changed
    assert not second.changed and len(second.unchanged) == len(topology.CONSUMERS) + len(STREAMS) + len(topology.KV_BUCKETS)


async def test_nats_setup_repairs_a_stream_someone_changed(js: JetStreamContext) -> None:
    config = (await js.stream_info("CALLS")).config
    config.duplicate_window = 5.0
    await js.update_stream(config)
    report = await topology.setup(js)
    assert report.updated == ["stream CALLS"]
    assert (await js.stream_info("CALLS")).config.duplicate_window == topology.DUPLICATE_WINDOW_S


async def test_nats_setup_lets_a_stream_set_up_before_fast_batches_take_them(js: JetStreamContext) -> None:
    config = (await js.stream_info("LEDGER")).config
    config.allow_batched = False
    await js.update_stream(config)
    assert (await topology.setup(js)).updated == ["stream LEDGER"]
    assert (await js.stream_info("LEDGER")).config.allow_batched is True
