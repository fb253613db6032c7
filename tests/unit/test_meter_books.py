"""The meter's books in memory and their group commits to DuckDB: what is loaded back equals
what was written, and crashes between commits, redeliveries and duplicates never change the
ledger a clean run writes."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import (
    AccountConfigured,
    AccountCredited,
    CallAccepted,
    CallAgentReplied,
    CallAnswered,
    CallEnded,
    CallMissed,
    Event,
    timestamp,
)
from services.meter import ledger
from services.meter.app import LedgerUnavailable, Meter
from services.meter.books import HOLD_TTL_S, UnknownAccount
from services.meter.ledger import canonical_export
from services.meter.snapshots import write_snapshot
from schemas.commands import HoldCredit

T0 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
NUMBER = "+48123456789"


def stream(calls: int, seed: int = 1) -> list[Event]:
    rng = random.Random(seed)
    at = timestamp(T0)
    events: list[Event] = [
        AccountConfigured(event_id="cfg", occurred_at=at, account_id="a", rate_millicredits_per_minute=30_007,
                          text_price_millicredits=250, daily_voice_cap_s=10**6),
        AccountCredited(event_id="top", occurred_at=at, account_id="a", amount_millicredits=10**9, reference="r"),
    ]  # fmt: skip
    for n in range(calls):
        call = {"call_id": f"c{n}", "number": NUMBER}
        at = timestamp(T0 + timedelta(seconds=n))
        events.append(CallAccepted(event_id=f"acc{n}", occurred_at=at, account_id="a", agent_id="ag", hold_id=f"h{n}",
                                   rate_millicredits_per_minute=30_007, text_price_millicredits=250, **call))  # fmt: skip
        if rng.random() < 0.2:
            events.append(CallMissed(event_id=f"mis{n}", occurred_at=at, **call))
            continue
        events.append(CallAnswered(event_id=f"ans{n}", occurred_at=at, **call))
        events.append(CallAgentReplied(event_id=f"rep{n}", occurred_at=at, responses=rng.randrange(1, 5), **call))
        if rng.random() < 0.9:  # some calls are still running at the end
            duration = rng.randrange(1_000, 300_000)
            events.append(CallEnded(event_id=f"end{n}", occurred_at=at, duration_ms=duration,
                                    silent_ms=rng.randrange(0, duration // 2), **call))  # fmt: skip
    return events


def run(events: list[Event], *, flush_every: int) -> Meter:
    meter = Meter(ledger.connect(":memory:"))
    for sequence, event in enumerate(events, 1):
        meter.apply(event, "meter-calls", sequence)
        if sequence % flush_every == 0:
            meter.flush()
    meter.flush()
    return meter


def state(meter: Meter) -> tuple:
    books = meter.books
    running = {c: books.calls[c].row() for c in books.calls}
    return (
        {a: acc.row() for a, acc in books.accounts.items()},
        {a: acc.held for a, acc in books.accounts.items()},
        running,
        {c: h.row() for c, h in books.holds.items() if h.status == "open"},
        frozenset(books.applied),
    )


def test_the_books_loaded_from_the_ledger_equal_the_books_that_wrote_it() -> None:
    meter = run(stream(60), flush_every=7)
    reloaded = Meter(meter.con)
    assert state(reloaded) == state(meter)
    assert any(h.status == "open" for h in meter.books.holds.values())  # running calls keep their holds


def test_group_commits_write_the_same_ledger_as_one_commit_per_event() -> None:
    events = stream(80)
    assert canonical_export(run(events, flush_every=1).con) == canonical_export(run(events, flush_every=50).con)


STREAM = stream(25, seed=3)
CLEAN = canonical_export(run(STREAM, flush_every=1).con)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_crashes_between_commits_redeliveries_and_duplicates_leave_the_clean_ledger(seed: int) -> None:
    events, clean = STREAM, CLEAN
    rng = random.Random(seed)
    con = ledger.connect(":memory:")
    meter = Meter(con)
    position = 0  # the consumer's ack floor: events after it are delivered again after a crash
    while position < len(events):
        batch = rng.randrange(1, 15)
        for sequence in range(position, min(position + batch, len(events))):
            meter.apply(events[sequence], "meter-calls", sequence + 1)
            if rng.random() < 0.1:  # a duplicate, published again after the dedup window
                meter.apply(events[rng.randrange(0, sequence + 1)], "meter-calls", sequence + 1)
        if rng.random() < 0.3:
            meter = Meter(con)  # a crash before the commit: the batch is delivered again
            continue
        meter.flush()
        position = min(position + batch, len(events))
    assert canonical_export(con) == clean


def test_a_failed_commit_loads_the_books_again_and_fails_the_waiters() -> None:
    meter = run(stream(5), flush_every=1)
    before = state(meter)
    meter.apply(AccountCredited(event_id="top2", occurred_at=timestamp(T0), account_id="a",
                                amount_millicredits=5, reference="r2"), "meter-accounts", 99)  # fmt: skip
    meter.books.pending.ledger.append(("broken",))  # a row the ledger table refuses
    with pytest.raises(Exception):  # noqa: B017 - whatever DuckDB raises
        meter.flush()
    assert state(meter) == before  # the top-up is not in memory: it is applied again when redelivered
    assert canonical_export(meter.con) == canonical_export(run(stream(5), flush_every=1).con)


async def test_when_the_books_cannot_be_loaded_again_nothing_is_applied_and_loading_is_tried_until_it_works(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A commit fails and so does loading the books again (the writer unreachable): the
    waiters are failed at once (their inputs retried), nothing is applied meanwhile, and the
    books are loaded as soon as the ledger answers again."""
    monkeypatch.setattr("services.meter.app.RELOAD_RETRY_S", 0.01)
    meter = run(stream(3), flush_every=1)
    before = state(meter)
    store, loads = meter.store, []
    write, load = store.write, store.load

    async def broken_write(batch) -> None:  # noqa: ANN001
        raise OSError("the writer is gone")

    def flaky_load():  # noqa: ANN202
        loads.append(len(loads))
        if len(loads) < 3:
            raise OSError("still gone")
        return load()

    store.write, store.load = broken_write, flaky_load
    meter.apply(AccountCredited(event_id="top2", occurred_at=timestamp(T0), account_id="a",
                                amount_millicredits=5, reference="r2"), "meter-accounts", 99)  # fmt: skip
    with pytest.raises(LedgerUnavailable):
        await asyncio.wait_for(meter.commit(), 1)  # failed at once, not left waiting
    with pytest.raises(LedgerUnavailable):
        meter.apply(AccountCredited(event_id="top3", occurred_at=timestamp(T0), account_id="a",
                                    amount_millicredits=5, reference="r3"), "meter-accounts", 100)  # fmt: skip
    store.write = write
    await asyncio.wait_for(meter._writer, 1)  # the books are loaded on the third try
    assert len(loads) == 3 and state(meter) == before and not meter._stale


