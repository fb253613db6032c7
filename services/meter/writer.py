"""The ledger writer: a process of its own that owns the meter's DuckDB file.

Why a process: inside the meter's one process, a commit written from a worker thread and
the event loop take turns instead of running side by side (DuckDB's Python client holds
the GIL while it converts rows and takes it back between the tasks of a query), so the
meter's throughput was one over the sum of both costs: with the commit in a thread the
meter billed ~13,500 calls/s at ~72 us of CPU per call, with the commit skipped ~26,700/s
at ~34 us (bench/README.md, the meter). Here the commit runs on the other core.

The meter talks to it over three pipes, each served by a thread of the writer on a cursor
of its own (DuckDB's way to share a database between threads), so none waits for another:

    commits    one batch of rows at a time, answered once committed (or with the error:
               the transaction was rolled back);
    lookups    rare and small: the books at start-up, a finished call, a source event's
               outbox (asked from the event loop and answered at once, in about 0.1 ms);
    snapshots  a Parquet snapshot (seconds on a big ledger; never holds up the others).

If the meter's process dies, the pipes close and the writer exits; the last transaction is
either committed or rolled back, never half-written (DuckDB's WAL).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import multiprocessing
import multiprocessing.connection
import signal
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import structlog

from . import ledger
from .books import Batch, Books

log = structlog.get_logger()

START_TIMEOUT_S = 60.0  # the writer opens (and may recover) the database before it answers
# A meter restarted after a crash may find the old writer still holding the file's lock for
# a moment (it is killed with the meter on Linux, and exits when the pipes close elsewhere).
LOCK_WAIT_S = 30.0


class LedgerWriterError(RuntimeError):
    """The writer refused a request or is gone; the message says what it reported."""


class LedgerProcess:
    """The meter's side of the writer process: the same operations as `InProcess`."""

    def __init__(self, path: Path | str, *, lock_wait_s: float = LOCK_WAIT_S) -> None:
        self.path = Path(path)
        self._lock_wait_s = lock_wait_s
        self._lock = threading.RLock()  # requests come from the loop and from the snapshots' thread
        self._start()

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")  # not fork: the meter runs threads and a loop
        self._commits, commits = context.Pipe()
        self._lookups, lookups = context.Pipe()
        self._snapshots, snapshots = context.Pipe()
        self._process = context.Process(
            target=_serve,
            args=(str(self.path), self._lock_wait_s, commits, lookups, snapshots),
            name="meter-ledger-writer",
            daemon=True,
        )
        self._process.start()
        for end in (commits, lookups, snapshots):
            end.close()
        if not self._lookups.poll(START_TIMEOUT_S):
            self._process.kill()
            raise LedgerWriterError(f"the ledger writer did not open {self.path} within {START_TIMEOUT_S:g} s")
        self._answer(self._lookups)  # raises what opening the file raised (e.g. locked by another process)

    def _alive(self) -> None:
        """Start the writer again if it died (killed, out of memory): the request that found it
        gone failed, the meter loaded its books again, and this one goes to the new writer."""
        with self._lock:
            if not self._process.is_alive():
                log.warning("ledger_writer_restarted", exit_code=self._process.exitcode)
                for conn in (self._commits, self._lookups, self._snapshots):
                    conn.close()
                self._start()

    # -- lookups (blocking, short) -------------------------------------------------------

    def load(self) -> Books:
        return ledger.books_from(self._lookup("load"), self.find_call)

    def find_call(self, call_id: str) -> ledger.Call | None:
        return ledger.call_from_row(self._lookup("find_call", call_id))

    def outbox(self, source_event_id: str) -> list[str]:
        return self._lookup("outbox", source_event_id)

    def snapshot(self, directory: Path, *, now: datetime, keep: int) -> Path:
        """Write a Parquet snapshot (blocking: run it in a worker thread)."""
        self._alive()
        conn = self._snapshots
        self._send(conn, (str(directory), now, keep))
        return Path(self._answer(conn))

    def _lookup(self, op: str, *args: Any) -> Any:
        self._alive()
        with self._lock:
            self._send(self._lookups, (op, *args))
            return self._answer(self._lookups)

    def _send(self, conn: multiprocessing.connection.Connection, request: object) -> None:
        """A request: bytes as they are (a batch's rows), anything else pickled."""
        try:
            conn.send_bytes(request) if isinstance(request, bytes) else conn.send(request)
        except OSError as exc:
            raise self._gone() from exc

    def _answer(self, conn: multiprocessing.connection.Connection) -> Any:
        try:
            ok, value = conn.recv()
        except (EOFError, OSError) as exc:
            raise self._gone() from exc
        if not ok:
            raise LedgerWriterError(value)
        return value

    def _gone(self) -> LedgerWriterError:
        return LedgerWriterError(f"the ledger writer is gone (exit code {self._process.exitcode})")

    # -- commits -------------------------------------------------------------------------

    async def write(self, batch: Batch) -> None:
        """Commit one batch in the writer; one at a time (the meter's writer task)."""
        conn = self._send_rows(batch)
        await _readable(conn)
        self._answer(conn)

    def write_now(self, batch: Batch) -> None:
        self._answer(self._send_rows(batch))

    def _send_rows(self, batch: Batch) -> multiprocessing.connection.Connection:
        self._alive()
        conn = self._commits
        self._send(conn, _encode_rows(batch))
        return conn

    def close(self) -> None:
        """Let the writer finish what it was asked, close the database and exit."""
        for conn in (self._commits, self._lookups, self._snapshots):
            conn.close()
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()


