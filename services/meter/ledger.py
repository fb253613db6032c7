"""The meter's DuckDB ledger: accounts, calls and ledger entries, written exactly once.

The books live in memory (`books.Books`); `write` stores a batch of their changes in one
transaction: new ledger rows and the tracking rows of the source events applied (event id
and stream position), appended, and the present state of the accounts, calls and holds they
changed, upserted, each table with one appender (row-at-a-time inserts run ~1,200 rows/s;
an appender ~300,000). A redelivered or duplicated event is known by its id and changes
nothing. The ledger.* events a source event produced are stored with it (an outbox) and
re-published on redelivery, so a crash between commit and publish loses none.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import duckdb

from .books import ACCOUNT_COLUMNS, CALL_COLUMNS, CALL_FIELDS, HOLD_COLUMNS, Account, Batch, Books, Call, Hold

SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    account_id VARCHAR PRIMARY KEY,
    rate_millicredits_per_minute BIGINT NOT NULL,
    text_price_millicredits BIGINT NOT NULL,
    timezone VARCHAR NOT NULL,
    balance_millicredits BIGINT NOT NULL DEFAULT 0
);
ALTER TABLE accounts ADD COLUMN IF NOT EXISTS daily_voice_cap_s BIGINT;
ALTER TABLE accounts ADD COLUMN IF NOT EXISTS per_call_max_s BIGINT;
CREATE TABLE IF NOT EXISTS calls (
    call_id VARCHAR PRIMARY KEY,
    account_id VARCHAR NOT NULL,
    number VARCHAR NOT NULL,
    agent_id VARCHAR,
    accepted_at TIMESTAMPTZ NOT NULL,
    responses BIGINT NOT NULL DEFAULT 0
);
ALTER TABLE calls ADD COLUMN IF NOT EXISTS answered_at TIMESTAMPTZ;
ALTER TABLE calls ADD COLUMN IF NOT EXISTS status VARCHAR DEFAULT 'accepted';  -- accepted | missed | rejected
ALTER TABLE calls ADD COLUMN IF NOT EXISTS rate_millicredits_per_minute BIGINT;  -- as admitted
ALTER TABLE calls ADD COLUMN IF NOT EXISTS text_price_millicredits BIGINT;
ALTER TABLE calls ADD COLUMN IF NOT EXISTS ended BOOLEAN DEFAULT false;
ALTER TABLE calls ADD COLUMN IF NOT EXISTS cut_off VARCHAR;  -- the cutoff reason, once ordered
CREATE TABLE IF NOT EXISTS ledger (
    entry_id VARCHAR PRIMARY KEY,           -- the ledger.* event id
    source_event_id VARCHAR NOT NULL,       -- the call.* / account.* event it came from
    kind VARCHAR NOT NULL,                  -- credited | charged
    account_id VARCHAR NOT NULL,
    call_id VARCHAR,
    number VARCHAR,
    amount_millicredits BIGINT NOT NULL,
    balance_after_millicredits BIGINT NOT NULL,
    charged_s BIGINT,
    voice_millicredits BIGINT,
    text_millicredits BIGINT,
    occurred_at TIMESTAMPTZ NOT NULL,
    event_json VARCHAR NOT NULL             -- outbox: the ledger.* event as published
);
-- A redelivered source event's outbox is looked up by its id: without the index, a scan
-- of the whole ledger (~20 ms per million rows with random ids, on the event loop's time).
CREATE INDEX IF NOT EXISTS ledger_source_event_id ON ledger (source_event_id);
-- The calls that ended, appended when they end (rewriting the call's row costs a commit
-- ~3x as much): a call has ended if calls.ended (rows written before this table) or it is here.
CREATE TABLE IF NOT EXISTS call_ends (call_id VARCHAR NOT NULL);
CREATE INDEX IF NOT EXISTS call_ends_call_id ON call_ends (call_id);  -- one call's lookup, not a scan
CREATE TABLE IF NOT EXISTS holds (
    hold_id VARCHAR PRIMARY KEY,
    call_id VARCHAR NOT NULL UNIQUE,
    account_id VARCHAR NOT NULL,
    amount_millicredits BIGINT NOT NULL,
    status VARCHAR NOT NULL                 -- open | posted | released
);
CREATE TABLE IF NOT EXISTS applied_events (
    event_id VARCHAR PRIMARY KEY,
    consumer VARCHAR NOT NULL,
    stream_sequence BIGINT NOT NULL
);
-- A call's charge is posted in parts (its agent's responses as they come, the voice at the
-- end), so no part depends on the order events arrive in; this view adds them up per call.
CREATE OR REPLACE VIEW call_charges AS
    SELECT call_id, any_value(account_id) AS account_id, any_value(number) AS number,
           CAST(sum(charged_s) AS BIGINT) AS charged_s,
           CAST(sum(voice_millicredits) AS BIGINT) AS voice_millicredits,
           CAST(sum(text_millicredits) AS BIGINT) AS text_millicredits,
           CAST(sum(amount_millicredits) AS BIGINT) AS total_millicredits,
           max(occurred_at) AS occurred_at
    FROM ledger WHERE kind = 'charged' GROUP BY call_id;
-- A hold is posted when its call ends: the end goes to call_ends and the hold's row is left
-- as it was (rewriting it cost a commit as much again); this view has every hold's status.
CREATE OR REPLACE VIEW hold_states AS
    SELECT * REPLACE (CASE WHEN status = 'open' AND call_id IN (SELECT call_id FROM call_ends)
                           THEN 'posted' ELSE status END AS status)
    FROM holds;
CREATE OR REPLACE VIEW balances AS
    SELECT a.account_id, a.balance_millicredits,
           a.balance_millicredits - coalesce(sum(h.amount_millicredits) FILTER (WHERE h.status = 'open'), 0)
               AS available_millicredits
    FROM accounts a LEFT JOIN hold_states h USING (account_id)
    GROUP BY a.account_id, a.balance_millicredits;
-- Analysts' views (also exported to the Parquet snapshots): a day is the account's local day.
CREATE OR REPLACE VIEW daily_number_totals AS
    SELECT l.number, l.account_id,
           CAST(timezone(coalesce(a.timezone, 'UTC'), l.occurred_at) AS DATE) AS day,
           count(DISTINCT l.call_id) AS calls,
           sum(l.charged_s) / 60.0 AS billed_minutes,
           CAST(sum(l.voice_millicredits) AS BIGINT) AS voice_millicredits,  -- sum() is HUGEINT,
           CAST(sum(l.text_millicredits) AS BIGINT) AS text_millicredits,    -- which Parquet holds
           CAST(sum(l.amount_millicredits) AS BIGINT) AS total_millicredits  -- as DOUBLE
    FROM ledger l LEFT JOIN accounts a USING (account_id)
    WHERE l.kind = 'charged'
    GROUP BY ALL;
-- A call has one number, so an account's day is the sum of its numbers' days.
CREATE OR REPLACE VIEW daily_account_totals AS
    SELECT account_id, day,
           CAST(sum(calls) AS BIGINT) AS calls,
           sum(billed_minutes) AS billed_minutes,
           CAST(sum(voice_millicredits) AS BIGINT) AS voice_millicredits,
           CAST(sum(text_millicredits) AS BIGINT) AS text_millicredits,
           CAST(sum(total_millicredits) AS BIGINT) AS total_millicredits
    FROM daily_number_totals
    GROUP BY ALL;
CREATE OR REPLACE VIEW open_holds AS
    SELECT h.hold_id, h.account_id, h.call_id, h.amount_millicredits, c.number, c.accepted_at
    FROM hold_states h LEFT JOIN calls c USING (call_id)
    WHERE h.status = 'open';
"""


