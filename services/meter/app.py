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
from schemas import AnyEvent, Event, Reply, decode
from schemas.commands import HoldCredit, HoldCredits, HoldView

from . import ledger
from .config import MeterSettings
from .core import HoldGrant, HoldRefusal
from .snapshots import SnapshotSchedule, run_snapshots, snapshot_dir

log = structlog.get_logger()


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Meter:
    """The meter's adapter: feeds source events and hold requests to the books in memory,
    and commits their changes to the ledger in groups (one transaction for every change made
    while the previous one was being written); a handler returns, and its input is acked,
    only once its change is committed."""

    def __init__(
        self, js: JetStreamContext | None, con: duckdb.DuckDBPyConnection, *, clock: Callable[[], datetime] = _utc_now
    ) -> None:
        self.js = js
        self.con = con
        self.clock = clock
        self.books = ledger.load(con)
        self._waiting: list[asyncio.Future] = []
        self._flush_soon: asyncio.Handle | None = None

    def handler(self, consumer: str) -> Callable:
        async def handle(event: AnyEvent, meta: Msg.Metadata) -> list[Event]:
            produced = self.apply(event, consumer, meta.sequence.stream)
            await self.commit()
            return produced

        return handle

    # -- source events ---------------------------------------------------------------

    def apply(self, event: AnyEvent, consumer: str, sequence: int) -> list[Event]:
        """Apply a source event once (in memory, committed by the next flush); return the
        ledger.* events it produced, or, on a redelivery, the ones it produced the first time
        (the publish may not have happened)."""
        produced = self.books.apply(event, consumer, sequence)
        if produced is not None:
            return produced
        unsaved = self.books.unsaved_outbox(event.event_id)
        if unsaved is not None:
            return unsaved
        return [decode(raw) for raw in ledger.outbox(self.con, event.event_id)]

    def on_event(self, event: AnyEvent, consumer: str, sequence: int) -> list[Event]:
        """Apply one source event and commit it (for tools and tests; the service batches)."""
        produced = self.apply(event, consumer, sequence)
        self.flush()
        return produced

    # -- commits -----------------------------------------------------------------------

    def flush(self) -> None:
        """Commit every change applied so far, in one transaction. If that fails, the books
        are loaded again from the database: memory never runs ahead of what is stored."""
        if not self.books.pending:
            return
        batch = self.books.take_pending()
        try:
            ledger.write(self.con, batch)
        except BaseException:
            self.books = ledger.load(self.con)
            raise
        self.books.committed(batch)

    async def commit(self) -> None:
        """Return once everything applied so far is committed. Callers in the same turn of
        the event loop share one commit; raises if it failed."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiting.append(future)
        if self._flush_soon is None:
            self._flush_soon = loop.call_soon(self._flush_for_waiting)
        await future

    def _flush_for_waiting(self) -> None:
        waiting, self._waiting, self._flush_soon = self._waiting, [], None
        try:
            self.flush()
        except Exception as exc:  # noqa: BLE001 - every waiter gets the error (their inputs are retried)
            log.error("ledger_commit_failed", waiting=len(waiting), exc_info=exc)
            for future in waiting:
                if not future.done():
                    future.set_exception(LedgerUnavailable(f"ledger commit failed: {exc!r}"))
            return
        for future in waiting:
            if not future.done():
                future.set_result(None)

    # -- holds: the gatekeeper's request/reply -------------------------------------------

    async def serve_holds(self, command: HoldCredit | HoldCredits) -> Reply:
        """Answer `hold_credit` or `hold_credits` once the holds granted are committed."""
        requests = command.requests if isinstance(command, HoldCredits) else [command]
        replies = [self.hold(request) for request in requests]
        try:
            await self.commit()
        except LedgerUnavailable:
            refused = Reply(ok=False, code="unavailable", message="the ledger could not record the hold")
            replies = [refused] * len(replies)
        return Reply(ok=True, replies=replies) if isinstance(command, HoldCredits) else replies[0]

    def hold(self, command: HoldCredit) -> Reply:
        """Reserve a call's first minute (idempotent by call_id); committed by the next flush."""
        outcome = self.books.hold(command.call_id, command.account_id, now=self.clock())
        match outcome:
            case HoldRefusal(reason=reason):
                log.info("hold_refused", call_id=command.call_id, account_id=command.account_id, reason=reason)
                return Reply(ok=False, code=reason, message=f"hold refused: {reason}")
            case HoldGrant():
                view = HoldView(hold_id=f"hold_{command.call_id}", amount_millicredits=outcome.amount_millicredits,
                                max_duration_s=outcome.max_duration_s)  # fmt: skip
            case _:  # a retry: the hold granted before
                view = HoldView(hold_id=outcome.hold_id, amount_millicredits=outcome.amount, max_duration_s=None)
        return Reply(ok=True, hold=view)

    # -- calls in progress -----------------------------------------------------------------

    def supervise(self, now: datetime) -> list[Event]:
        """Extend running calls' holds or order call.cutoff; release holds of calls that never
        got going. Committed by the next flush; publish what it returns after that."""
        return [*self.books.supervise(now), *self.books.expire_holds(now)]


class LedgerUnavailable(RuntimeError):
    """The ledger could not commit: the inputs waiting for it are retried."""


async def wire(broker: NatsBroker, js: JetStreamContext, settings: MeterSettings):
    con = ledger.connect(Path(settings.callplane_data_dir) / "meter" / "ledger.duckdb")
    meter = Meter(js, con)
    for durable in ("meter-calls", "meter-accounts"):
        consume(broker, topology.consumer(durable), meter.handler(durable))

    serve_commands(broker, "meter", meter.serve_holds, accepts=(HoldCredit, HoldCredits))

    async def supervise_forever() -> None:
        while True:
            await asyncio.sleep(settings.supervise_ms / 1000)
            try:
                orders = meter.supervise(meter.clock())
                if orders:
                    await meter.commit()
                    await publish_all(js, orders)
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

