"""How many calls per second the meter bills: call.ended in, ledger rows committed and
ledger.charged published, next to a raw nats-py consumer doing the same rating without a
ledger, measured in the same run.

    .venv/bin/python bench/meter.py                  # 20,000 calls, readable report
    .venv/bin/python bench/meter.py --calls 50000 --json

Each phase starts on empty streams (`callplane.topology.setup`). The meter phase:
  1. publish the accounts, a top-up, and call.accepted + call.answered of every call; the
     meter (as shipped: `callplane.service.open_service` with `services.meter.app.wire`)
     applies them and stops: every call is in progress, with an open hold (not timed);
  2. publish call.ended of every call while no meter runs;
  3. start the meter again (loading its books is not timed) and time from its consumers'
     start to the last ledger.charged received (published only after its rows committed).
  4. while it runs, send hold_credit requests one at a time at --hold-rate per second (each
     is answered once the hold is committed) and report their p50 / p99.
Then the ledger file is checked: exactly one charge per call, each the amount
`services.meter.core.rate_call` gives, and the balances agree (exactly once).

The baseline consumes the same call.ended events from the same durable with nats-py only
(continuous pull, decode, rate, publish ledger.charged pipelined, ack after its PubAck),
and writes nothing: what the meter's ledger and books cost on top of the messaging.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import json
import os
import platform
import pstats
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import duckdb  # noqa: E402
import nats  # noqa: E402
from nats.aio.msg import Msg  # noqa: E402
from nats.js import JetStreamContext  # noqa: E402

from callplane import topology  # noqa: E402
from schemas import (  # noqa: E402
    AccountConfigured,
    AccountCredited,
    CallAccepted,
    CallAnswered,
    CallEnded,
    Event,
    LedgerCharged,
    decode,
    derived_id,
    encode,
    subject_for,
    timestamp,
)
from bench.admission import process_cpu_s  # noqa: E402
from services.meter.core import rate_call  # noqa: E402
from tests.nats_server import local_server  # noqa: E402

ACCOUNTS = 20
RATE = 30_000
# The calls are answered as the bench starts, so the meter's supervision finds their holds covered.
T0 = timestamp(datetime.now(UTC))


def calls(n: int) -> tuple[list[Event], list[Event], list[Event]]:
    """Setup (accounts and top-ups), the calls' start (accepted, answered), their ends."""
    setup: list[Event] = []
    for a in range(ACCOUNTS):
        account = f"acct_{a}"
        setup.append(AccountConfigured(event_id=f"cfg_{a}", occurred_at=T0, account_id=account,
                                       rate_millicredits_per_minute=RATE))  # fmt: skip
        setup.append(AccountCredited(event_id=f"top_{a}", occurred_at=T0, account_id=account,
                                     amount_millicredits=10**12, reference="bench"))  # fmt: skip
    start: list[Event] = []
    ends: list[Event] = []
    for i in range(n):
        call = {"call_id": f"call_{i}", "number": f"+4812345{i % 10_000:04d}"}
        start.append(CallAccepted(event_id=f"acc_{i}", occurred_at=T0, account_id=f"acct_{i % ACCOUNTS}",
                                  agent_id="agent", hold_id=f"hold_{i}", rate_millicredits_per_minute=RATE, **call))  # fmt: skip
        start.append(CallAnswered(event_id=f"ans_{i}", occurred_at=T0, **call))
        duration = 30_000 + (i * 7_919) % 600_000
        ends.append(CallEnded(event_id=f"end_{i}", occurred_at=T0, duration_ms=duration, silent_ms=(i * 13) % 20_000, **call))
    return setup, start, ends


async def publish(js: JetStreamContext, events: list[Event]) -> None:
    for first in range(0, len(events), 5_000):
        futures = [
            await js.publish_async(subject_for(e), encode(e), headers={"Nats-Msg-Id": e.event_id})
            for e in events[first : first + 5_000]
        ]
        await asyncio.gather(*futures)


async def reset(js: JetStreamContext) -> None:
    for stream in ("CALLS", "ACCOUNTS", "LEDGER", "NUMBERS", "ALERTS", "DLQ"):
        with contextlib.suppress(Exception):
            await js.delete_stream(stream)
    await topology.setup(js)


async def drained(js: JetStreamContext, durable: str, stream: str) -> bool:
    info = await js.consumer_info(stream, durable)
    return not info.num_pending and not info.num_ack_pending


class ChargeCounter:
    """Counts ledger.charged as it is published (after the meter's commit)."""

    def __init__(self, nc, expected: int) -> None:  # noqa: ANN001
        self.nc, self.expected, self.seen = nc, expected, 0
        self.done = asyncio.Event()
        self.last = 0.0

    async def start(self) -> None:
        await self.nc.subscribe("ledger.charged.>", cb=self._on)

    async def _on(self, _msg: Msg) -> None:
        self.seen += 1
        self.last = time.perf_counter()
        if self.seen >= self.expected:
            self.done.set()


# -- the meter as shipped -------------------------------------------------------------------


