"""Parquet snapshots of the ledger, for analysts, while the meter keeps writing.

DuckDB lets one process open the ledger file (PITFALLS.md), so the meter exports its
analyst tables and views to Parquet on a cron schedule and analysts query those files
from any process (`callplane ledger query`).

Layout under `<data>/meter/snapshots/`:

    snapshot-20250101T120000Z-000042/   a complete snapshot: one <table>.parquet per
        ledger.parquet ...              table or view, and manifest.json (the stream
        manifest.json                   position it reflects, written_at, row counts)
    snapshot-...-000043.tmp/            being written (or left by a crash): never read
    latest                              the name of the newest complete snapshot

A snapshot is written into a `.tmp` folder, made durable (fsync), renamed into place, and
only then named in `latest` (written to `latest.tmp`, then os.replace): a reader that
follows `latest` sees a complete snapshot or the previous one, never a half-written one.
Pruning keeps the newest `keep` snapshots and removes only older ones than `latest`'s, so
a reader of a recent snapshot keeps its files for at least `keep - 1` more cron periods.
Every table of a snapshot comes from one DuckDB transaction, together with its position:
the rows are exactly the effect of the source events up to that position (plus holds
granted over request/reply, which have no stream position).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import duckdb
import structlog

from .ledger import ENDED

log = structlog.get_logger()

LATEST = "latest"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
DEFAULT_CRON = "* * * * *"
DEFAULT_KEEP = 5

# table (file) name -> the query that exports it. The outbox copy of each ledger event
# (event_json) stays out: it is the published event, for the meter's own redelivery.
EXPORTS: dict[str, str] = {
    "ledger": "SELECT * EXCLUDE (event_json) FROM ledger",
    "call_charges": "SELECT * FROM call_charges",
    "daily_account_totals": "SELECT * FROM daily_account_totals",
    "daily_number_totals": "SELECT * FROM daily_number_totals",
    "balances": "SELECT * FROM balances",
    "open_holds": "SELECT * FROM open_holds",
    "accounts": "SELECT * FROM accounts",
    "calls": f"SELECT * REPLACE ({ENDED} AS ended) FROM calls",
    "holds": "SELECT * FROM hold_states",
}

_NAME = re.compile(r"^snapshot-(\d{8}T\d{6}Z)-(\d+)(\.tmp)?$")


def snapshot_dir(data_dir: Path | str) -> Path:
    """Where the meter writes its snapshots under CALLPLANE_DATA_DIR."""
    return Path(data_dir) / "meter" / "snapshots"


def positions(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """The last stream sequence each consumer applied: the position the ledger reflects."""
    rows = con.execute(
        "SELECT consumer, max(stream_sequence) FROM applied_events GROUP BY consumer ORDER BY consumer"
    ).fetchall()
    return {consumer: int(sequence) for consumer, sequence in rows}


# -- writing ---------------------------------------------------------------------


def write_snapshot(
    con: duckdb.DuckDBPyConnection,
    directory: Path,
    *,
    position: dict[str, int] | None = None,
    now: datetime,
    keep: int = DEFAULT_KEEP,
) -> Path:
    """Export the analyst tables to a new snapshot, point `latest` at it, prune old ones.

    `con` must not be in a transaction: the export runs in one transaction of its own, so
    all tables and the position (read from applied_events when `position` is None, the
    recommended way) are one consistent state. Returns the snapshot's folder.
    """
    if keep < 2:
        raise ValueError("keep at least 2 snapshots, so the one a reader follows is not pruned under it")
    directory.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(directory)
    name = f"snapshot-{now.astimezone(UTC):%Y%m%dT%H%M%SZ}-{_next_number(directory):06d}"
    tmp = directory / f"{name}.tmp"
    tmp.mkdir()
    try:
        tables: dict[str, dict[str, object]] = {}
        con.begin()
        try:
            if position is None:
                position = positions(con)
            for table, query in EXPORTS.items():
                file = tmp / f"{table}.parquet"
                rows = con.execute(
                    f"COPY ({_exact_integers(con, query)}) TO {_sql_string(file)} (FORMAT parquet, COMPRESSION zstd)"
                ).fetchall()[0][0]
                tables[table] = {"file": file.name, "rows": int(rows)}
        finally:
            con.rollback()  # read-only: nothing to keep, and it ends the transaction either way
        manifest = {
            "format": FORMAT_VERSION,
            "snapshot": name,
            "written_at": now.astimezone(UTC).isoformat(),
            "position": position,
            "tables": tables,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        for file in tmp.iterdir():
            _fsync(file)
        _fsync(tmp)
        final = directory / name
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(directory)
    _point_latest(directory, name)
    prune(directory, keep=keep)
    return final


def prune(directory: Path, *, keep: int = DEFAULT_KEEP) -> list[Path]:
    """Remove complete snapshots older than `latest`'s, keeping the newest `keep`."""
    current = read_latest(directory)
    if current is None:
        return []
    current_number = _number(current.name)
    snapshots = list_snapshots(directory)
    removed = []
    for path in snapshots[:-keep]:
        if _number(path.name) < current_number:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _point_latest(directory: Path, name: str) -> None:
    tmp = directory / f"{LATEST}.tmp"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / LATEST)
    _fsync(directory)


