"""Meter adapter: call.* and account.* in, DuckDB ledger and ledger.* events out."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import structlog
from faststream.nats import NatsBroker
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from callplane import topology
from callplane.broker import consume, publish_all
from callplane.commands import serve_commands
from schemas import (
    AccountConfigured,
    AccountCredited,
    AnyEvent,
    CallAccepted,
    CallAgentReplied,
    CallAnswered,
    CallCutoff,
    CallEnded,
    CallMissed,
    CallRejected,
    Event,
    LedgerCharged,
    LedgerCredited,
    LedgerHeld,
    LedgerReleased,
    Reply,
    decode,
    derived_id,
    encode,
    timestamp,
)
from schemas.commands import HoldCredit, HoldView

from . import ledger
from .config import MeterSettings
from .snapshots import SnapshotSchedule, run_snapshots, snapshot_dir
from .core import (
    AccountLimits,
    Charge,
    Extend,
    HoldRefusal,
    RunningCall,
    decide_hold,
    rate_call,
    round_half_up_div,
    supervise,
)

log = structlog.get_logger()


class UnknownAccount(LookupError):
    """A call of an account whose configuration has not reached the meter yet: retried."""


class UnknownCall(LookupError):
    """An event of a call whose admission has not reached the meter yet (a redelivery can
    overtake it): retried until it has."""


class Meter:
    def __init__(self, js: JetStreamContext, con: duckdb.DuckDBPyConnection) -> None:
        self.js = js
        self.con = con

    def handler(self, consumer: str) -> Callable:
        async def handle(event: AnyEvent, meta: Msg.Metadata) -> list[Event]:
            return self.on_event(event, consumer, meta.sequence.stream)

        return handle

    def on_event(self, event: AnyEvent, consumer: str, sequence: int) -> list[Event]:
        """Apply a source event once; return the ledger.* events to publish (again, on a redelivery)."""
        if ledger.already_applied(self.con, event.event_id):
            # Applied before; the publish may not have happened: send the outbox again.
            return [decode(raw) for raw in ledger.outbox(self.con, event.event_id)]
        self.con.begin()
        try:
            produced = self.apply(event)
            ledger.mark_applied(self.con, event.event_id, consumer, sequence)
            self.con.commit()
        except BaseException:
            self.con.rollback()
            raise
        return produced

    def apply(self, event: AnyEvent) -> list[Event]:
        """Write one source event's effect; return the ledger.* events it produced."""
        con = self.con
        match event:
            case AccountConfigured():
                con.execute(
                    """INSERT INTO accounts (account_id, rate_millicredits_per_minute, text_price_millicredits,
                           timezone, balance_millicredits, daily_voice_cap_s, per_call_max_s)
                       VALUES (?, ?, ?, ?, 0, ?, ?) ON CONFLICT (account_id) DO UPDATE SET
                       rate_millicredits_per_minute = excluded.rate_millicredits_per_minute,
                       text_price_millicredits = excluded.text_price_millicredits,
                       timezone = excluded.timezone,
                       daily_voice_cap_s = excluded.daily_voice_cap_s,
                       per_call_max_s = excluded.per_call_max_s""",
                    [
                        event.account_id,
                        event.rate_millicredits_per_minute,
                        event.text_price_millicredits,
                        event.timezone,
                        event.daily_voice_cap_s,
                        event.per_call_max_s,
                    ],
                )
            case AccountCredited():
                balance = self._add_to_balance(event.account_id, event.amount_millicredits, create=True)
                entry = LedgerCredited(
                    event_id=derived_id(event.event_id, "credited"),
                    occurred_at=event.occurred_at,
                    account_id=event.account_id,
                    amount_millicredits=event.amount_millicredits,
                    balance_millicredits=balance,
                    reference=event.reference,
                )
                self._write_entry(entry, event.event_id, "credited", None, None)
                return [entry]
            case CallAccepted():
                con.execute(
                    "INSERT INTO calls (call_id, account_id, number, agent_id, accepted_at, rate_millicredits_per_minute,"
                    " text_price_millicredits) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    [
                        event.call_id,
                        event.account_id,
                        event.number,
                        event.agent_id,
                        event.occurred_at,
                        event.rate_millicredits_per_minute,
                        event.text_price_millicredits,
                    ],
                )
                if event.hold_id:
                    return self._record_hold(event)
            case CallRejected():
                con.execute(
                    "INSERT INTO calls (call_id, account_id, number, accepted_at, status) "
                    "VALUES (?, '', ?, ?, 'rejected') ON CONFLICT DO NOTHING",
                    [event.call_id, event.number, event.occurred_at],
                )
                return self._release(event)
            case CallMissed():
                return self._release(event)
            case CallAnswered():
                con.execute(
                    "UPDATE calls SET answered_at = coalesce(answered_at, ?) WHERE call_id = ?",
                    [event.occurred_at, event.call_id],
                )
            case CallAgentReplied() | CallEnded():
                return self._charge(event)
        return []

    def _charge(self, event: CallAgentReplied | CallEnded) -> list[Event]:
        """Each source event posts its own part of a call's charge, whatever the order they
        arrive in: the agent's responses (text) when replied, the voice when ended."""
        row = self.con.execute(
            """SELECT c.account_id, c.status,
                      coalesce(c.rate_millicredits_per_minute, a.rate_millicredits_per_minute),
                      coalesce(c.text_price_millicredits, a.text_price_millicredits)
               FROM calls c LEFT JOIN accounts a USING (account_id) WHERE c.call_id = ?""",
            [event.call_id],
        ).fetchall()
        if not row:
            raise UnknownCall(f"{event.call_id} has not been admitted (yet)")
        account_id, status, rate, text_price = row[0]
        if status == "rejected":
            log.info("call_not_admitted_no_charge")
            return []
        if rate is None:
            raise UnknownAccount(f"account {account_id} is not configured (yet)")
        if isinstance(event, CallAgentReplied):
            self.con.execute("UPDATE calls SET responses = responses + ? WHERE call_id = ?", [event.responses, event.call_id])
            charge = Charge(charged_s=0, voice_millicredits=0, text_millicredits=event.responses * text_price)
            if not charge.total_millicredits:
                return []
        else:
            charge = rate_call(duration_ms=event.duration_ms, silent_ms=event.silent_ms, rate_millicredits_per_minute=rate)
        balance = self._add_to_balance(account_id, -charge.total_millicredits, create=True)
        if isinstance(event, CallEnded):
            self.con.execute("UPDATE holds SET status = 'posted' WHERE call_id = ? AND status = 'open'", [event.call_id])
            self.con.execute("UPDATE calls SET ended = true WHERE call_id = ?", [event.call_id])
        entry = LedgerCharged(
            event_id=derived_id(event.event_id, "charged"),
            occurred_at=event.occurred_at,
            account_id=account_id,
            amount_millicredits=charge.total_millicredits,
            balance_millicredits=balance,
            call_id=event.call_id,
            number=event.number,
            charged_s=charge.charged_s,
            voice_millicredits=charge.voice_millicredits,
            text_millicredits=charge.text_millicredits,
        )
        self._write_entry(entry, event.event_id, "charged", event.call_id, event.number, charge)
        log.info("call_charged", account_id=account_id, millicredits=charge.total_millicredits, charged_s=charge.charged_s)
        return [entry]

    # -- holds: reserve at admission, post on end, release on rejection or miss ------

    def hold(self, command: HoldCredit) -> Reply:
        """The gatekeeper's request to reserve a call's first minute (idempotent by call_id)."""
        existing = self.con.execute(
            "SELECT hold_id, amount_millicredits FROM holds WHERE call_id = ?", [command.call_id]
        ).fetchall()
        if existing:
            hold_id, amount = existing[0]
            return Reply(ok=True, hold=HoldView(hold_id=hold_id, amount_millicredits=amount, max_duration_s=None))
        row = self.con.execute(
            """SELECT a.rate_millicredits_per_minute, a.balance_millicredits, a.per_call_max_s, a.daily_voice_cap_s,
                      a.timezone,
                      (SELECT coalesce(sum(amount_millicredits), 0) FROM holds h
                        WHERE h.account_id = a.account_id AND h.status = 'open')
               FROM accounts a WHERE a.account_id = ?""",
            [command.account_id],
        ).fetchall()
        if not row:
            return Reply(ok=False, code="insufficient_credits", message=f"account {command.account_id} has no credit yet")
        rate, balance, per_call_max_s, daily_cap_s, tz, open_holds = row[0]
        grant = decide_hold(
            rate_millicredits_per_minute=rate,
            balance_millicredits=balance,
            open_holds_millicredits=open_holds,
            per_call_max_s=per_call_max_s,
            daily_voice_cap_s=daily_cap_s,
            voice_s_today=self._voice_seconds_today(command.account_id, tz) if daily_cap_s is not None else 0,
        )
        if isinstance(grant, HoldRefusal):
            log.info("hold_refused", account_id=command.account_id, reason=grant.reason)
            return Reply(ok=False, code=grant.reason, message=f"hold refused: {grant.reason}")
        hold_id = f"hold_{command.call_id}"
        self.con.execute(
            "INSERT INTO holds VALUES (?, ?, ?, ?, 'open')",
            [hold_id, command.call_id, command.account_id, grant.amount_millicredits],
        )
        return Reply(
            ok=True,
            hold=HoldView(hold_id=hold_id, amount_millicredits=grant.amount_millicredits, max_duration_s=grant.max_duration_s),
        )

    # -- calls in progress: extend holds or cut off --------------------------------

    def supervise(self, now: datetime) -> list[Event]:
        """Extend the holds of running calls before they run dry; order call.cutoff when an
        account cannot cover the next minute or a cap is reached."""
        rows = self.con.execute(
            """SELECT c.call_id, c.account_id, c.number, epoch(c.answered_at), h.hold_id, h.amount_millicredits
               FROM calls c JOIN holds h USING (call_id)
               WHERE c.answered_at IS NOT NULL AND NOT c.ended AND c.cut_off IS NULL AND h.status = 'open'"""
        ).fetchall()
        if not rows:
            return []
        calls = [RunningCall(call_id, account_id, answered, held) for call_id, account_id, _, answered, _, held in rows]
        limits = {account_id: self._limits(account_id) for account_id in {c.account_id for c in calls}}
        numbers = {call_id: (number, hold_id) for call_id, _, number, _, hold_id, _ in rows}
        produced: list[Event] = []
        for action in supervise(calls, limits, now.timestamp()):
            number, hold_id = numbers[action.call_id]
            if isinstance(action, Extend):
                self.con.execute(
                    "UPDATE holds SET amount_millicredits = amount_millicredits + ? WHERE hold_id = ?",
                    [action.amount_millicredits, hold_id],
                )
                log.info("hold_extended", call_id=action.call_id, millicredits=action.amount_millicredits)
            else:
                self.con.execute("UPDATE calls SET cut_off = ? WHERE call_id = ?", [action.reason, action.call_id])
                produced.append(
                    CallCutoff(
                        event_id=f"cutoff_{action.call_id}",
                        occurred_at=timestamp(now),
                        call_id=action.call_id,
                        number=number,
                        reason=action.reason,
                    )
                )
                log.warning("call_cutoff", call_id=action.call_id, reason=action.reason)
        return produced

    def _limits(self, account_id: str) -> AccountLimits:
        rate, balance, per_call_max_s, daily_cap_s, tz, open_holds = self.con.execute(
            """SELECT a.rate_millicredits_per_minute, a.balance_millicredits, a.per_call_max_s, a.daily_voice_cap_s,
                      a.timezone,
                      (SELECT coalesce(sum(amount_millicredits), 0) FROM holds h
                        WHERE h.account_id = a.account_id AND h.status = 'open')
               FROM accounts a WHERE a.account_id = ?""",
            [account_id],
        ).fetchall()[0]
        return AccountLimits(
            rate_millicredits_per_minute=rate,
            available_millicredits=balance - open_holds,
            per_call_max_s=per_call_max_s,
            daily_voice_cap_s=daily_cap_s,
            voice_s_today=self._voice_seconds_today(account_id, tz) if daily_cap_s is not None else 0,
        )

    def _voice_seconds_today(self, account_id: str, tz: str) -> int:
        return self.con.execute(
            """SELECT coalesce(sum(charged_s), 0) FROM ledger
               WHERE kind = 'charged' AND account_id = ?
                 AND CAST(timezone(?, occurred_at) AS DATE) = CAST(timezone(?, now()) AS DATE)""",
            [account_id, tz, tz],
        ).fetchall()[0][0]

    def _record_hold(self, accepted: CallAccepted) -> list[Event]:
        """The ledger's record of a hold comes from call.accepted, so a replay rebuilds it."""
        rate = accepted.rate_millicredits_per_minute
        if rate is None:  # an event from before call.accepted carried the prices
            known = self.con.execute(
                "SELECT rate_millicredits_per_minute FROM accounts WHERE account_id = ?", [accepted.account_id]
            ).fetchall()
            if not known:
                raise UnknownAccount(f"account {accepted.account_id} is not configured (yet)")
            rate = known[0][0]
        self._add_to_balance(accepted.account_id, 0, create=True)  # its settings may come later
        amount = round_half_up_div(rate * 60, 60)
        self.con.execute(
            "INSERT INTO holds VALUES (?, ?, ?, ?, 'open') ON CONFLICT DO NOTHING",
            [accepted.hold_id, accepted.call_id, accepted.account_id, amount],
        )
        balance = self._balance(accepted.account_id)
        entry = LedgerHeld(
            event_id=derived_id(accepted.event_id, "held"),
            occurred_at=accepted.occurred_at,
            account_id=accepted.account_id,
            amount_millicredits=amount,
            balance_millicredits=balance,
            call_id=accepted.call_id,
            hold_id=accepted.hold_id,
        )
        self._write_entry(entry, accepted.event_id, "held", accepted.call_id, accepted.number)
        return [entry]

    def _release(self, event: CallRejected | CallMissed) -> list[Event]:
        row = self.con.execute(
            "SELECT hold_id, account_id, amount_millicredits FROM holds WHERE call_id = ? AND status = 'open'",
            [event.call_id],
        ).fetchall()
        if not row:
            return []
        hold_id, account_id, amount = row[0]
        self.con.execute("UPDATE holds SET status = 'released' WHERE hold_id = ?", [hold_id])
        entry = LedgerReleased(
            event_id=derived_id(event.event_id, "released"),
            occurred_at=event.occurred_at,
            account_id=account_id,
            amount_millicredits=amount,
            balance_millicredits=self._balance(account_id),
            call_id=event.call_id,
            hold_id=hold_id,
        )
        self._write_entry(entry, event.event_id, "released", event.call_id, event.number)
        return [entry]

    def _balance(self, account_id: str) -> int:
        return self.con.execute(
            "SELECT balance_millicredits FROM accounts WHERE account_id = ?", [account_id]
        ).fetchall()[0][0]

    def _add_to_balance(self, account_id: str, delta: int, *, create: bool = False) -> int:
        if create:
            self.con.execute(
                "INSERT INTO accounts (account_id, rate_millicredits_per_minute, text_price_millicredits, timezone) "
                "VALUES (?, 30000, 0, 'UTC') ON CONFLICT DO NOTHING",
                [account_id],
            )
        return self.con.execute(
            "UPDATE accounts SET balance_millicredits = balance_millicredits + ? WHERE account_id = ? "
            "RETURNING balance_millicredits",
            [delta, account_id],
        ).fetchall()[0][0]

    def _write_entry(self, entry, source_id, kind, call_id, number, charge=None) -> None:  # noqa: ANN001
        self.con.execute(
            "INSERT INTO ledger VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                entry.event_id,
                source_id,
                kind,
                entry.account_id,
                call_id,
                number,
                entry.amount_millicredits,
                entry.balance_millicredits,
                charge.charged_s if charge else None,
                charge.voice_millicredits if charge else None,
                charge.text_millicredits if charge else None,
                entry.occurred_at,
                encode(entry).decode(),
            ],
        )


