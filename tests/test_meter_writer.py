"""The meter's ledger writer process: the same ledger, books and lookups as a ledger written
in the meter's own process; a refused commit rolls back and says why; a second writer of
the same file is refused with the reason; snapshots come from the writer; and a meter that
dies takes its writer with it, so the file can be opened again at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest

from services.meter import ledger
from services.meter.app import Meter
from services.meter.ledger import canonical_export
from services.meter.snapshots import open_snapshot
from services.meter.writer import LedgerProcess, LedgerWriterError
from tests.unit.test_meter_books import state, stream

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def writer(tmp_path: Path):  # noqa: ANN201
    process = LedgerProcess(tmp_path / "ledger.duckdb")
    yield process
    process.close()


async def test_the_writer_process_writes_and_loads_what_the_in_process_ledger_does(writer: LedgerProcess) -> None:
    events = stream(40, seed=5)
    here, there = Meter(ledger.connect(":memory:")), Meter(writer)
    for sequence, event in enumerate(events, 1):
        assert here.apply(event, "meter-calls", sequence) == there.apply(event, "meter-calls", sequence)
        if sequence % 9 == 0:
            here.flush()
            await there.commit()
    here.flush()
    await there.commit()
    assert state(Meter(writer)) == state(there) == state(here)  # the books loaded back through the pipe
    ended = next(e for e in events if type(e).__name__ == "CallEnded")
    assert writer.find_call(ended.call_id) == ledger.call_from_row(ledger.find_call_row(here.con, ended.call_id))
    assert writer.find_call("no_such_call") is None
    assert writer.outbox(ended.event_id) == ledger.outbox(here.con, ended.event_id) != []
    writer.close()
    with duckdb.connect(str(writer.path), read_only=True) as con:
        assert canonical_export(con) == canonical_export(here.con)


async def test_a_refused_commit_is_rolled_back_and_says_why(writer: LedgerProcess) -> None:
    meter = Meter(writer)
    for sequence, event in enumerate(stream(3), 1):
        meter.apply(event, "meter-calls", sequence)
    batch = meter.books.take_pending()
    await writer.write(batch)
    with pytest.raises(LedgerWriterError, match="ledger commit failed.*[Dd]uplicate key"):
        await writer.write(batch)  # the same rows again: primary keys refuse them, nothing is written
    assert state(Meter(writer))[4] == frozenset(row[0] for row in batch.applied)
    assert Meter(writer).books.applied == meter.books.applied


def test_a_second_writer_of_the_same_file_is_refused_with_the_reason(writer: LedgerProcess) -> None:
    started = time.monotonic()
    with pytest.raises(LedgerWriterError, match="could not open the ledger.*lock"):
        LedgerProcess(writer.path, lock_wait_s=0.3)
    assert time.monotonic() - started < 10


def test_the_writer_writes_the_snapshots(writer: LedgerProcess, tmp_path: Path) -> None:
    meter = Meter(writer)
    events = stream(10)
    for sequence, event in enumerate(events, 1):
        meter.apply(event, "meter-calls", sequence)
    writer.write_now(meter.books.take_pending())
    path = writer.snapshot(tmp_path / "snaps", now=datetime(2026, 12, 5, tzinfo=UTC), keep=2)
    assert open_snapshot(path).position == {"meter-calls": len(events)}
    with duckdb.connect() as con:  # another process's view: the Parquet files, while the writer runs
        [(charges,)] = con.execute(f"SELECT count(*) FROM read_parquet('{path}/ledger.parquet') WHERE kind = 'charged'").fetchall()
    assert charges == sum(1 for e in events if type(e).__name__ in ("CallEnded", "CallAgentReplied"))


def test_a_meter_that_dies_takes_its_writer_with_it(tmp_path: Path) -> None:
    """SIGKILL the meter's process while its writer holds the file: the file opens again
    within moments (on Linux the kernel kills the writer with it; elsewhere it exits when the
    pipes close)."""
    database = tmp_path / "ledger.duckdb"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from services.meter.writer import LedgerProcess
        if __name__ == "__main__":
            writer = LedgerProcess({str(database)!r})
            print("ready", flush=True)
            time.sleep(60)
    """)
    meter = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    meter.stdout.readline()  # the writer is up
    with pytest.raises(duckdb.IOException, match="lock"):
        duckdb.connect(str(database))
    meter.send_signal(signal.SIGKILL)
    meter.wait()
    started = time.monotonic()
    ledger.when_unlocked(duckdb.connect, database, wait_s=5).close()
    assert time.monotonic() - started < 5


def test_a_writer_that_died_is_started_again_by_the_next_request(writer: LedgerProcess) -> None:
    meter = Meter(writer)
    events = stream(6)
    for sequence, event in enumerate(events[:10], 1):
        meter.apply(event, "meter-calls", sequence)
    meter.flush()
    before = state(meter)
    writer._process.kill()  # as the kernel's OOM killer would
    writer._process.join()
    assert state(Meter(writer)) == before  # loaded by a new writer: nothing committed was lost
    for sequence, event in enumerate(events[10:], 11):
        meter.apply(event, "meter-calls", sequence)
    meter.flush()
    assert Meter(writer).books.applied == {e.event_id for e in events}


def test_the_writer_leaves_stopping_to_the_meter(writer: LedgerProcess) -> None:
    """systemd stops a unit by sending SIGTERM to all its processes, a terminal's Ctrl-C goes
    to the whole process group: the writer keeps serving until the meter closes its pipes."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        os.kill(writer._process.pid, sig)
    time.sleep(0.2)
    assert writer._process.is_alive()
    meter = Meter(writer)
    for sequence, event in enumerate(stream(2), 1):
        meter.apply(event, "meter-calls", sequence)
    meter.flush()
    writer.close()
    assert writer._process.exitcode == 0
