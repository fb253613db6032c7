"""The meter end to end over a real nats-server: an exactly-once ledger under duplicates,
redeliveries and crashes, and a rebuild from the streams that equals the live ledger."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from nats.js import JetStreamContext

from callplane.embedded import Stack
from callplane.rebuild import export
from tests.conftest import fresh_streams
from schemas import (
    AccountConfigured,
    AccountCredited,
    CallAccepted,
    CallAgentReplied,
    CallAnswered,
    CallEnded,
    Event,
    encode,
    subject_for,
    timestamp,
)

CALLS = int(os.environ.get("METER_E2E_CALLS", "10000"))  # the size; ~15 s
ACCOUNTS = ("acct_a", "acct_b", "acct_c")
T0 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)


def call_events(calls: int, seed: int = 7) -> list[Event]:
    """Accounts, top-ups, then calls: accepted (with a hold), answered, replies, ended."""
    rng = random.Random(seed)
    events: list[Event] = []
    for i, account in enumerate(ACCOUNTS):
        at = timestamp(T0)
        events.append(AccountConfigured(event_id=f"cfg_{account}", occurred_at=at, account_id=account,
                                        rate_millicredits_per_minute=30_000 + 1_001 * i, text_price_millicredits=400))
        events.append(AccountCredited(event_id=f"top_{account}", occurred_at=at, account_id=account,
                                      amount_millicredits=10**12, reference="opening"))
    for n in range(calls):
        account = ACCOUNTS[n % len(ACCOUNTS)]
        number = f"+4812345{n % 100:04d}"
        at = T0 + timedelta(seconds=n)
        call = {"call_id": f"call_{n}", "number": number}
        duration = rng.choice([0, rng.randrange(1_000, 600_000)])
        events.append(CallAccepted(event_id=f"acc_{n}", occurred_at=timestamp(at), account_id=account, agent_id="agent",
                                   hold_id=f"hold_{n}", rate_millicredits_per_minute=30_000 + 1_001 * (n % 3),
                                   text_price_millicredits=400, **call))
        if duration:
            events.append(CallAnswered(event_id=f"ans_{n}", occurred_at=timestamp(at), **call))
            events.append(CallAgentReplied(event_id=f"rep_{n}", occurred_at=timestamp(at), responses=rng.randrange(0, 9), **call))
        events.append(CallEnded(event_id=f"end_{n}", occurred_at=timestamp(at + timedelta(milliseconds=duration)),
                                duration_ms=duration, silent_ms=rng.randrange(0, duration // 3 + 1), **call))
    return events


async def publish_raw(js: JetStreamContext, events: list[Event], *, msg_ids: bool = True) -> None:
    """Pipelined publishes; without Nats-Msg-Id JetStream cannot drop a repeat, as after its
    duplicate window: the meter must."""
    for start in range(0, len(events), 2000):
        futures = [
            await js.publish_async(subject_for(e), encode(e), headers={"Nats-Msg-Id": e.event_id} if msg_ids else None)
            for e in events[start : start + 2000]
        ]
        await asyncio.gather(*futures)


async def applied_all(js: JetStreamContext) -> bool:
    for durable, stream in (("meter-calls", "CALLS"), ("meter-accounts", "ACCOUNTS")):
        info = await js.consumer_info(stream, durable)
        if info.num_pending or info.num_ack_pending:
            return False
    return True


async def drain(js: JetStreamContext, timeout: float = 600) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await applied_all(js):
        assert asyncio.get_running_loop().time() < deadline, "the meter did not catch up"
        await asyncio.sleep(0.2)


async def reset(js: JetStreamContext) -> None:
    """Empty streams, new consumers, and no memory of message ids (a purge keeps it)."""
    await fresh_streams(js, ("CALLS", "ACCOUNTS", "LEDGER"))


@pytest.fixture
def meter_only(nats_url: str, js: JetStreamContext, tmp_path: Path) -> Iterator[Stack]:
    with Stack(home=tmp_path / "clean", nats_url=nats_url, services=("meter",)) as stack:
        yield stack


async def test_duplicates_redeliveries_and_crashes_give_exactly_the_ledger_of_a_clean_run(
    meter_only: Stack, js: JetStreamContext, tmp_path: Path
) -> None:
    events = call_events(CALLS)
    await publish_raw(js, events)
    await drain(js)
    meter_only.kill("meter")
    database = meter_only.home / "data" / "meter" / "ledger.duckdb"
    clean = export(database)

    # The same stream again from scratch, now with crashes and duplicates.
    database.rename(tmp_path / "clean.duckdb")
    await reset(js)
    meter_only.restart("meter")
    rng = random.Random(11)
    duplicates = rng.sample(events, len(events) // 10)
    quarter = len(events) // 4 + 1
    for start in range(0, len(events), quarter):
        await publish_raw(js, events[start : start + quarter])
        await asyncio.sleep(rng.uniform(0.05, 0.5))
        meter_only.kill("meter")  # a crash at a random point: some work applied, some not acked
        meter_only.restart("meter")
    await publish_raw(js, duplicates, msg_ids=False)  # as if re-published after the dedup window
    await drain(js)
    meter_only.kill("meter")
    assert export(database) == clean
    postings = sum(1 for e in events if isinstance(e, CallEnded) or (isinstance(e, CallAgentReplied) and e.responses))
    assert clean.count('"kind": "charged"') == postings  # voice at the end, text per reply


async def test_a_rebuild_from_the_streams_equals_the_live_ledger(meter_only: Stack, js: JetStreamContext, tmp_path: Path) -> None:
    await publish_raw(js, call_events(300, seed=3))
    await drain(js)
    meter_only.kill("meter")
    live = export(meter_only.home / "data" / "meter" / "ledger.duckdb")
    out = tmp_path / "rebuilt.duckdb"
    run = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "callplane.cli", "ledger", "rebuild", str(out), "--url", meter_only.external_url,
         "--export", str(tmp_path / "rebuilt.jsonl")],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "rebuilt.jsonl").read_text() == live
    assert live.count('"balance"') == len(ACCOUNTS)


async def test_concurrent_hold_requests_never_reserve_more_than_the_balance(meter_only: Stack, js: JetStreamContext) -> None:
    """50 hold_credit requests at once over NATS, credit for 7 first minutes: exactly 7 held."""
    import nats

    from callplane.client import send
    from schemas.commands import HoldCredit

    at = timestamp(T0)
    await publish_raw(js, [
        AccountConfigured(event_id="cfg_h", occurred_at=at, account_id="acct_h", rate_millicredits_per_minute=30_000),
        AccountCredited(event_id="top_h", occurred_at=at, account_id="acct_h", amount_millicredits=7 * 30_000 + 29_999,
                        reference="r"),
    ])  # fmt: skip
    await drain(js)
    nc = await nats.connect(meter_only.external_url)
    try:
        replies = await asyncio.gather(*(
            send(nc, "meter", HoldCredit(call_id=f"h{n}", account_id="acct_h", number="+48123450000"))
            for n in range(50)
        ))  # fmt: skip
    finally:
        await nc.close()
    assert sum(r.ok for r in replies) == 7
    assert {r.code for r in replies if not r.ok} == {"insufficient_credits"}
