"""`callplane ledger ...`: SQL over the meter's latest Parquet snapshot, from any process.

The meter owns its DuckDB file (no other process may open it) and writes Parquet
snapshots under `<data>/meter/snapshots` on a cron schedule (services/meter/snapshots.py).
`ledger query` opens an in-memory DuckDB with one view per table of the latest snapshot
(`ledger`, `call_charges`, `daily_account_totals`, ...) and runs the SQL there.
Exit codes: 0 done, 1 no snapshot yet or the SQL failed (one line on stderr), 2 usage.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # duckdb loads only when a command runs: `callplane --help` stays fast
    import duckdb

    from services.meter.snapshots import Snapshot


class LedgerError(Exception):
    """No snapshot, or the SQL failed: one line on stderr, exit 1."""


def add_ledger_commands(commands: argparse._SubParsersAction) -> None:
    """Register `ledger query` and `ledger snapshots`."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="the data folder (default $CALLPLANE_DATA_DIR or .callplane/data); snapshots are under meter/snapshots",
    )
    group = commands.add_parser("ledger", help="query the meter's ledger (Parquet snapshots, while the meter runs)")
    ledger = group.add_subparsers(title="ledger commands", metavar="COMMAND")

    query = ledger.add_parser(
        "query",
        parents=[common],
        help="run SQL over the latest snapshot",
        description="Run SQL over the latest snapshot. Tables: " + ", ".join(_table_names()) + ".",
    )
    query.add_argument("sql", help='e.g. "SELECT * FROM daily_account_totals ORDER BY day DESC"')
    query.add_argument("--format", choices=("table", "csv", "json"), default="table", help="output (default table)")
    query.add_argument("--max-rows", type=int, default=100, metavar="N", help="table format: rows shown (default 100)")
    query.add_argument("--snapshot", metavar="NAME", help="query this snapshot instead of the latest")
    query.set_defaults(run=_exit_1_on_error(cmd_query))

    snapshots = ledger.add_parser("snapshots", parents=[common], help="list the snapshots and their stream positions")
    snapshots.add_argument("--json", action="store_true", help="print JSON")
    snapshots.set_defaults(run=_exit_1_on_error(cmd_snapshots))

    rebuild = ledger.add_parser(
        "rebuild", help="replay the streams into a new, empty ledger file (the meter's own is untouched)"
    )
    rebuild.add_argument("out", type=Path, help="the new DuckDB file to write")
    rebuild.add_argument("--url", default=None, help="NATS URL (default $NATS_URL or nats://127.0.0.1:4222)")
    rebuild.add_argument("--export", type=Path, metavar="FILE", help="also write its canonical export here")
    rebuild.set_defaults(run=_exit_1_on_error(cmd_rebuild))

    export = ledger.add_parser(
        "export", help="a ledger file as sorted JSON lines (entries and balances), to compare two byte for byte"
    )
    export.add_argument("database", type=Path, help="a ledger DuckDB file (not one a running meter holds)")
    export.set_defaults(run=_exit_1_on_error(cmd_export))

    def usage(_args: argparse.Namespace) -> None:
        group.print_help(sys.stderr)
        sys.exit(2)

    group.set_defaults(run=usage)


def _table_names() -> list[str]:
    # services.meter.snapshots.EXPORTS (a test keeps them equal); not imported: --help stays fast
    return [
        "ledger", "call_charges", "daily_account_totals", "daily_number_totals",
        "balances", "open_holds", "accounts", "calls", "holds",
    ]  # fmt: skip


def _exit_1_on_error(command):  # noqa: ANN001, ANN202
    def run(args: argparse.Namespace) -> None:
        try:
            command(args)
        except LedgerError as exc:
            print(f"callplane ledger: {exc}", file=sys.stderr)
            sys.exit(1)

    return run


def snapshots_directory(data_dir: Path | None) -> Path:
    from services.meter.snapshots import snapshot_dir

    return snapshot_dir(data_dir or os.environ.get("CALLPLANE_DATA_DIR") or ".callplane/data")


def cmd_query(args: argparse.Namespace) -> None:
    import duckdb

    directory = snapshots_directory(args.data_dir)
    for attempt in (1, 2):
        snapshot = _choose(directory, args.snapshot)
        con = duckdb.connect(":memory:")
        try:
            _attach(con, snapshot)
            try:
                relation = con.sql(args.sql)
                _print(relation, args.format, args.max_rows)
            except duckdb.IOException as exc:
                # Pruned while we read it (it was `keep` snapshots old): read the new latest once.
                if attempt == 1 and args.snapshot is None and not snapshot.path.exists():
                    continue
                raise LedgerError(_one_line(exc)) from None
            except duckdb.Error as exc:
                raise LedgerError(_one_line(exc)) from None
            return
        finally:
            con.close()