def connect(path: Path | str) -> duckdb.DuckDBPyConnection:
    if str(path) != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(path))
    con.execute(SCHEMA)
    return con


def when_unlocked(connect: Callable[..., duckdb.DuckDBPyConnection], path: Path | str, *, wait_s: float, **options: object) -> duckdb.DuckDBPyConnection:
    """`connect(path, **options)`, tried again for up to `wait_s` while another process holds
    the file's lock (a meter's writer that was just stopped or killed lets go within moments)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return connect(str(path), **options)
        except duckdb.IOException as exc:
            if "lock" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def load(con: duckdb.DuckDBPyConnection) -> Books:
    """The books as the database has them: every account, the calls still in progress, the
    open holds, the ids of the events applied, and each capped account's recent voice seconds."""
    return books_from(load_rows(con), lambda call_id: call_from_row(find_call_row(con, call_id)))


def load_rows(con: duckdb.DuckDBPyConnection) -> dict[str, list]:
    """What `load` reads, as plain rows (the ledger writer process sends them to the meter)."""
    return {
        "accounts": con.execute(f"SELECT {', '.join(ACCOUNT_COLUMNS)} FROM accounts").fetchall(),
        "holds": con.execute(f"SELECT {', '.join(HOLD_COLUMNS)} FROM hold_states WHERE status = 'open'").fetchall(),
        "calls": con.execute(f"{_SELECT_CALLS} WHERE NOT {ENDED} AND status = 'accepted'").fetchall(),
        "applied": [event_id for (event_id,) in con.execute("SELECT event_id FROM applied_events").fetchall()],
        "voice": con.execute(
            """SELECT l.account_id, CAST(timezone(a.timezone, l.occurred_at) AS DATE), sum(l.charged_s)
               FROM ledger l JOIN accounts a USING (account_id)
               WHERE l.kind = 'charged' AND l.charged_s > 0
                 AND l.occurred_at > now() - INTERVAL 3 DAY
               GROUP BY ALL"""
        ).fetchall(),
    }