async def _readable(conn: multiprocessing.connection.Connection) -> None:
    if conn.poll():
        return
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(conn.fileno(), lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(conn.fileno())


_ROWS = ("ledger", "applied", "accounts", "calls", "holds", "ends")


def _encode_rows(batch: Batch) -> bytes:
    return msgspec.msgpack.encode([getattr(batch, name) for name in _ROWS])


def _decode_rows(data: bytes) -> Batch:
    tables = msgspec.msgpack.decode(data)
    return Batch(**dict(zip(_ROWS, tables, strict=True)), finished=set(), outbox={})


# -- the writer process -----------------------------------------------------------------------


def _serve(path: str, lock_wait_s: float, commits, lookups, snapshots) -> None:  # noqa: ANN001 - multiprocessing Connections
    # The meter says when to stop (it closes the pipes once its last commit is in): systemd's
    # SIGTERM to the whole unit, or a terminal's Ctrl-C to the process group, must not cut
    # the writer off under the meter while it drains.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_the_meter()
    try:
        # A crashed meter's writer may hold the lock a moment longer (a commit in flight).
        con = ledger.when_unlocked(ledger.connect, path, wait_s=lock_wait_s)
    except Exception as exc:  # noqa: BLE001 - told to the meter, which refuses to start
        lookups.send((False, f"could not open the ledger {path}: {exc}"))
        return
    # One DuckDB thread: on 2 cores its workers only compete with the meter and nats-server
    # (bench/meter.py: ~16,700 billed calls/s with one, ~14,600 with DuckDB's default).
    con.execute("SET threads = 1")
    lookups.send((True, None))
    # Not daemon threads: one still in DuckDB when the interpreter exits is unwound by force
    # through DuckDB's C++ frames, and the process aborts (SIGABRT, "exception not rethrown").
    # They end when the meter closes their pipes (or dies), and are joined before `con` closes.
    threads = [
        threading.Thread(target=_loop, args=(conn, serve, con.cursor()), name=serve.__name__)
        for conn, serve in ((lookups, _serve_lookups), (snapshots, _serve_snapshots))
    ]
    for thread in threads:
        thread.start()
    cursor = con.cursor()
    try:
        while True:
            try:
                data = commits.recv_bytes()
            except (EOFError, OSError):
                return  # the meter closed the pipe, or is gone
            try:
                ledger.write(cursor, _decode_rows(data))
                commits.send((True, None))
            except Exception as exc:  # noqa: BLE001 - rolled back: the meter loads its books again
                commits.send((False, f"ledger commit failed: {exc!r}"))
    finally:
        cursor.close()
        for thread in threads:
            thread.join(timeout=JOIN_TIMEOUT_S)
        con.close()


def _die_with_the_meter() -> None:
    """Linux: have the kernel SIGKILL this process when the meter's process dies, so a crashed
    meter never leaves its writer holding the file (an interrupted commit is rolled back)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


PR_SET_PDEATHSIG = 1
JOIN_TIMEOUT_S = 10.0  # the lookup and snapshot threads, once the meter closed their pipes


def _loop(conn, serve, cursor) -> None:  # noqa: ANN001
    try:
        while True:
            try:
                request = conn.recv()
            except (EOFError, OSError):
                return
            try:
                conn.send((True, serve(cursor, request)))
            except Exception as exc:  # noqa: BLE001 - the request failed, not the writer
                conn.send((False, f"{serve.__name__.removeprefix('_serve_')} failed: {exc!r}"))
    finally:
        cursor.close()


def _serve_lookups(cursor, request: tuple) -> Any:  # noqa: ANN001
    op, *args = request
    if op == "load":
        return ledger.load_rows(cursor)
    if op == "find_call":
        return ledger.find_call_row(cursor, *args)
    if op == "outbox":
        return ledger.outbox(cursor, *args)
    raise ValueError(f"unknown lookup {op!r}")


def _serve_snapshots(cursor, request: tuple) -> str:  # noqa: ANN001
    from .snapshots import write_snapshot

    directory, now, keep = request
    return str(write_snapshot(cursor, Path(directory), now=now, keep=keep))