def _clean_leftovers(directory: Path) -> None:
    """Remove what a crashed write left: `.tmp` folders and a `latest.tmp` (one writer only:
    the meter that holds the DuckDB file)."""
    for path in directory.iterdir():
        if path.is_dir() and _NAME.match(path.name) and path.name.endswith(".tmp"):
            shutil.rmtree(path, ignore_errors=True)
            log.info("snapshot_leftover_removed", path=str(path))
    with contextlib.suppress(FileNotFoundError):
        (directory / f"{LATEST}.tmp").unlink()


def _next_number(directory: Path) -> int:
    numbers = [_number(p.name) for p in directory.iterdir() if _NAME.match(p.name)]
    return max(numbers, default=0) + 1


def _number(name: str) -> int:
    match = _NAME.match(name)
    return int(match.group(2)) if match else -1


def _exact_integers(con: duckdb.DuckDBPyConnection, query: str) -> str:
    """The query with its HUGEINT columns (sum() of BIGINT, e.g. balances.available_millicredits)
    cast to BIGINT: Parquet has no 128-bit integer and DuckDB would write them as DOUBLE."""
    wide = [name for name, kind, *_ in con.execute(f"DESCRIBE {query}").fetchall() if kind in ("HUGEINT", "UHUGEINT")]
    if not wide:
        return query
    quoted = ['"' + name.replace('"', '""') + '"' for name in wide]
    casts = ", ".join(f"CAST({q} AS BIGINT) AS {q}" for q in quoted)
    return f"SELECT * REPLACE ({casts}) FROM ({query})"


