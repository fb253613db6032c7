"""Meter adapter: call.* and account.* in, DuckDB ledger and ledger.* events out."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import structlog
from faststream.nats import NatsBroker
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from callplane import topology
from callplane.broker import consume_batches, publish_all
from callplane.commands import serve_commands
from schemas import AnyEvent, Event, Reply, decode
from schemas.commands import HoldCredit, HoldCredits, HoldView

from . import ledger
from .config import MeterSettings
from .books import Batch, Books, UnknownAccount, UnknownCall
from .core import HoldGrant, HoldRefusal
from .snapshots import SnapshotSchedule, run_snapshots, snapshot_dir
from .writer import LedgerProcess

log = structlog.get_logger()


HOLDS_AT_ONCE = 256  # hold requests handled at once (waiting for a shared commit)
CONSUMER_WINDOW = 2048  # messages in flight per durable at most (the runtime may allow fewer)
# Batches handled at once per durable: those gathered while the writer commits are applied
# and join the next commit, so commits stay few and large (each costs ~3 ms however small).
# bench/meter.py, 50,000 calls: 20,059-20,608 calls/s with 8, 18,226-21,019 with 2.
BATCHES_AT_ONCE = 8
RELOAD_RETRY_S = 1.0  # the books could not be loaded again (the ledger writer unreachable): try again


def _utc_now() -> datetime:
    return datetime.now(UTC)


class InProcess:
    """The ledger in this process (tools, tests, `callplane ledger rebuild`): commits from the
    event loop run in a worker thread on a cursor of their own. The service uses the writer
    process instead (`writer.LedgerProcess`, the same operations)."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self.con = con
        self._cursor = con.cursor()  # the worker thread's own connection to the database

    def load(self) -> Books:
        return ledger.load(self.con)

    def outbox(self, source_event_id: str) -> list[str]:
        return ledger.outbox(self.con, source_event_id)

    async def write(self, batch: Batch) -> None:
        await asyncio.to_thread(ledger.write, self._cursor, batch)

    def write_now(self, batch: Batch) -> None:
        ledger.write(self.con, batch)

    def close(self) -> None:
        self._cursor.close()


