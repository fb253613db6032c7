"""Meter adapter: call.* and account.* in, DuckDB ledger and ledger.* events out."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import duckdb
import structlog
from faststream.nats import NatsBroker
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from callplane import topology
from callplane.broker import consume
from schemas import (
    AccountConfigured,
    AccountCredited,
    AnyEvent,
    CallAccepted,
    CallAgentReplied,
    CallEnded,
    Event,
    LedgerCharged,
    LedgerCredited,
    decode,
    derived_id,
    encode,
)

from . import ledger
from .config import MeterSettings
from .core import rate_call

log = structlog.get_logger()


class UnknownAccount(LookupError):
    """A call of an account whose configuration has not reached the meter yet: retried."""


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
                    """INSERT INTO accounts VALUES (?, ?, ?, ?, 0) ON CONFLICT (account_id) DO UPDATE SET
                       rate_millicredits_per_minute = excluded.rate_millicredits_per_minute,
                       text_price_millicredits = excluded.text_price_millicredits,
                       timezone = excluded.timezone""",
                    [event.account_id, event.rate_millicredits_per_minute, event.text_price_millicredits, event.timezone],
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
                    "INSERT INTO calls VALUES (?, ?, ?, ?, ?, 0) ON CONFLICT DO NOTHING",
                    [event.call_id, event.account_id, event.number, event.agent_id, event.occurred_at],
                )
            case CallAgentReplied():
                con.execute("UPDATE calls SET responses = responses + ? WHERE call_id = ?", [event.responses, event.call_id])
            case CallEnded():
                return self._charge(event)
        return []

    def _charge(self, event: CallEnded) -> list[Event]:
        row = self.con.execute(
            """SELECT c.account_id, c.responses, a.rate_millicredits_per_minute, a.text_price_millicredits
               FROM calls c LEFT JOIN accounts a USING (account_id) WHERE c.call_id = ?""",
            [event.call_id],
        ).fetchall()
        if not row:
            log.info("call_not_admitted_no_charge")
            return []
        account_id, responses, rate, text_price = row[0]
        if rate is None:
            raise UnknownAccount(f"account {account_id} is not configured (yet)")
        charge = rate_call(
            duration_ms=event.duration_ms,
            silent_ms=event.silent_ms,
            rate_millicredits_per_minute=rate,
            responses=responses,
            text_price_millicredits=text_price,
        )
        balance = self._add_to_balance(account_id, -charge.total_millicredits)
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

    def _add_to_balance(self, account_id: str, delta: int, *, create: bool = False) -> int:
        if create:
            self.con.execute(
                "INSERT INTO accounts VALUES (?, 30000, 0, 'UTC', 0) ON CONFLICT DO NOTHING", [account_id]
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

    async def stop() -> None:
        con.close()

    return stop