async def test_a_hold_is_answered_only_after_it_is_committed() -> None:
    meter = run(stream(0), flush_every=1)
    reply = await meter.serve_holds(HoldCredit(call_id="x1", account_id="a", number=NUMBER))
    assert reply.ok and reply.hold.hold_id == "hold_x1"
    assert meter.con.execute("SELECT status FROM holds WHERE call_id = 'x1'").fetchall() == [("open",)]

    meter.books.pending.ledger.append(("broken",))  # the next commit fails
    refused = await meter.serve_holds(HoldCredit(call_id="x2", account_id="a", number=NUMBER))
    assert not refused.ok and refused.code == "unavailable"
    assert "x2" not in meter.books.holds  # forgotten with the failed commit: nothing reserved
    meter.books.pending.ledger.append(("broken",))
    with pytest.raises(LedgerUnavailable):
        await meter.commit()


def test_a_hold_whose_call_never_got_going_is_released_once_after_its_ttl() -> None:
    meter = run(stream(0), flush_every=1)
    assert meter.hold(HoldCredit(call_id="lost", account_id="a", number=NUMBER)).ok
    held = meter.books.accounts["a"].held
    assert held > 0
    granted_at = meter.books.holds["lost"].opened_s
    at = datetime.fromtimestamp(granted_at, UTC)
    assert meter.supervise(at + timedelta(seconds=HOLD_TTL_S - 1)) == []
    released = meter.supervise(at + timedelta(seconds=HOLD_TTL_S))
    assert [e.amount_millicredits for e in released] == [held]
    assert meter.books.accounts["a"].held == 0
    assert meter.supervise(at + timedelta(seconds=2 * HOLD_TTL_S)) == []  # once
    meter.flush()
    assert meter.con.execute("SELECT status FROM holds WHERE call_id = 'lost'").fetchall() == [("released",)]


async def test_an_event_that_fails_half_applied_makes_the_meter_load_its_books_again() -> None:
    meter = run(stream(3), flush_every=1)
    before = state(meter)
    handle = meter.handler("meter-accounts")

    class Meta:  # what the handler reads of a message's metadata
        class sequence:  # noqa: N801
            stream = 500

    top_up = AccountCredited(event_id="top9", occurred_at=timestamp(T0), account_id="a", amount_millicredits=7,
                             reference="r9")  # fmt: skip
    meter.books._write = lambda *args, **kwargs: 1 / 0  # a bug after the balance changed
    with pytest.raises(ZeroDivisionError):
        await handle([(top_up, Meta)])
    with pytest.raises(LedgerUnavailable):  # nothing is applied until the books are loaded again
        meter.apply(top_up, "meter-accounts", 500)
    await asyncio.sleep(0.05)  # the writer task loads them
    assert state(meter) == before  # the half-applied top-up is gone from memory (new books)
    [[credited]] = await handle([(top_up, Meta)])  # redelivered: applied once, committed
    assert credited.balance_millicredits == meter.books.accounts["a"].balance == before[0]["a"][4] + 7