async def wire(broker: NatsBroker, js: JetStreamContext, settings: MeterSettings):
    con = ledger.connect(Path(settings.callplane_data_dir) / "meter" / "ledger.duckdb")
    meter = Meter(js, con)
    for durable in ("meter-calls", "meter-accounts"):
        consume(broker, topology.consumer(durable), meter.handler(durable))

    serve_commands(broker, "meter", meter.hold, accepts=(HoldCredit,))

    async def supervise_forever() -> None:
        while True:
            await asyncio.sleep(settings.supervise_ms / 1000)
            try:
                cutoffs = meter.supervise(datetime.now(UTC))
                if cutoffs:
                    await publish_all(js, cutoffs)
            except Exception:  # noqa: BLE001 - one bad round must not stop supervision
                log.exception("supervise_failed")

    supervisor = asyncio.create_task(supervise_forever())
    schedule = SnapshotSchedule(settings.snapshot_cron)  # a bad SNAPSHOT_CRON fails start-up here
    snapshots_stop = asyncio.Event()
    snapshotter = asyncio.create_task(
        run_snapshots(
            con, snapshot_dir(settings.callplane_data_dir), schedule, stop_event=snapshots_stop, keep=settings.snapshot_keep
        )
    )

    async def stop() -> None:
        supervisor.cancel()
        snapshots_stop.set()
        await snapshotter  # a snapshot in progress reads through a cursor: let it finish before closing
        con.close()

    return stop

