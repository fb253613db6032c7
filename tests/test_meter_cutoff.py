"""Credit for three minutes and five concurrent calls: the meter's real storage path (DuckDB)
with the clock passed in, so minutes of talk take no time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from schemas import (
    AccountConfigured,
    AccountCredited,
    CallAccepted,
    CallAnswered,
    CallCutoff,
    CallEnded,
    LedgerHeld,
    timestamp,
)
from schemas.commands import HoldCredit
from services.meter import ledger
from services.meter.app import Meter
from services.meter.core import EXTENSION_S

T0 = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
RATE = 30_000  # 30 credits a minute
NUMBER = "+48123456789"


def stamp(at: datetime, event_id: str) -> dict:
    return {"event_id": event_id, "occurred_at": timestamp(at)}


def test_five_calls_on_three_minutes_of_credit_are_cut_off_within_one_increment(tmp_path: Path) -> None:
    meter = Meter(ledger.connect(tmp_path / "ledger.duckdb"))
    seq = iter(range(1, 10_000))

    def apply(event) -> list:  # noqa: ANN001
        return meter.on_event(event, "meter-calls", next(seq))

    apply(AccountConfigured(**stamp(T0, "cfg"), account_id="a", rate_millicredits_per_minute=RATE))
    apply(AccountCredited(**stamp(T0, "top"), account_id="a", amount_millicredits=3 * RATE, reference="r"))

    # Five offers at once: the meter holds the first minute of as many as the credit covers.
    held = []
    for n in range(5):
        reply = meter.hold(HoldCredit(call_id=f"c{n}", account_id="a", number=NUMBER))
        if reply.ok:
            held.append(f"c{n}")
            apply(CallAccepted(**stamp(T0, f"acc{n}"), call_id=f"c{n}", number=NUMBER, account_id="a", agent_id="x",
                               hold_id=reply.hold.hold_id, rate_millicredits_per_minute=RATE))
            apply(CallAnswered(**stamp(T0, f"ans{n}"), call_id=f"c{n}", number=NUMBER))
        else:
            assert reply.code == "insufficient_credits"
    assert held == ["c0", "c1", "c2"]  # 3 x 30,000 reserved: the other two were refused

    # The calls talk on; the meter supervises once a second and orders cut-offs.
    cut: dict[str, datetime] = {}
    now = T0
    while len(cut) < len(held) and now < T0 + timedelta(minutes=10):
        now += timedelta(seconds=1)
        for order in meter.supervise(now):
            assert isinstance(order, CallCutoff) and order.reason == "credit_exhausted"
            cut[order.call_id] = now
            # The edge hangs up at once.
            apply(CallEnded(**stamp(now, f"end_{order.call_id}"), call_id=order.call_id, number=NUMBER,
                            duration_ms=int((now - T0).total_seconds() * 1000), end_reason="cutoff"))

    assert sorted(cut) == held
    charged = meter.con.execute("SELECT sum(total_millicredits) FROM call_charges").fetchall()[0][0]
    balance = meter.con.execute("SELECT balance_millicredits FROM balances").fetchall()[0][0]
    # Which bound holds: the strict one. Each call was cut off in the second its one-minute
    # hold ran out, so the total charged is exactly the credit, with no overrun at all (the
    # allowed one, an increment's rounding, would be RATE * EXTENSION_S / 60 more).
    assert charged == 3 * RATE < 3 * RATE + RATE * EXTENSION_S // 60
    assert balance == 0
    assert all(at - T0 <= timedelta(seconds=61) for at in cut.values())


def test_each_extension_of_a_running_call_s_hold_is_published_as_ledger_held(tmp_path: Path) -> None:
    meter = Meter(ledger.connect(tmp_path / "ledger.duckdb"))
    seq = iter(range(1, 10_000))
    for event in (
        AccountConfigured(**stamp(T0, "cfg"), account_id="a", rate_millicredits_per_minute=RATE),
        AccountCredited(**stamp(T0, "top"), account_id="a", amount_millicredits=10 * RATE, reference="r"),
        CallAccepted(**stamp(T0, "acc"), call_id="c", number=NUMBER, account_id="a", agent_id="x", hold_id="h",
                     rate_millicredits_per_minute=RATE),
        CallAnswered(**stamp(T0, "ans"), call_id="c", number=NUMBER),
    ):  # fmt: skip
        meter.on_event(event, "meter-calls", next(seq))
    extensions = []
    for second in range(1, 3 * 60 + 1):  # three minutes of talk, supervised every second
        extensions += [e for e in meter.supervise(T0 + timedelta(seconds=second)) if isinstance(e, LedgerHeld)]
    meter.flush()
    # The first minute was held at admission; 15 s before each minute runs out, one more.
    assert [e.amount_millicredits for e in extensions] == [RATE] * 3
    assert len({e.event_id for e in extensions}) == 3
    assert meter.con.execute("SELECT amount_millicredits FROM holds WHERE hold_id = 'h'").fetchall() == [(4 * RATE,)]
    assert meter.con.execute("SELECT count(*) FROM ledger WHERE kind = 'held'").fetchall() == [(4,)]