async def open_meter(url: str, home: Path):  # noqa: ANN201
    from callplane.service import open_service
    from services.meter.app import wire
    from services.meter.config import MeterSettings

    settings = MeterSettings(nats_url=url, callplane_data_dir=str(home), log_level="warning")
    return await open_service("meter", settings, wire)


async def meter_phase(url: str, n: int, timeout: float, server_pid: int, hold_rate: int) -> dict:
    setup, start, ends = calls(n)
    home = Path(tempfile.mkdtemp(prefix="bench-meter-"))
    nc = await nats.connect(url)
    js = nc.jetstream()
    await reset(js)
    thresholds = gc.get_threshold()
    try:
        await publish(js, setup + start)
        service = await open_meter(url, home)
        await service.start()
        deadline = time.monotonic() + timeout
        while not (await drained(js, "meter-calls", "CALLS") and await drained(js, "meter-accounts", "ACCOUNTS")):
            if time.monotonic() > deadline:
                raise TimeoutError("the meter did not apply the calls' start in time")
            await asyncio.sleep(0.1)
        await service.stop()

        await publish(js, ends)
        counter = ChargeCounter(nc, n)
        await counter.start()
        service = await open_meter(url, home)  # loads its books: not timed
        cpu0, server0, started = time.process_time(), process_cpu_s(server_pid), time.perf_counter()
        profile = cProfile.Profile() if os.environ.get("BENCH_PROFILE") else None
        if profile:
            profile.enable()
        await service.start()
        await asyncio.wait_for(counter.done.wait(), timeout)
        if profile:
            profile.disable()
            pstats.Stats(profile, stream=sys.stderr).sort_stats("tottime").print_stats(25)
        elapsed, cpu = counter.last - started, time.process_time() - cpu0
        server = process_cpu_s(server_pid) - server0
        while not await drained(js, "meter-calls", "CALLS"):
            await asyncio.sleep(0.05)
        holds = await hold_latency(nc, rate=hold_rate, seconds=3)
        await service.stop()
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
        await nc.close()
    return {"calls_per_s": n / elapsed, "elapsed_s": elapsed, "cpu_us_per_call": cpu / n * 1e6,
            "server_cpu_us_per_call": server / n * 1e6, "holds": holds,
            "verification": verify(home / "meter" / "ledger.duckdb", ends)}  # fmt: skip


async def hold_latency(nc, *, rate: int, seconds: float) -> dict:  # noqa: ANN001
    """hold_credit requests at `rate` per second, one at a time as a quiet gatekeeper sends
    them: request sent -> reply received (each reply waits for the hold's commit)."""
    from schemas import decode_reply, encode_message, rpc
    from schemas.commands import HoldCredit

    latencies: list[float] = []
    refused = 0

    async def one(i: int) -> None:
        nonlocal refused
        command = HoldCredit(call_id=f"lat_{i}", account_id=f"acct_{i % ACCOUNTS}", number="+48123450000")
        sent = time.perf_counter()
        reply = decode_reply((await nc.request(rpc("meter", "hold_credit"), encode_message(command), timeout=5)).data)
        latencies.append(time.perf_counter() - sent)
        refused += not reply.ok

    tasks, start = [], time.perf_counter()
    for i in range(int(rate * seconds)):
        await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000  # noqa: E731
    return {"rate": rate, "requests": len(latencies), "refused": refused, "p50_ms": pick(0.5), "p99_ms": pick(0.99)}


def verify(database: Path, ends: list[CallEnded]) -> str:
    expected = {e.call_id: rate_call(duration_ms=e.duration_ms, silent_ms=e.silent_ms,
                                     rate_millicredits_per_minute=RATE).total_millicredits for e in ends}  # fmt: skip
    with duckdb.connect(str(database), read_only=True) as con:
        rows = con.execute("SELECT call_id, count(*), sum(amount_millicredits) FROM ledger "
                           "WHERE kind = 'charged' GROUP BY call_id").fetchall()  # fmt: skip
        balance = con.execute("SELECT sum(balance_millicredits) FROM accounts").fetchall()[0][0]
        open_holds = con.execute(  # the latency phase's holds are left open on purpose
            "SELECT count(*) FROM holds WHERE status = 'open' AND call_id NOT LIKE 'lat_%'"
        ).fetchall()[0][0]
    wrong = [c for c, count, amount in rows if count != 1 or amount != expected.get(c)]
    problems = []
    if len(rows) != len(expected) or wrong:
        problems.append(f"{len(rows)} calls charged of {len(expected)}, {len(wrong)} wrong")
    if balance != ACCOUNTS * 10**12 - sum(expected.values()):
        problems.append("balances do not add up")
    if open_holds:
        problems.append(f"{open_holds} holds still open")
    return "OK: every call charged exactly once, balances agree" if not problems else "FAILED: " + "; ".join(problems)


# -- the raw baseline -------------------------------------------------------------------------


