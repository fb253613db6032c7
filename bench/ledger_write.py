"""What one meter commit costs in DuckDB, alone and next to a busy Python thread.

    .venv/bin/python bench/ledger_write.py [--calls 1000] [--batches 5]

A batch is the rows `call.ended` of N calls makes the meter write (one ledger row with its
event JSON, one applied_events row, one call_ends row: what `services.meter.books` queues;
until commits 0fb2752 and dfb9624 the call's row was upserted and its hold's replaced too). Two ways of writing it are timed, each on a ledger of its
own made by `services.meter.ledger.connect`:

- appenders: `services.meter.ledger.write`, as shipped;
- JSON files: each table's rows encoded with msgspec into one file, then the whole
  transaction as one SQL string that DuckDB executes itself (`read_json`, INSERT / INSERT
  OR REPLACE / DELETE + INSERT): the alternative measured for the meter (bench/README.md).

Each is timed three ways: alone; from a worker thread while the main thread spins in pure
Python (the meter's event loop, busy, next to its writer thread) with the interpreter's
default switch interval (5 ms); and the same with a 1 ms switch interval. "GIL held" is how
much of the commit the spinning thread could not run (its iterations counted against its
rate when alone). No NATS server is needed; nothing in services/ or callplane/ changes.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import duckdb  # noqa: E402
import msgspec  # noqa: E402

from services.meter import ledger  # noqa: E402
from services.meter.books import ACCOUNT_COLUMNS, CALL_COLUMNS, HOLD_COLUMNS, Batch  # noqa: E402

EVENT_JSON = (
    '{{"type":"ledger.charged","event_id":"{0}","occurred_at":"2026-12-05T04:00:00.000Z","v":1,'
    '"account_id":"acct_1","call_id":"call_{1}","number":"+48123456789","amount_millicredits":30000,'
    '"balance_millicredits":123456,"charged_s":60,"voice_millicredits":30000,"text_millicredits":0}}'
)


def ended_calls(first: int, n: int) -> Batch:
    """The rows of `n` call ends, numbered from `first` (unique ids across batches)."""
    at = "2026-12-05T04:00:{:02d}.000Z"
    rows: dict[str, list[tuple]] = {"ledger": [], "applied": [], "calls": [], "holds": [], "ends": []}
    for i in range(first, first + n):
        entry, source = f"call.ended/{i:012d}/charged", f"ended_{i:012d}"
        rows["ledger"].append((entry, source, "charged", "acct_1", f"call_{i}", "+48123456789", 30000, 123456,
                               60, 30000, 0, at.format(i % 60), EVENT_JSON.format(entry, i)))  # fmt: skip
        rows["applied"].append((source, "meter-calls", i))
        rows["ends"].append((f"call_{i}",))  # the call's row is not written again when it ends
    return Batch(accounts=[], finished=set(), outbox={}, **rows)


class JsonFiles:
    """The alternative: one JSON file per table, loaded by one SQL transaction."""

    TABLES = (("ledger", "ledger", None, "append"), ("applied_events", "applied", None, "append"),
              ("accounts", "accounts", ACCOUNT_COLUMNS, "upsert"), ("calls", "calls", CALL_COLUMNS, "upsert"),
              ("holds", "holds", HOLD_COLUMNS, "replace"), ("call_ends", "ends", None, "append"))  # fmt: skip

    def __init__(self, con: duckdb.DuckDBPyConnection, folder: Path) -> None:
        self.folder, self.numbers, self.encode = folder, itertools.count(), msgspec.json.Encoder().encode
        self.tables = []
        for table, field, columns, how in self.TABLES:
            types = dict(con.execute(f"SELECT column_name, data_type FROM duckdb_columns() "
                                     f"WHERE table_name = '{table}' ORDER BY column_index").fetchall())  # fmt: skip
            columns = columns or list(types)
            row = msgspec.defstruct(f"{table}_row", [(c, object) for c in columns])
            spec = "{" + ", ".join(f"'{c}': '{types[c]}'" for c in columns) + "}"
            self.tables.append((table, field, columns, how, row, spec))

    def stage(self, batch: Batch) -> tuple[str, list[Path]]:
        """The transaction's SQL and the files it reads (written here, on the calling thread)."""
        number, statements, files = next(self.numbers), [], []
        for table, field, columns, how, row, spec in self.tables:
            if not (rows := getattr(batch, field)):
                continue
            path = self.folder / f"{number}-{table}.json"
            path.write_bytes(self.encode([row(*values) for values in rows]))
            files.append(path)
            source, names = f"read_json('{path}', format='array', columns={spec})", ", ".join(columns)
            if how == "replace":
                statements.append(f"DELETE FROM {table} WHERE {columns[0]} IN (SELECT {columns[0]} FROM {source})")
            verb = "INSERT OR REPLACE" if how == "upsert" else "INSERT"
            statements.append(f"{verb} INTO {table} ({names}) SELECT * FROM {source}")
        return "BEGIN TRANSACTION; " + "; ".join(statements) + "; COMMIT", files


