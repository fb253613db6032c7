"""Parquet snapshots of the meter's ledger: the analysts' views, atomic snapshots tagged with
their stream position, pruning, crash leftovers, the cron schedule, and `callplane ledger query`
from another process while the meter holds the DuckDB file and keeps writing."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import duckdb
import pytest

from callplane import ledger_cli
from services.meter import ledger, snapshots
from services.meter.snapshots import (
    EXPORTS,
    SnapshotSchedule,
    list_snapshots,
    open_snapshot,
    positions,
    prune,
    read_latest,
    run_snapshots,
    snapshot_dir,
    write_snapshot,
)

ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2025, 3, 10, 12, 0, tzinfo=UTC)


class Ledger:
    """A meter ledger filled with SQL, as the meter would have written it."""

    def __init__(self, path: Path) -> None:
        self.con = ledger.connect(path)
        self.sequence = {"meter-calls": 0, "meter-accounts": 0}
        self.calls = 0

    def applied(self, consumer: str) -> None:
        self.sequence[consumer] += 7  # other subjects interleave in the stream: gaps are normal
        self.con.execute(
            "INSERT INTO applied_events VALUES (?, ?, ?)",
            [f"evt_{consumer}_{self.sequence[consumer]}", consumer, self.sequence[consumer]],
        )

    def account(self, account_id: str, timezone: str, balance: int = 1_000_000) -> None:
        self.con.execute(
            """INSERT INTO accounts (account_id, rate_millicredits_per_minute, text_price_millicredits, timezone,
                   balance_millicredits) VALUES (?, 30000, 500, ?, ?)""",
            [account_id, timezone, balance],
        )
        self.applied("meter-accounts")

    def charge(
        self, account_id: str, number: str, at: datetime, *, charged_s: int, voice: int, text: int = 0
    ) -> str:
        self.calls += 1
        call_id = f"call_{self.calls:05d}"
        self.con.begin()
        self.con.execute(
            "INSERT INTO calls (call_id, account_id, number, agent_id, accepted_at, responses) VALUES (?, ?, ?, 'ag', ?, 0)",
            [call_id, account_id, number, at - timedelta(seconds=charged_s)],
        )
        self.con.execute(
            """INSERT INTO ledger (entry_id, source_event_id, kind, account_id, call_id, number, amount_millicredits,
                   balance_after_millicredits, charged_s, voice_millicredits, text_millicredits, occurred_at, event_json)
               VALUES (?, ?, 'charged', ?, ?, ?, ?, 0, ?, ?, ?, ?, '{}')""",
            [f"led_{call_id}", f"end_{call_id}", account_id, call_id, number, voice + text, charged_s, voice, text, at],
        )
        self.applied("meter-calls")
        self.con.commit()
        return call_id

    def hold(self, call_id: str, account_id: str, amount: int, status: str = "open") -> None:
        self.con.execute("INSERT INTO holds VALUES (?, ?, ?, ?, ?)", [f"hold_{call_id}", call_id, account_id, amount, status])


@pytest.fixture
def book(tmp_path: Path) -> Ledger:
    book = Ledger(tmp_path / "data" / "meter" / "ledger.duckdb")
    book.account("acc_waw", "Europe/Warsaw")
    book.account("acc_nyc", "America/New_York")
    # Warsaw is UTC+1 in March: 23:30 UTC on the 10th is 00:30 on the 11th there.
    book.charge("acc_waw", "+48221234567", datetime(2025, 3, 10, 12, 0, tzinfo=UTC), charged_s=60, voice=30000, text=500)
    book.charge("acc_waw", "+48221234567", datetime(2025, 3, 10, 23, 30, tzinfo=UTC), charged_s=90, voice=45000)
    book.charge("acc_waw", "+48229999999", datetime(2025, 3, 10, 22, 0, tzinfo=UTC), charged_s=120, voice=60000, text=1000)
    # New York is UTC-4 (after the March 9 DST switch): 02:00 UTC on the 11th is the 10th there.
    book.charge("acc_nyc", "+12125550100", datetime(2025, 3, 11, 2, 0, tzinfo=UTC), charged_s=60, voice=30000)
    book.hold("call_live1", "acc_waw", 30000)
    book.hold("call_00001", "acc_waw", 30000, status="posted")
    book.hold("call_gone", "acc_nyc", 30000, status="released")
    yield book
    book.con.close()


def parquet(path: Path, sql: str = "SELECT * FROM t") -> list[tuple]:
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
        con.execute(f"CREATE VIEW t AS SELECT * FROM read_parquet('{path}')")
        return con.execute(sql).fetchall()
    finally:
        con.close()


# -- (a) a snapshot: complete, tagged with its position --------------------------


def test_latest_names_a_complete_snapshot_tagged_with_the_applied_position(book: Ledger, tmp_path: Path) -> None:
    directory = tmp_path / "snaps"
    path = write_snapshot(book.con, directory, now=T0)

    assert read_latest(directory) == path
    assert (directory / "latest").read_text().strip() == path.name
    assert path.name.startswith("snapshot-20250310T120000Z-")
    assert not [p for p in directory.iterdir() if p.name.endswith(".tmp")]
    manifest = json.loads((path / "manifest.json").read_text())
    expected = dict(book.con.execute("SELECT consumer, max(stream_sequence) FROM applied_events GROUP BY ALL").fetchall())
    assert manifest["position"] == expected == positions(book.con) == {"meter-calls": 28, "meter-accounts": 14}
    assert manifest["written_at"] == "2025-03-10T12:00:00+00:00"
    assert set(manifest["tables"]) == set(EXPORTS)
    for table, info in manifest["tables"].items():
        assert parquet(path / info["file"], "SELECT count(*) FROM t") == [(info["rows"],)], table
    assert manifest["tables"]["ledger"]["rows"] == 4
    columns = [row[0] for row in duckdb.sql(f"DESCRIBE SELECT * FROM read_parquet('{path / 'ledger.parquet'}')").fetchall()]
    assert "event_json" not in columns and "amount_millicredits" in columns
    # Money stays exact integers in Parquet (DuckDB would write a HUGEINT sum as DOUBLE).
    for info in manifest["tables"].values():
        described = duckdb.sql(f"DESCRIBE SELECT * FROM read_parquet('{path / info['file']}')").fetchall()
        for name, kind, *_ in described:
            if "millicredits" in name:
                assert kind == "BIGINT", (info["file"], name, kind)
    # The export left the meter's connection usable, outside any transaction.
    book.charge("acc_waw", "+48221234567", T0, charged_s=60, voice=30000)


def test_the_position_matches_the_rows_when_the_meter_commits_during_the_export(book: Ledger, tmp_path: Path) -> None:
    """The export reads one transaction: rows committed meanwhile (from the meter's own
    connection) are in neither the tables nor the position."""
    directory = tmp_path / "snaps"
    cursor = book.con.cursor()
    original = snapshots.positions

    def positions_then_commit(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
        position = original(con)
        book.charge("acc_nyc", "+12125550100", T0, charged_s=60, voice=30000)  # commits on the other connection
        return position

    snapshots.positions = positions_then_commit
    try:
        path = write_snapshot(cursor, directory, now=T0)
    finally:
        snapshots.positions = original
        cursor.close()
    manifest = open_snapshot(path).manifest
    assert manifest["position"]["meter-calls"] == 28
    assert manifest["tables"]["ledger"]["rows"] == 4
    assert book.con.execute("SELECT count(*) FROM ledger").fetchall() == [(5,)]


# -- (b) the analysts' views ---------------------------------------------------------


def test_daily_totals_count_days_in_the_accounts_time_zone(book: Ledger, tmp_path: Path) -> None:
    live = book.con.execute(
        "SELECT * FROM daily_account_totals ORDER BY account_id, day"
    ).fetchall()
    assert live == [
        ("acc_nyc", date(2025, 3, 10), 1, 1.0, 30000, 0, 30000),
        ("acc_waw", date(2025, 3, 10), 2, 3.0, 90000, 1500, 91500),  # 12:00 and 22:00 UTC
        ("acc_waw", date(2025, 3, 11), 1, 1.5, 45000, 0, 45000),  # 23:30 UTC is the 11th in Warsaw
    ]
    by_number = book.con.execute("SELECT * FROM daily_number_totals ORDER BY number, day").fetchall()
    assert by_number == [
        ("+12125550100", "acc_nyc", date(2025, 3, 10), 1, 1.0, 30000, 0, 30000),
        ("+48221234567", "acc_waw", date(2025, 3, 10), 1, 1.0, 30000, 500, 30500),
        ("+48221234567", "acc_waw", date(2025, 3, 11), 1, 1.5, 45000, 0, 45000),
        ("+48229999999", "acc_waw", date(2025, 3, 10), 1, 2.0, 60000, 1000, 61000),
    ]
    assert book.con.execute("SELECT hold_id, account_id, call_id, amount_millicredits FROM open_holds").fetchall() == [
        ("hold_call_live1", "acc_waw", "call_live1", 30000)
    ]
    assert book.con.execute("SELECT * FROM balances ORDER BY account_id").fetchall() == [
        ("acc_nyc", 1_000_000, 1_000_000),
        ("acc_waw", 1_000_000, 970_000),
    ]
    charges = book.con.execute(
        "SELECT call_id, charged_s, voice_millicredits, text_millicredits, total_millicredits FROM call_charges "
        "ORDER BY call_id"
    ).fetchall()
    assert charges[0] == ("call_00001", 60, 30000, 500, 30500)

    # The snapshot holds the same rows, readable without the ledger's database.
    path = write_snapshot(book.con, tmp_path / "snaps", now=T0)
    assert parquet(path / "daily_account_totals.parquet", "SELECT * FROM t ORDER BY account_id, day") == live
    assert parquet(path / "daily_number_totals.parquet", "SELECT * FROM t ORDER BY number, day") == by_number


# -- (c) the done-when: another process queries while the meter writes -------------


def ledger_command() -> list[str]:
    return [sys.executable, "-m", "callplane.cli", "ledger"]


def test_another_process_queries_the_latest_snapshot_while_the_meter_writes(book: Ledger, tmp_path: Path) -> None:
    data = tmp_path / "data"
    directory = snapshot_dir(data)
    database = data / "meter" / "ledger.duckdb"
    # The premise: while the meter holds the file, no other process may open it, even read-only.
    locked = subprocess.run(
        [sys.executable, "-c", f"import duckdb; duckdb.connect({str(database)!r}, read_only=True)"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert locked.returncode != 0 and "lock" in locked.stderr.lower()

    written: dict[str, dict] = {}  # snapshot name -> manifest

    def write_more() -> None:
        book.charge("acc_waw", "+48221234567", T0 + timedelta(seconds=book.calls), charged_s=60, voice=30000)
        path = write_snapshot(book.con, directory, now=datetime.now(UTC))
        written[path.name] = open_snapshot(path).manifest

    write_more()
    sql = (
        "SELECT count(*) AS entries, sum(amount_millicredits) AS millicredits, "
        "(SELECT count(*) FROM call_charges) AS charges FROM ledger"
    )
    for _ in range(3):
        proc = subprocess.Popen(
            [*ledger_command(), "query", sql, "--data-dir", str(data), "--format", "json"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        during = 0
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            write_more()  # the meter keeps writing rows and snapshots while the other process reads
            during += 1
            time.sleep(0.05)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert err == ""
        assert during >= 1, "the query ended before a single write overlapped it"
        [row] = json.loads(out)
        # The rows of one whole snapshot: its ledger row count and every charge in it.
        assert row["entries"] == row["charges"]
        assert row["entries"] in {m["tables"]["ledger"]["rows"] for m in written.values()}
        assert row["millicredits"] == 30500 + 45000 + 61000 + 30000 + 30000 * (row["entries"] - 4)

    # Every snapshot's position matches its rows: one charge per meter-calls event, 7 apart.
    for manifest in written.values():
        assert manifest["position"]["meter-calls"] == 7 * manifest["tables"]["ledger"]["rows"]
    assert len(list_snapshots(directory)) == snapshots.DEFAULT_KEEP


# -- (d) pruning ---------------------------------------------------------------------


def test_pruning_keeps_the_newest_and_never_the_one_latest_names(book: Ledger, tmp_path: Path) -> None:
    directory = tmp_path / "snaps"
    paths = [write_snapshot(book.con, directory, now=T0 + timedelta(minutes=i), keep=3) for i in range(8)]
    assert list_snapshots(directory) == paths[-3:]
    assert read_latest(directory) == paths[-1]

    # Crashed between the rename and the pointer: newer complete snapshots than `latest`.
    more = [write_snapshot(book.con, directory, now=T0 + timedelta(minutes=10 + i), keep=5) for i in range(3)]
    assert list_snapshots(directory) == [*paths[-2:], *more]
    (directory / "latest").write_text(paths[-2].name + "\n")
    assert prune(directory, keep=2) == []  # older than the newest 2, but not older than latest's
    assert read_latest(directory) == paths[-2]
    (directory / "latest").write_text(paths[-1].name + "\n")
    assert prune(directory, keep=2) == [paths[-2]]
    assert list_snapshots(directory) == [paths[-1], *more]

    with pytest.raises(ValueError):
        write_snapshot(book.con, directory, now=T0, keep=1)


# -- (e) crashes --------------------------------------------------------------------


def test_a_half_written_snapshot_is_ignored_and_cleaned_up(
    book: Ledger, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    directory = snapshot_dir(data)
    good = write_snapshot(book.con, directory, now=T0)
    # A crash mid-write: a .tmp folder with a torn file, and a pointer that was never renamed.
    torn = directory / "snapshot-20250310T120100Z-000099.tmp"
    torn.mkdir()
    (torn / "ledger.parquet").write_bytes(b"PAR1 torn")
    (directory / "latest.tmp").write_text(torn.name)

    assert read_latest(directory) == good
    assert list_snapshots(directory) == [good]
    ledger_cli.main(["query", "SELECT count(*) AS n FROM ledger", "--data-dir", str(data), "--format", "csv"])
    assert capsys.readouterr().out == "n\n4\n"

    after = write_snapshot(book.con, directory, now=T0 + timedelta(minutes=1))
    assert not torn.exists() and not (directory / "latest.tmp").exists()
    assert read_latest(directory) == after
    assert list_snapshots(directory) == [good, after]


def test_a_failed_export_leaves_no_folder_and_keeps_latest(book: Ledger, tmp_path: Path, monkeypatch) -> None:
    directory = tmp_path / "snaps"
    good = write_snapshot(book.con, directory, now=T0)
    monkeypatch.setitem(EXPORTS, "broken", "SELECT * FROM no_such_table")
    with pytest.raises(duckdb.CatalogException):
        write_snapshot(book.con, directory, now=T0 + timedelta(minutes=1))
    assert {p.name for p in directory.iterdir()} == {good.name, "latest"}
    assert read_latest(directory) == good
    book.charge("acc_waw", "+48221234567", T0, charged_s=60, voice=30000)  # the connection is usable


# -- (f) the schedule ----------------------------------------------------------------


def test_schedule_next_due() -> None:
    every_minute = SnapshotSchedule()
    assert every_minute.cron == "* * * * *"
    assert every_minute.next_due(datetime(2025, 1, 1, 12, 0, 30, tzinfo=UTC)) == datetime(2025, 1, 1, 12, 1, tzinfo=UTC)
    assert every_minute.next_due(datetime(2025, 1, 1, 12, 1, tzinfo=UTC)) == datetime(2025, 1, 1, 12, 2, tzinfo=UTC)
    five = SnapshotSchedule("*/5 * * * *")
    assert five.next_due(datetime(2025, 1, 1, 12, 3, 10, tzinfo=UTC)) == datetime(2025, 1, 1, 12, 5, tzinfo=UTC)
    assert five.next_due(datetime(2025, 1, 1, 12, 55, tzinfo=UTC)) == datetime(2025, 1, 1, 13, 0, tzinfo=UTC)
    # Cron runs in UTC whatever the zone of `now`.
    warsaw = datetime(2025, 1, 1, 13, 3, tzinfo=UTC).astimezone(__import__("zoneinfo").ZoneInfo("Europe/Warsaw"))
    assert five.next_due(warsaw) == datetime(2025, 1, 1, 13, 5, tzinfo=UTC)
    with pytest.raises(ValueError):
        SnapshotSchedule("every minute")


@pytest.fixture
def lines(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict]]:
    """What the snapshot module logs: (event, fields)."""
    lines: list[tuple[str, dict]] = []

    class Log:
        def info(self, event: str, **fields: object) -> None:
            lines.append((event, fields))

        exception = info

    monkeypatch.setattr(snapshots, "log", Log())
    return lines


async def test_run_snapshots_writes_on_schedule_logs_and_stops(
    book: Ledger, tmp_path: Path, lines: list[tuple[str, dict]]
) -> None:
    directory = tmp_path / "snaps"
    stop = asyncio.Event()
    task = asyncio.create_task(run_snapshots(book.con, directory, "* * * * * *", stop_event=stop, keep=2))
    ticks = 0
    deadline = time.monotonic() + 10
    while len([e for e, _ in lines if e == "snapshot_written"]) < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        ticks += 1
    stop.set()
    await asyncio.wait_for(task, 5)

    written = [fields for event, fields in lines if event == "snapshot_written"]
    assert len(written) >= 3
    assert set(written[0]) == {"path", "position", "duration_ms"}
    assert written[0]["position"] == {"meter-calls": 28, "meter-accounts": 14}
    assert read_latest(directory) == Path(written[-1]["path"])
    assert len(list_snapshots(directory)) == 2
    assert ticks > 20  # the loop kept running between snapshots
    book.charge("acc_waw", "+48221234567", T0, charged_s=60, voice=30000)  # the connection is the caller's again


async def test_a_failing_snapshot_is_logged_and_the_schedule_goes_on(
    book: Ledger, tmp_path: Path, lines: list[tuple[str, dict]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(EXPORTS, "broken", "SELECT * FROM no_such_table")
    stop = asyncio.Event()
    task = asyncio.create_task(run_snapshots(book.con, tmp_path / "snaps", "* * * * * *", stop_event=stop))
    deadline = time.monotonic() + 10
    while len(lines) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert [event for event, _ in lines[:2]] == ["snapshot_failed", "snapshot_failed"]
    assert not list((tmp_path / "snaps").glob("*.tmp"))


# -- the command line ------------------------------------------------------------------


def test_query_formats_and_errors(book: Ledger, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"

    with pytest.raises(SystemExit) as exited:
        ledger_cli.main(["query", "SELECT 1", "--data-dir", str(data)])
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("callplane ledger: no snapshot yet in") and err.count("\n") == 1

    write_snapshot(book.con, snapshot_dir(data), now=T0)
    sql = "SELECT account_id, day, calls, billed_minutes FROM daily_account_totals ORDER BY account_id, day"
    ledger_cli.main(["query", sql, "--data-dir", str(data), "--format", "csv"])
    assert capsys.readouterr().out == (
        "account_id,day,calls,billed_minutes\n"
        "acc_nyc,2025-03-10,1,1.0\nacc_waw,2025-03-10,2,3.0\nacc_waw,2025-03-11,1,1.5\n"
    )
    ledger_cli.main(["query", "SELECT call_id, occurred_at FROM call_charges ORDER BY call_id LIMIT 1",
                     "--data-dir", str(data), "--format", "json"])  # fmt: skip
    assert json.loads(capsys.readouterr().out) == [{"call_id": "call_00001", "occurred_at": "2025-03-10T12:00:00Z"}]
    ledger_cli.main(["query", "SELECT account_id, available_millicredits FROM balances ORDER BY 1", "--data-dir", str(data)])
    table = capsys.readouterr().out
    assert "acc_waw" in table and "970000" in table and "│" in table

    for bad in ("SELECT nope FROM ledger", "SELEKT 1", "SELECT * FROM no_such_table"):
        with pytest.raises(SystemExit) as exited:
            ledger_cli.main(["query", bad, "--data-dir", str(data)])
        assert exited.value.code == 1
        err = capsys.readouterr().err
        assert err.startswith("callplane ledger: ") and err.count("\n") == 1 and "Traceback" not in err, err


def test_snapshots_lists_positions_and_marks_latest(
    book: Ledger, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    data = tmp_path / "data"
    first = write_snapshot(book.con, snapshot_dir(data), now=T0)
    book.charge("acc_waw", "+48221234567", T0, charged_s=60, voice=30000)
    second = write_snapshot(book.con, snapshot_dir(data), now=T0 + timedelta(minutes=1))
    monkeypatch.setenv("CALLPLANE_DATA_DIR", str(data))  # the default --data-dir
    ledger_cli.main(["snapshots"])
    assert capsys.readouterr().out.splitlines() == [
        f"  {first.name}  2025-03-10T12:00:00+00:00  meter-accounts=14 meter-calls=28",
        f"* {second.name}  2025-03-10T12:01:00+00:00  meter-accounts=14 meter-calls=35",
    ]
    ledger_cli.main(["snapshots", "--json"])
    listed = json.loads(capsys.readouterr().out)
    assert [(s["snapshot"], s["latest"], s["rows"]["ledger"]) for s in listed] == [
        (first.name, False, 4),
        (second.name, True, 5),
    ]
    ledger_cli.main(["query", "SELECT count(*) AS n FROM ledger", "--snapshot", first.name, "--format", "csv"])
    assert capsys.readouterr().out == "n\n4\n"


def test_the_cli_lists_the_exported_tables() -> None:
    assert ledger_cli._table_names() == list(EXPORTS)  # noqa: SLF001