async def baseline_phase(url: str, n: int, timeout: float, server_pid: int, window: int = 1000) -> dict:
    """nats-py only: continuous pull on meter-calls, decode, rate, publish ledger.charged
    pipelined, ack each input after its PubAck."""
    _, _, ends = calls(n)
    nc = await nats.connect(url)
    js = nc.jetstream()
    await reset(js)
    await publish(js, ends)
    counter = ChargeCounter(nc, n)
    await counter.start()
    inbox = nc.new_inbox()
    outstanding = 0
    acks: asyncio.Queue = asyncio.Queue()

    async def top_up() -> None:
        nonlocal outstanding
        want = window - outstanding
        if want > 0:
            request = json.dumps({"batch": want, "expires": 5_000_000_000}).encode()
            await nc.publish("$JS.API.CONSUMER.MSG.NEXT.CALLS.meter-calls", request, reply=inbox)
            outstanding += want

    async def on_message(msg: Msg) -> None:
        nonlocal outstanding
        if msg.headers and msg.headers.get("Status"):
            if msg.headers["Status"] != "100":
                outstanding -= int(msg.headers.get("Nats-Pending-Messages", 0) or 0)
                await top_up()
            return
        outstanding -= 1
        ended = decode(msg.data)
        charge = rate_call(duration_ms=ended.duration_ms, silent_ms=ended.silent_ms, rate_millicredits_per_minute=RATE)
        entry = LedgerCharged(event_id=derived_id(ended.event_id, "charged"), occurred_at=ended.occurred_at,
                              account_id="acct_0", amount_millicredits=charge.total_millicredits, balance_millicredits=0,
                              call_id=ended.call_id, number=ended.number, charged_s=charge.charged_s,
                              voice_millicredits=charge.voice_millicredits)  # fmt: skip
        future = await js.publish_async(subject_for(entry), encode(entry), headers={"Nats-Msg-Id": entry.event_id})
        acks.put_nowait((future, msg))
        if outstanding <= window // 2:
            await top_up()

    async def acker() -> None:
        while True:
            future, msg = await acks.get()
            await future
            await msg.ack()

    cpu0, server0, started = time.process_time(), process_cpu_s(server_pid), time.perf_counter()
    ack_task = asyncio.create_task(acker())
    await nc.subscribe(inbox, cb=on_message)
    await top_up()
    try:
        await asyncio.wait_for(counter.done.wait(), timeout)
        elapsed, cpu = counter.last - started, time.process_time() - cpu0
        server = process_cpu_s(server_pid) - server0
    finally:
        ack_task.cancel()
        await nc.close()
    return {"calls_per_s": n / elapsed, "elapsed_s": elapsed, "cpu_us_per_call": cpu / n * 1e6,
            "server_cpu_us_per_call": server / n * 1e6}  # fmt: skip



async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000, help="calls billed per phase (default 20000)")
    parser.add_argument("--timeout", type=float, default=120, help="limit of each phase in seconds")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--hold-rate", type=int, default=500, help="hold_credit requests/s in the latency phase")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as store, local_server(Path(store)) as (url, server):
        baseline = await baseline_phase(url, args.calls, args.timeout, server.pid)
        meter = await meter_phase(url, args.calls, args.timeout, server.pid, args.hold_rate)
    ratio = meter["calls_per_s"] / baseline["calls_per_s"]
    if args.json:
        print(json.dumps({"calls": args.calls, "baseline": baseline, "meter": meter, "ratio": ratio}, indent=2))
    else:
        print("callplane meter benchmark: call.ended -> ledger rows committed -> ledger.charged received")
        print(f"machine: {os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}, "
              f"DuckDB {duckdb.__version__}; load average {os.getloadavg()[0]:.2f}")  # fmt: skip
        print(f"{args.calls:,} calls, each in progress with an open hold, then call.ended of every one")
        print(f"  {'consumer':<40}{'calls/s':>10}{'elapsed':>10}{'CPU us/call':>14}{'server us/call':>16}")
        for label, figures in (("baseline: raw nats-py, no ledger", baseline), ("meter (as shipped)", meter)):
            print(f"  {label:<40}{figures['calls_per_s']:>10,.0f}{figures['elapsed_s']:>9.2f}s"
                  f"{figures['cpu_us_per_call']:>14.1f}{figures['server_cpu_us_per_call']:>16.1f}")  # fmt: skip
        cpu = meter["cpu_us_per_call"] + meter["server_cpu_us_per_call"]
        print(f"meter + nats-server CPU per call: {cpu:.0f} us; {os.cpu_count()} CPUs at most "
              f"{os.cpu_count() * 1e6 / cpu:,.0f} calls/s at that cost")  # fmt: skip
        print(f"meter / baseline: {ratio:.1%}; target >= 20,000 billed calls/s: "
              f"{'met' if meter['calls_per_s'] >= 20_000 else 'NOT met'}")  # fmt: skip
        h = meter["holds"]
        print(f"hold_credit at {h['rate']}/s (answered after its commit): p50 {h['p50_ms']:.2f} ms, "
              f"p99 {h['p99_ms']:.2f} ms over {h['requests']} requests, {h['refused']} refused")  # fmt: skip
        print(f"exactly once: {meter['verification']}")
    return 0 if meter["verification"].startswith("OK") else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