def books_from(rows: dict[str, list], find_call: Callable[[str], Call | None]) -> Books:
    books = Books()
    for row in rows["accounts"]:
        account = Account(*row)
        books.accounts[account.account_id] = account
    for row in rows["holds"]:
        hold = Hold(*row)
        books.holds[hold.call_id] = hold
        if hold.account_id in books.accounts:
            books.accounts[hold.account_id].held += hold.amount
    for row in rows["calls"]:
        books.calls[row[0]] = call_from_row(row)
    books.applied = set(rows["applied"])
    for account_id, day, seconds in rows["voice"]:
        books.accounts[account_id].voice_s[day] = int(seconds)
    books.find_call = find_call
    return books


def find_call_row(con: duckdb.DuckDBPyConnection, call_id: str) -> tuple | None:
    """A call as stored, finished or not (memory holds only the calls in progress): two
    index lookups (ENDED's subquery would scan every call that ever ended)."""
    rows = con.execute(f"{_SELECT_CALL} WHERE call_id = ?", [call_id]).fetchall()
    if not rows:
        return None
    row = list(rows[0])
    if not row[_ENDED_AT] and con.execute("SELECT count(*) FROM call_ends WHERE call_id = ?", [call_id]).fetchall()[0][0]:
        row[_ENDED_AT] = True
    return tuple(row)


# Timestamps leave DuckDB as text (TIMESTAMPTZ values would need pytz), in the wire's format.
_WIRE_TIME = "strftime({0} AT TIME ZONE 'UTC', '%Y-%m-%dT%H:%M:%S.%gZ')"
ENDED = "(ended OR call_id IN (SELECT call_id FROM call_ends))"  # a call's `ended`, wherever it is recorded
_COLUMNS = [_WIRE_TIME.format(c) if c.endswith("_at") else c for c in CALL_COLUMNS]
_ENDED_AT = CALL_COLUMNS.index("ended")
_SELECT_CALLS = "SELECT {}, epoch(answered_at) FROM calls".format(  # every call, `ended` wherever recorded
    ", ".join(ENDED if c == "ended" else c for c in _COLUMNS)
)
_SELECT_CALL = "SELECT {}, epoch(answered_at) FROM calls".format(", ".join(_COLUMNS))  # ended: calls.ended only


def call_from_row(row: tuple | list | None) -> Call | None:
    if row is None:
        return None
    *columns, answered_s = row
    return Call(**dict(zip(CALL_FIELDS, columns, strict=True)), answered_s=answered_s)


def write(con: duckdb.DuckDBPyConnection, batch: Batch) -> None:
    """Store one batch of the books' changes in one transaction (all of it, or none)."""
    con.begin()
    try:
        for table, rows, options in (
            ("ledger", batch.ledger, {}),
            ("applied_events", batch.applied, {}),
            ("accounts", batch.accounts, {"columns": ACCOUNT_COLUMNS, "action": "upsert"}),
            ("calls", batch.calls, {"columns": CALL_COLUMNS, "action": "upsert"}),
            # Two unique keys (hold_id, call_id) rule out an upsert: delete, then insert.
            ("holds", [(row[0],) for row in batch.holds], {"action": "delete", "key": ["hold_id"]}),
            ("holds", batch.holds, {"columns": HOLD_COLUMNS}),
            ("call_ends", batch.ends, {}),
        ):
            if rows:
                appender = con.appender(table, **options)
                appender.append_rows(rows)
                appender.flush()
        con.commit()
    except BaseException:
        con.rollback()
        raise


def outbox(con: duckdb.DuckDBPyConnection, source_event_id: str) -> list[str]:
    rows = con.execute(
        "SELECT event_json FROM ledger WHERE source_event_id = ? ORDER BY entry_id", [source_event_id]
    ).fetchall()
    return [r[0] for r in rows]


def canonical_export(con: duckdb.DuckDBPyConnection) -> str:
    """The ledger as sorted JSON lines, for comparing two ledgers byte for byte: every posting
    (credits and charges, without the running balance, which depends on how two streams
    interleaved) and every account's final balance (which does not). Holds are reservations,
    not postings: a hold granted by request/reply and refused later has no source event."""
    import json

    entries = con.execute(
        """SELECT entry_id, kind, account_id, call_id, number, amount_millicredits, charged_s,
                  voice_millicredits, text_millicredits, strftime(occurred_at AT TIME ZONE 'UTC', '%Y-%m-%dT%H:%M:%S.%g')
           FROM ledger WHERE kind IN ('credited', 'charged') ORDER BY entry_id"""
    ).fetchall()
    balances = con.execute("SELECT account_id, balance_millicredits FROM accounts ORDER BY account_id").fetchall()
    keys = ("entry_id", "kind", "account_id", "call_id", "number", "amount_millicredits", "charged_s",
            "voice_millicredits", "text_millicredits", "occurred_at")  # fmt: skip
    lines = [json.dumps({"entry": dict(zip(keys, row, strict=True))}, sort_keys=True) for row in entries]
    lines += [json.dumps({"balance": {"account_id": a, "millicredits": b}}, sort_keys=True) for a, b in balances]
    return "\n".join(lines) + "\n"
