"""`callplane ledger rebuild` and `callplane ledger export`: replay the source streams into an
empty ledger, and print a ledger in canonical form so two can be compared byte for byte."""

from __future__ import annotations

from pathlib import Path

from nats.aio.client import Client

from callplane.projection import Projection


REBUILD_COMMIT_EVERY = 5_000  # events per transaction


async def rebuild(nc: Client, out: Path) -> dict[str, int]:
    """Replay ACCOUNTS, then CALLS, into a new DuckDB ledger at `out` (which must not exist).
    Account events first: a call's charge depends on its own events, a balance on the sum."""
    from services.meter import ledger
    from services.meter.app import Meter

    if out.exists():
        raise FileExistsError(f"{out} exists: rebuild writes a new ledger, give another path")
    con = ledger.connect(out)
    meter = Meter(con)
    applied: dict[str, int] = {}
    try:
        for stream, consumer in (("ACCOUNTS", "meter-accounts"), ("CALLS", "meter-calls")):
            projection: Projection

            def apply(event, consumer=consumer) -> None:  # noqa: ANN001
                meter.apply(event, consumer, projection.position)
                applied[stream] = applied.get(stream, 0) + 1
                if applied[stream] % REBUILD_COMMIT_EVERY == 0:
                    meter.flush()

            projection = Projection(nc.jetstream(), stream, apply)
            await projection.follow(timeout=3600)
            await projection.stop()
            meter.flush()
    finally:
        con.close()
    return applied


def export(database: Path) -> str:
    """The canonical export of a ledger file (the meter must not be running on it)."""
    import duckdb

    from services.meter.ledger import canonical_export, when_unlocked

    with when_unlocked(duckdb.connect, database, wait_s=5.0, read_only=True) as con:
        return canonical_export(con)