def cmd_snapshots(args: argparse.Namespace) -> None:
    import json

    from services.meter.snapshots import list_snapshots, open_snapshot, read_latest

    directory = snapshots_directory(args.data_dir)
    latest = read_latest(directory)
    found = [open_snapshot(path) for path in list_snapshots(directory)]
    if args.json:
        print(json.dumps(
            [
                {
                    "snapshot": s.name,
                    "latest": s.path == latest,
                    "written_at": s.written_at,
                    "position": s.position,
                    "rows": {table: info.get("rows") for table, info in s.manifest.get("tables", {}).items()},
                }
                for s in found
            ],
            indent=2,
        ))  # fmt: skip
        return
    if not found:
        raise LedgerError(f"no snapshot yet in {directory} (the meter writes one per SNAPSHOT_CRON, every minute by default)")
    for s in found:
        mark = "*" if s.path == latest else " "
        position = " ".join(f"{consumer}={sequence}" for consumer, sequence in sorted(s.position.items())) or "-"
        print(f"{mark} {s.name}  {s.written_at}  {position}")


def _choose(directory: Path, name: str | None) -> Snapshot:
    from services.meter.snapshots import list_snapshots, open_snapshot, read_latest

    if name is not None:
        path = next((p for p in list_snapshots(directory) if p.name == name), None)
        if path is None:
            raise LedgerError(f"no snapshot {name} in {directory} (see `callplane ledger snapshots`)")
        return open_snapshot(path)
    path = read_latest(directory)
    if path is None:
        raise LedgerError(
            f"no snapshot yet in {directory} (the meter writes one per SNAPSHOT_CRON, every minute by default)"
        )
    return open_snapshot(path)


def _attach(con: duckdb.DuckDBPyConnection, snapshot: Snapshot) -> None:
    """One view per table of the snapshot, named like the table; timestamps print in UTC."""
    con.execute("SET TimeZone = 'UTC'")
    for table, file in snapshot.files().items():
        path = str(file).replace("'", "''")
        con.execute(f"CREATE VIEW \"{table}\" AS SELECT * FROM read_parquet('{path}')")


def _print(relation: duckdb.DuckDBPyRelation | None, fmt: str, max_rows: int) -> None:
    if relation is None:  # a statement without a result (SET, CREATE ...)
        return
    if fmt == "table":
        # On a terminal DuckDB fits the table to its width; into a pipe or file, every column.
        relation.show(max_rows=max_rows, max_width=None if sys.stdout.isatty() else 1_000_000)
        return
    columns = relation.columns
    rows = _fetch_all(relation)
    if fmt == "csv":
        import csv

        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
    else:
        import msgspec

        encoder = msgspec.json.Encoder(decimal_format="number")
        sys.stdout.write(msgspec.json.format(encoder.encode([dict(zip(columns, row)) for row in rows]), indent=2).decode())
        sys.stdout.write("\n")


def _fetch_all(relation: duckdb.DuckDBPyRelation) -> list[tuple]:
    """Rows as Python values. DuckDB turns TIMESTAMPTZ into datetimes only with pytz, which
    we do not depend on: such columns are fetched as UTC wall time and zoned here."""
    from datetime import UTC

    zoned = [i for i, kind in enumerate(relation.types) if str(kind) == "TIMESTAMP WITH TIME ZONE"]
    if not zoned:
        return relation.fetchall()
    names = [_quote(c) for c in relation.columns]
    projection = [f"CAST({n} AS TIMESTAMP) AS {n}" if i in zoned else n for i, n in enumerate(names)]
    rows = relation.project(", ".join(projection)).fetchall()  # the session time zone is UTC (_attach)
    return [
        tuple(v.replace(tzinfo=UTC) if i in zoned and v is not None else v for i, v in enumerate(row))
        for row in rows
    ]


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _one_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def main(argv: list[str] | None = None) -> None:
    """`python -m callplane.ledger_cli query "SQL"`: the same commands without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="callplane")
    add_ledger_commands(parser.add_subparsers(title="commands"))
    args = parser.parse_args(["ledger", *(sys.argv[1:] if argv is None else argv)])
    args.run(args)


if __name__ == "__main__":
    main()


def cmd_rebuild(args: argparse.Namespace) -> None:
    import asyncio

    from .client import connect
    from .rebuild import export, rebuild

    if args.out.exists():
        raise LedgerError(f"{args.out} exists: rebuild writes a new ledger, give another path")

    async def run() -> dict[str, int]:
        nc = await connect(args.url)
        try:
            return await rebuild(nc, args.out)
        finally:
            await nc.close()

    applied = asyncio.run(run())
    print(f"rebuilt {args.out} from " + ", ".join(f"{n} {stream} events" for stream, n in applied.items()))
    if args.export:
        args.export.write_text(export(args.out))
        print(f"canonical export in {args.export}")


def cmd_export(args: argparse.Namespace) -> None:
    from .rebuild import export

    if not args.database.exists():
        raise LedgerError(f"no ledger at {args.database}")
    sys.stdout.write(export(args.database))