def _sql_string(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def _fsync(path: Path) -> None:
    """Make a file's content, or a folder's entries, durable before the rename publishes it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a folder cannot be opened on Windows: renames there are not fsynced
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- reading ---------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    path: Path
    manifest: dict

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def position(self) -> dict[str, int]:
        return self.manifest.get("position", {})

    @property
    def written_at(self) -> str:
        return self.manifest.get("written_at", "")

    def files(self) -> dict[str, Path]:
        """table name -> its Parquet file."""
        tables = self.manifest.get("tables") or {p.stem: {"file": p.name} for p in self.path.glob("*.parquet")}
        return {table: self.path / info["file"] for table, info in tables.items()}


def list_snapshots(directory: Path) -> list[Path]:
    """Complete snapshots (renamed into place, with a manifest), oldest first."""
    if not directory.is_dir():
        return []
    found = [
        p for p in directory.iterdir()
        if p.is_dir() and _NAME.match(p.name) and not p.name.endswith(".tmp") and (p / MANIFEST).is_file()
    ]
    return sorted(found, key=lambda p: _number(p.name))


def read_latest(directory: Path) -> Path | None:
    """The folder `latest` names, or None before the first snapshot."""
    try:
        name = (directory / LATEST).read_text().strip()
    except FileNotFoundError:
        return None
    if not _NAME.match(name) or name.endswith(".tmp"):
        return None
    path = directory / name
    return path if (path / MANIFEST).is_file() else None


def open_snapshot(path: Path) -> Snapshot:
    return Snapshot(path, json.loads((path / MANIFEST).read_text()))


# -- the schedule ----------------------------------------------------------------


class SnapshotSchedule:
    """When snapshots are due: a cron expression in UTC (croniter; a 6th field is seconds)."""

    def __init__(self, cron: str = DEFAULT_CRON) -> None:
        from croniter import croniter

        if not croniter.is_valid(cron):
            raise ValueError(f"not a cron expression: {cron!r}")
        self.cron = cron
        self._croniter = croniter

    def next_due(self, now: datetime) -> datetime:
        """The first time strictly after `now` that the expression matches (UTC)."""
        return self._croniter(self.cron, now.astimezone(UTC)).get_next(datetime)


class Snapshotter(Protocol):
    def snapshot(self, directory: Path, *, now: datetime, keep: int) -> Path: ...


async def run_snapshots(
    con: duckdb.DuckDBPyConnection | Snapshotter,
    directory: Path,
    cron: str | SnapshotSchedule = DEFAULT_CRON,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    stop_event: asyncio.Event | None = None,
    *,
    keep: int = DEFAULT_KEEP,
) -> None:
    """Write a snapshot each time the schedule is due, until `stop_event` is set.

    The export runs in a worker thread on its own cursor (`con.cursor()`: a separate
    connection to the same database, DuckDB's documented way to use it from another
    thread), so the event loop keeps answering hold requests and applying events while
    Parquet files are written; the cursor's transaction gives the snapshot a consistent
    view of what the loop commits meanwhile. `con` itself stays the loop's alone. Given the
    ledger writer process instead (`writer.LedgerProcess`), the writer exports it, the same
    way, on a thread and cursor of its own.

    Stop by setting `stop_event` and awaiting the task: a snapshot in progress finishes
    first (also on cancellation), so the caller can close `con` afterwards.
    """
    schedule = cron if isinstance(cron, SnapshotSchedule) else SnapshotSchedule(cron)
    stop_event = stop_event or asyncio.Event()
    if keep < 2:
        raise ValueError("SNAPSHOT_KEEP must be at least 2")
    due = schedule.next_due(clock())
    while not stop_event.is_set():
        wait = (due - clock()).total_seconds()
        if wait > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop_event.wait(), timeout=wait)
            continue  # stopped, or re-check the wall clock (the loop's timer is monotonic)
        await _snapshot_once(con, directory, clock(), keep)
        due = schedule.next_due(clock())  # a slow snapshot skips the periods it overran


async def _snapshot_once(con: duckdb.DuckDBPyConnection | Snapshotter, directory: Path, now: datetime, keep: int) -> None:
    started = time.perf_counter()
    if isinstance(con, duckdb.DuckDBPyConnection):
        cursor = con.cursor()

        def work() -> Path:
            try:
                return write_snapshot(cursor, directory, now=now, keep=keep)
            finally:
                cursor.close()

    else:  # the ledger writer process writes it, on a cursor of its own

        def work() -> Path:
            return con.snapshot(directory, now=now, keep=keep)

    job = asyncio.ensure_future(asyncio.to_thread(work))
    try:
        path = await asyncio.shield(job)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await job  # the thread still uses the database: let it finish before the caller closes it
        raise
    except Exception:  # noqa: BLE001 - a failed snapshot (disk full...) must not stop the meter
        log.exception("snapshot_failed", directory=str(directory))
        return
    log.info(
        "snapshot_written",
        path=str(path),
        position=open_snapshot(path).position,
        duration_ms=round((time.perf_counter() - started) * 1000, 1),
    )