def test_a_missed_call_leaves_memory_once_committed_and_is_not_loaded_again() -> None:
    """call.missed is a call's last event (no call.ended follows): the call and its released
    hold must not stay in memory, nor come back at every start."""
    meter = run(stream(0), flush_every=1)
    call = {"call_id": "m1", "number": NUMBER}
    meter.on_event(CallAccepted(event_id="acc_m1", occurred_at=timestamp(T0), account_id="a", agent_id="ag",
                                hold_id="h_m1", rate_millicredits_per_minute=30_007, **call), "meter-calls", 1)  # fmt: skip
    meter.on_event(CallMissed(event_id="mis_m1", occurred_at=timestamp(T0), **call), "meter-calls", 2)
    assert "m1" not in meter.books.calls and "m1" not in meter.books.holds
    assert "m1" not in Meter(meter.con).books.calls
    # An answer that raced the ring timeout is still charged what the call used.
    meter.on_event(CallAnswered(event_id="ans_m1", occurred_at=timestamp(T0), **call), "meter-calls", 3)
    [charged] = meter.on_event(CallEnded(event_id="end_m1", occurred_at=timestamp(T0), duration_ms=61_000, **call),
                               "meter-calls", 4)  # fmt: skip
    assert charged.voice_millicredits == round(30_007 * 61 / 60)
    assert "m1" not in meter.books.calls



async def test_a_cutoff_whose_publish_failed_or_was_cut_short_by_a_crash_is_published_again() -> None:
    """call.cutoff is an order: once committed (the call is marked cut off and never ordered
    again) it must reach the edge, after a failed publish and after a restart."""
    meter = run(stream(0), flush_every=1)
    call = {"call_id": "k1", "number": NUMBER}
    meter.on_event(AccountConfigured(event_id="cfg_cap", occurred_at=timestamp(T0), account_id="a",
                                     rate_millicredits_per_minute=30_007, per_call_max_s=30), "meter-accounts", 1)  # fmt: skip
    meter.on_event(CallAccepted(event_id="acc_k1", occurred_at=timestamp(T0), account_id="a", agent_id="ag",
                                hold_id="h_k1", rate_millicredits_per_minute=30_007, **call), "meter-calls", 2)  # fmt: skip
    meter.on_event(CallAnswered(event_id="ans_k1", occurred_at=timestamp(T0), **call), "meter-calls", 3)
    published: list[Event] = []

    async def broken(events: list[Event]) -> None:
        raise TimeoutError("no PubAck")

    async def works(events: list[Event]) -> None:
        published.extend(events)

    with pytest.raises(TimeoutError):
        await meter.supervise_round(T0 + timedelta(seconds=31), broken)
    await meter.supervise_round(T0 + timedelta(seconds=32), works)
    assert [(e.event_id, e.reason) for e in published] == [("cutoff_k1", "per_call_cap")]

    published.clear()
    restarted = Meter(meter.con)  # a crash after the commit, before the publish
    await restarted.supervise_round(T0 + timedelta(seconds=33), works)
    assert [(e.event_id, e.reason) for e in published] == [("cutoff_k1", "per_call_cap")]
    await restarted.supervise_round(T0 + timedelta(seconds=34), works)
    assert len(published) == 1  # once per start, not every round


def test_a_hold_opened_again_after_it_expired_can_expire_again() -> None:
    """A call.accepted that comes after its hold expired and left memory (the meter's calls
    consumer far behind) reserves the first minute again; if that hold is not resolved
    either, its expiry is a second ledger entry, not the first one's id again (which the
    ledger refuses, failing every commit it is in and leaving the hold open for good)."""
    meter = run(stream(0), flush_every=1)
    assert meter.hold(HoldCredit(call_id="late", account_id="a", number=NUMBER)).ok
    granted = datetime.fromtimestamp(meter.books.holds["late"].opened_s, UTC)
    assert len(meter.supervise(granted + timedelta(seconds=HOLD_TTL_S))) == 1
    meter.flush()
    assert "late" not in meter.books.holds  # released and let go
    meter.on_event(CallAccepted(event_id="acc_late", occurred_at=timestamp(T0), call_id="late", number=NUMBER,
                                account_id="a", agent_id="ag", hold_id="hold_late",
                                rate_millicredits_per_minute=30_007), "meter-calls", 1)  # fmt: skip
    assert meter.books.accounts["a"].held == 30_007  # reserved again
    later = granted + timedelta(seconds=2 * HOLD_TTL_S)
    assert meter.supervise(later) == []  # the hold's clock starts now
    [released] = meter.supervise(later + timedelta(seconds=HOLD_TTL_S))
    meter.flush()
    assert meter.books.accounts["a"].held == 0
    assert meter.con.execute("SELECT status FROM holds WHERE call_id = 'late'").fetchall() == [("released",)]
    assert meter.con.execute("SELECT count(*) FROM ledger WHERE kind = 'released'").fetchall() == [(2,)]