class Spinner:
    """A thread running pure Python, counting: the meter's busy event loop."""

    def __init__(self) -> None:
        self.count, self.running = 0, True
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()
        time.sleep(0.2)
        start, began = self.count, time.perf_counter()
        time.sleep(0.5)
        self.rate = (self.count - start) / (time.perf_counter() - began)

    def _spin(self) -> None:
        while self.running:
            self.count += 1

    def stop(self) -> None:
        self.running = False
        self.thread.join()


def timed(write: Callable[[Batch], None], batches: list[Batch], calls: int, spinner: Spinner | None) -> str:
    wall = held = 0.0
    for batch in batches:
        count, began = spinner.count if spinner else 0, time.perf_counter()
        if spinner:  # written from a worker thread, as the meter does
            worker = threading.Thread(target=write, args=(batch,))
            worker.start()
            worker.join()
        else:
            write(batch)
        took = time.perf_counter() - began
        wall += took
        if spinner:
            held += took - (spinner.count - count) / spinner.rate
    per_call = 1e6 / (len(batches) * calls)
    line = f"{wall * per_call:7.1f} us/call ({wall / len(batches) * 1000:6.1f} ms/batch)"
    return line + (f", GIL held ~{max(held, 0) * per_call:5.1f} us/call" if spinner else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="call ends per batch (commit)")
    parser.add_argument("--batches", type=int, default=5, help="batches timed per figure")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-ledger-"))
    first = itertools.count(0, args.calls)
    ways: dict[str, Callable[[Batch], None]] = {}
    shipped = ledger.connect(folder / "appenders.duckdb")
    ways["appenders (as shipped)"] = lambda batch, con=shipped.cursor(): ledger.write(con, batch)
    files_con = ledger.connect(folder / "json.duckdb")
    files = JsonFiles(files_con, folder)

    def via_files(batch: Batch, con: duckdb.DuckDBPyConnection = files_con.cursor()) -> None:
        sql, paths = files.stage(batch)  # staging on the writer thread here; the meter would stage on its loop
        con.execute(sql)
        for path in paths:
            path.unlink()

    ways["JSON files, one SQL call"] = via_files
    for write in ways.values():  # warm up: a ledger that already holds rows
        write(ended_calls(next(first), args.calls))

    print(f"meter commit of {args.calls} call ends (ledger, applied_events, call_ends), DuckDB {duckdb.__version__}, Python {sys.version.split()[0]}")
    for name, write in ways.items():
        print(f"  {name:26} alone:                    {timed(write, [ended_calls(next(first), args.calls) for _ in range(args.batches)], args.calls, None)}")
    for interval in (0.005, 0.001):
        sys.setswitchinterval(interval)
        spinner = Spinner()
        for name, write in ways.items():
            batches = [ended_calls(next(first), args.calls) for _ in range(args.batches)]
            print(f"  {name:26} busy thread, switch {interval * 1000:g} ms: {timed(write, batches, args.calls, spinner)}")
        spinner.stop()
    sys.setswitchinterval(0.005)
    shipped.close()
    files_con.close()
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