class Meter:
    """The meter's adapter: feeds source events and hold requests to the books in memory,
    and commits their changes to the ledger in groups. While one group is written (by the
    ledger writer process, or a worker thread in tools) the next one gathers; a handler
    returns, and its input is acked, only once its change is committed."""

    def __init__(
        self, store: duckdb.DuckDBPyConnection | InProcess | LedgerProcess, *, clock: Callable[[], datetime] = _utc_now
    ) -> None:
        self.store = InProcess(store) if isinstance(store, duckdb.DuckDBPyConnection) else store
        self.con = getattr(self.store, "con", None)  # tools and tests read an in-process ledger
        self.clock = clock
        self.books = self.store.load()
        self._waiting: list[asyncio.Future] = []  # for the next commit
        self._writer: asyncio.Task | None = None
        self._writing: Batch | None = None  # the group being written now
        self._stale = False  # memory may not match what the database will hold: load again
        # Supervision's orders and ledger.* events, committed and not yet published.
        self._unpublished: list[Event] = list(self.books.cutoffs_ordered(clock()))

    def handler(self, consumer: str) -> Callable:
        """The durable's batch handler: apply each event, commit them together, return each
        one's ledger.* events (or the error of an event that must wait, e.g. a call's end
        before its admission; that one is retried alone)."""

        async def handle(items: list[tuple[AnyEvent, Msg.Metadata]]) -> list[list[Event] | Exception]:
            results: list[list[Event] | Exception] = []
            for event, meta in items:
                try:
                    results.append(self.apply(event, consumer, meta.sequence.stream))
                except (UnknownCall, UnknownAccount) as exc:
                    log.info("event_waits_for_an_earlier_one", event_id=event.event_id, reason=str(exc))
                    results.append(exc)
                except LedgerUnavailable:
                    raise  # the books are being loaded again: the batch is retried
                except Exception as exc:  # a bug half-way through an event: the books may be off
                    self._distrust(exc)
                    raise
            await self.commit()
            return results

        return handle

    # -- source events ---------------------------------------------------------------

    def apply(self, event: AnyEvent, consumer: str, sequence: int) -> list[Event]:
        """Apply a source event once (in memory, committed with the next group); return the
        ledger.* events it produced, or, on a redelivery, the ones it produced the first time
        (the publish may not have happened)."""
        if self._stale:
            raise LedgerUnavailable("the books are being loaded again")
        produced = self.books.apply(event, consumer, sequence)
        if produced is not None:
            return produced
        for outbox in (self.books.pending.outbox, self._writing.outbox if self._writing else {}):
            if event.event_id in outbox:
                return outbox[event.event_id]
        return [decode(raw) for raw in self.store.outbox(event.event_id)]

    def on_event(self, event: AnyEvent, consumer: str, sequence: int) -> list[Event]:
        """Apply one source event and commit it (for tools and tests; the service batches)."""
        produced = self.apply(event, consumer, sequence)
        self.flush()
        return produced

    # -- commits -----------------------------------------------------------------------

    def flush(self) -> None:
        """Commit every change applied so far, here and now (tools and tests)."""
        if self.books.pending:
            batch = self.books.take_pending()
            try:
                self.store.write_now(batch)
            except BaseException:
                self._reload("ledger commit failed")
                raise
            self.books.committed(batch)

    def _reload(self, why: str) -> None:
        """Memory never runs ahead of the database: load the books again, dropping whatever
        was applied since the last commit, and fail everyone waiting for it (their inputs are
        retried, their holds refused)."""
        waiting, self._waiting = self._waiting, []
        for future in waiting:
            if not future.done():
                future.set_exception(LedgerUnavailable(why))
        self._stale = True  # nothing is applied until the books are loaded again
        self.books = self.store.load()
        self._stale = False

    def _distrust(self, exc: Exception) -> None:
        """An event failed half-applied: load the books again once the commit being written
        (if any) is done; until then nothing is applied."""
        log.error("books_reloaded_after_a_failed_event", exc_info=exc)
        self._stale = True
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_groups())

    async def commit(self) -> None:
        """Return once everything applied so far is committed; raises LedgerUnavailable if
        that failed. Callers share commits: all who wait while one group is being written
        go into the next."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_groups())
        await future

    async def _write_groups(self) -> None:
        while self._waiting or self._stale:
            if self._stale:
                try:
                    self._reload("an event failed half-applied, or a commit")
                except Exception as exc:  # noqa: BLE001 - the ledger is unreachable: try again shortly
                    log.error("books_not_loaded_will_retry", retry_s=RELOAD_RETRY_S, exc_info=exc)
                    await asyncio.sleep(RELOAD_RETRY_S)
                continue
            waiting, self._waiting = self._waiting, []
            self._writing = batch = self.books.take_pending()
            try:
                await self.store.write(batch)
            except Exception as exc:  # noqa: BLE001 - every waiter is told; their inputs are retried
                self._writing = None
                self._waiting = waiting + self._waiting
                log.error("ledger_commit_failed", waiting=len(self._waiting), exc_info=exc)
                with contextlib.suppress(Exception):  # if loading fails too, the loop above retries it
                    self._reload(f"ledger commit failed: {exc!r}")
                continue
            self._writing = None
            self.books.committed(batch)
            for future in waiting:
                if not future.done():
                    future.set_result(None)

    # -- holds: the gatekeeper's request/reply -------------------------------------------

    async def serve_holds(self, command: HoldCredit | HoldCredits) -> Reply:
        """Answer `hold_credit` or `hold_credits` once the holds granted are committed."""
        requests = command.requests if isinstance(command, HoldCredits) else [command]
        try:
            if self._stale:
                raise LedgerUnavailable("the books are being loaded again")
            replies = [self.hold(request) for request in requests]
            await self.commit()
        except LedgerUnavailable:
            refused = Reply(ok=False, code="unavailable", message="the ledger could not record the hold")
            replies = [refused] * len(requests)
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

    async def supervise_round(self, now: datetime, publish: Callable[[list[Event]], Awaitable[object]]) -> None:
        """Supervise, commit, then publish what that ordered (after the commit: a reservation
        is durable before it counts). What could not be published is published with the next
        round: a committed call.cutoff is never ordered again, so it must not be dropped."""
        orders = self.supervise(now)
        if self.books.pending:  # extensions too
            await self.commit()
        self._unpublished += orders
        if self._unpublished:
            orders, self._unpublished = self._unpublished, []
            try:
                await publish(orders)
            except BaseException:
                self._unpublished[:0] = orders
                raise

    async def close(self) -> None:
        """Let a commit in progress finish, then close the ledger."""
        if self._writer is not None:
            with contextlib.suppress(Exception):
                await self._writer
        self.store.close()


class LedgerUnavailable(RuntimeError):
    """The ledger could not commit: the inputs waiting for it are retried."""


async def wire(broker: NatsBroker, js: JetStreamContext, settings: MeterSettings):
    # The DuckDB file belongs to a writer process: commits run beside the event loop, not in turn with it.
    store = LedgerProcess(Path(settings.callplane_data_dir) / "meter" / "ledger.duckdb")
    meter = Meter(store)
    for durable in ("meter-calls", "meter-accounts"):
        # A wide window: every message in flight can join the next commit, which costs ~1 ms
        # per table however few rows it has (bench/README.md, the meter).
        # Batches are applied in memory while the writer commits: all that wait join the next commit.
        consume_batches(
            broker, topology.consumer(durable), meter.handler(durable), batch=CONSUMER_WINDOW, overlap=BATCHES_AT_ONCE
        )

    # Holds are decided one by one before their first await; the commits they wait for are shared.
    serve_commands(broker, "meter", meter.serve_holds, accepts=(HoldCredit, HoldCredits), concurrency=HOLDS_AT_ONCE)

    async def supervise_forever() -> None:
        while True:
            await asyncio.sleep(settings.supervise_ms / 1000)
            try:
                await meter.supervise_round(meter.clock(), lambda orders: publish_all(js, orders))
            except Exception:  # noqa: BLE001 - one bad round must not stop supervision
                log.exception("supervise_failed")

    supervisor = asyncio.create_task(supervise_forever())
    schedule = SnapshotSchedule(settings.snapshot_cron)  # a bad SNAPSHOT_CRON fails start-up here
    snapshots_stop = asyncio.Event()
    snapshotter = asyncio.create_task(
        run_snapshots(
            store, snapshot_dir(settings.callplane_data_dir), schedule, stop_event=snapshots_stop, keep=settings.snapshot_keep
        )
    )

    async def stop() -> None:
        supervisor.cancel()
        snapshots_stop.set()
        await snapshotter  # a snapshot in progress: let it finish before closing
        await meter.close()

    return stop