def test_a_call_accepted_after_its_hold_expired_stays_in_memory_as_it_is_loaded() -> None:
    """A hold expiring with no call known lets its call go once committed; a call.accepted
    applied before that commit makes the call live: memory must keep it, as ledger.load does."""
    meter = run(stream(0), flush_every=1)
    assert meter.hold(HoldCredit(call_id="late", account_id="a", number=NUMBER)).ok
    granted = datetime.fromtimestamp(meter.books.holds["late"].opened_s, UTC)
    assert len(meter.supervise(granted + timedelta(seconds=HOLD_TTL_S))) == 1
    meter.apply(CallAccepted(event_id="acc_late", occurred_at=timestamp(T0), call_id="late", number=NUMBER,
                             account_id="a", agent_id="ag", hold_id="hold_late", rate_millicredits_per_minute=30_007),
                "meter-calls", 1)  # fmt: skip
    meter.flush()
    assert "late" in meter.books.calls
    assert state(meter) == state(Meter(meter.con))


def test_an_admission_waiting_for_its_account_changes_nothing_until_it_can_be_applied() -> None:
    meter = Meter(ledger.connect(":memory:"))
    early = CallAccepted(event_id="acc_early", occurred_at=timestamp(T0), call_id="early", number=NUMBER,
                         account_id="later", agent_id="ag", hold_id="h_early")  # no prices: the account's are needed
    with pytest.raises(UnknownAccount):
        meter.apply(early, "meter-calls", 1)
    assert not meter.books.pending and "early" not in meter.books.calls


def test_a_late_reply_after_its_call_ended_and_left_memory_is_charged_and_let_go_again(tmp_path: Path) -> None:
    """An ended call is recorded in call_ends, not by rewriting its row or its hold's: a reply
    arriving after the call left memory finds it ended through the database and charges text
    only, and the hold reads as posted everywhere."""
    at = timestamp(T0)
    call = {"call_id": "c1", "number": NUMBER}
    meter = Meter(ledger.connect(":memory:"))
    for sequence, event in enumerate(stream(0) + [
        CallAccepted(event_id="acc", occurred_at=at, account_id="a", agent_id="ag", hold_id="h1",
                     rate_millicredits_per_minute=30_007, text_price_millicredits=250, **call),
        CallAnswered(event_id="ans", occurred_at=at, **call),
        CallEnded(event_id="end", occurred_at=at, duration_ms=90_000, silent_ms=0, **call),
    ], 1):  # fmt: skip
        meter.on_event(event, "meter-calls", sequence)
    assert "c1" not in meter.books.calls  # ended and committed: memory let it go
    assert meter.con.execute(f"SELECT ended, {ledger.ENDED} FROM calls").fetchall() == [(False, True)]
    [late] = meter.on_event(CallAgentReplied(event_id="late", occurred_at=at, responses=2, **call), "meter-calls", 9)
    assert (late.charged_s, late.text_millicredits, late.voice_millicredits) == (0, 500, 0)
    assert "c1" not in meter.books.calls  # still ended: not supervised as a running call
    assert Meter(meter.con).books.calls == {}
    # Its hold is posted by the end alone (the row is not rewritten): every reader says so.
    assert meter.con.execute("SELECT status FROM holds").fetchall() == [("open",)]
    assert meter.con.execute("SELECT status FROM hold_states").fetchall() == [("posted",)]
    assert meter.con.execute("SELECT count(*) FROM open_holds").fetchall() == [(0,)]
    [(balance, available)] = meter.con.execute("SELECT balance_millicredits, available_millicredits FROM balances").fetchall()
    assert available == balance
    snapshot = write_snapshot(meter.con, tmp_path, now=T0)  # analysts see it ended and posted too
    assert duckdb.sql(f"SELECT call_id, ended FROM '{snapshot}/calls.parquet'").fetchall() == [("c1", True)]
    assert duckdb.sql(f"SELECT status FROM '{snapshot}/holds.parquet'").fetchall() == [("posted",)]
