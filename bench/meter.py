"""How many calls per second the meter bills: call.ended in, ledger rows committed and
ledger.charged published, next to a raw nats-py consumer doing the same rating without a
ledger, measured in the same run.

    .venv/bin/python bench/meter.py                  # 20,000 calls, readable report
    .venv/bin/python bench/meter.py --calls 50000 --json
    BENCH_PROFILE=1 .venv/bin/python bench/meter.py  # + cProfile of the meter process's loop

Each phase starts on empty streams (`callplane.topology.setup`). The meter runs as deployed:
`python -m services.meter`, a process of its own (NATS_URL, CALLPLANE_DATA_DIR in a temporary
directory, LOG_LEVEL=warning, every other setting at its default); the bench's process only
publishes, counts ledger.charged and asks for holds. The meter phase:
  1. publish the accounts, a top-up, and call.accepted + call.answered of every call; a meter
     process applies them, is stopped with SIGTERM and exits: every call is in progress, with
     an open hold (not timed);
  2. pause the meter-calls durable (a JetStream consumer pause) and publish call.ended of every
     call while no meter runs;
  3. start a second meter process. It loads its books from the ledger, connects and pulls; the
     server holds the deliveries while the durable is paused. Once both durables have its pull
     request waiting (its start-up, reported apart: spawn to ready, and the CPU it took), the
     pause is set to end 0.25 s ahead; the clock starts at that instant, when the server
     starts delivering the backlog, and stops at the last ledger.charged received by the bench
     (each is published only after its rows are committed). Meter CPU = user + system time of
     the meter process and of its ledger writer process (all their threads: the event loop,
     the writer's, DuckDB's own) over that span, from /proc, as for nats-server;
  4. then, the meter still running, send hold_credit requests one at a time at --hold-rate per
     second (each is answered once the hold is committed) and report their p50 / p99; the
     meter is stopped with SIGTERM and must exit cleanly (it owns the DuckDB file).
Then the ledger file is checked: exactly one charge per call, each the amount
`services.meter.core.rate_call` gives, and the balances agree (exactly once).

Why a paused durable: it measures what the in-process bench measured (a stored backlog of
call.ended drained, the books already loaded), with only the process boundary changed. The
alternatives each add something else to the clock: spawning the meter on the stored backlog
times the interpreter's start, the imports and the loading of 20,000 calls' books; publishing
the ends into a running, ready meter puts the publisher's work (the bench's CPU, nats-server
storing 20,000 messages) inside the timed span, which the baseline does not have, and shapes
what the meter sees by the publish rate. Why a pause that ends at a set time rather than the
resume call: nats-server 2.15 does not hand a waiting pull request the messages when a pause
is lifted by the resume API (they came with the request's next idle heartbeat, up to 5 s
later); when a pause runs out at its time, its timer delivers them at once (~1.5 ms measured).
The bench prints when the first ledger.charged arrived, to show it.

The baseline consumes the same call.ended events from the same durable with nats-py only
(continuous pull, decode, rate, publish ledger.charged pipelined, ack after its PubAck),
and writes nothing: what the meter's ledger and books cost on top of the messaging. It runs in
the bench's process, next to the bench's ledger.charged counter (as before).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

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
from services.meter.config import MeterSettings  # noqa: E402
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
    """Counts ledger.charged as it is published (after the meter's commit), noting when the
    first and the last arrived."""

    def __init__(self, nc, expected: int) -> None:  # noqa: ANN001
        self.nc, self.expected, self.seen = nc, expected, 0
        self.done = asyncio.Event()
        self.first = self.last = 0.0

    async def start(self) -> None:
        await self.nc.subscribe("ledger.charged.>", cb=self._on)

    async def _on(self, _msg: Msg) -> None:
        self.seen += 1
        self.last = time.perf_counter()
        if self.seen == 1:
            self.first = self.last
        if self.seen >= self.expected:
            self.done.set()


# -- the meter as deployed: a process of its own ----------------------------------------------

READY_TIMEOUT_S = 120.0  # start-up: the interpreter, the imports, the books loaded from the ledger
STOP_TIMEOUT_S = 60.0  # SIGTERM to exit (the service's consumers wait up to 30 s for work in flight)
PAUSE_LEAD_S = 0.25  # the durable's pause is set to end this far ahead: the clock starts then


def _descendants(pid: int) -> list[int]:
    """The processes `pid` started, and theirs (Linux /proc)."""
    found: list[int] = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            for child in children.read_text().split():
                found += [int(child), *_descendants(int(child))]
    return found


class MeterProcess:
    """`python -m services.meter`, as deployed, with its output in a log file."""

    def __init__(self, url: str, home: Path, label: str, profile: Path | None = None) -> None:
        # The bench's environment minus any meter setting: these three, the rest at their defaults.
        env = {k: v for k, v in os.environ.items() if k.lower() not in MeterSettings.__struct_fields__}
        env.update(NATS_URL=url, CALLPLANE_DATA_DIR=str(home), LOG_LEVEL="warning",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))  # fmt: skip
        argv = [sys.executable, "-m", "services.meter"]
        if profile is not None:  # the same module under cProfile, switched on and off by signals
            argv = [sys.executable, str(HERE / "profiled.py"), str(profile), "services.meter"]
        self.label, self.log = label, home / f"meter-{label}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self.spawned = time.perf_counter()

    def cpu_s(self) -> float:
        """User + system CPU so far of the process and the processes it started (its ledger
        writer), every thread (/proc)."""
        return self.own_cpu_s() + self.children_cpu_s()

    def own_cpu_s(self) -> float:
        return process_cpu_s(self.proc.pid)

    def children_cpu_s(self) -> float:
        return sum(process_cpu_s(pid) for pid in _descendants(self.proc.pid))

    def failed(self, what: str) -> RuntimeError:
        tail = self.log.read_text(errors="replace")[-3000:]
        status = self.proc.poll()
        state = "running" if status is None else f"exited with status {status}"
        return RuntimeError(f"meter process ({self.label}, {state}): {what}; its output:\n{tail}")

    async def wait_until(self, condition, what: str, timeout: float) -> None:  # noqa: ANN001
        deadline = time.monotonic() + timeout
        while not await condition():
            if self.proc.poll() is not None:
                raise self.failed(f"died before it could {what}")
            if time.monotonic() > deadline:
                raise self.failed(f"did not {what} within {timeout:g} s")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        """SIGTERM, then wait for a clean exit: the service drains and closes the ledger file."""
        self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise self.failed(f"did not exit within {STOP_TIMEOUT_S:g} s of SIGTERM")
            await asyncio.sleep(0.05)
        if self.proc.returncode != 0:
            raise self.failed("did not exit cleanly after SIGTERM")


@contextlib.asynccontextmanager
async def meter_process(url: str, home: Path, label: str, profile: Path | None = None):  # noqa: ANN201
    meter = MeterProcess(url, home, label, profile)
    try:
        yield meter
    finally:
        if meter.proc.poll() is None:  # something failed on the way: never leave it running
            meter.proc.terminate()
            try:
                meter.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                meter.proc.kill()
                meter.proc.wait()


def rfc3339(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat().replace("+00:00", "Z")


async def waiting(js: JetStreamContext, durable: str, stream: str) -> bool:
    """The durable has a pull request waiting: its consumer in the meter has started."""
    return bool((await js.consumer_info(stream, durable)).num_waiting)


async def meter_phase(url: str, n: int, timeout: float, server_pid: int, hold_rate: int) -> dict:
    setup, start, ends = calls(n)
    home = Path(tempfile.mkdtemp(prefix="bench-meter-"))
    profile = home / "meter.prof" if os.environ.get("BENCH_PROFILE") else None
    nc = await nats.connect(url)
    js = nc.jetstream()
    await reset(js)
    try:
        # 1. The calls' start, applied by a meter process that then stops (not timed).
        await publish(js, setup + start)
        async with meter_process(url, home, "start") as meter:

            async def applied() -> bool:
                return await drained(js, "meter-calls", "CALLS") and await drained(js, "meter-accounts", "ACCOUNTS")

            await meter.wait_until(applied, "apply the calls' start", timeout)
            await meter.stop()

        # 2. The ends, stored while no meter runs, behind a paused durable. No pull request may
        # be left waiting (the server drops a closed connection's; else they expire): one
        # waiting is how the next process is seen to be ready.
        deadline = time.monotonic() + 40
        while await waiting(js, "meter-calls", "CALLS") or await waiting(js, "meter-accounts", "ACCOUNTS"):
            if time.monotonic() > deadline:
                raise RuntimeError("pull requests still waiting on the meter's durables with no meter running")
            await asyncio.sleep(0.1)
        await js.pause_consumer("CALLS", "meter-calls", rfc3339(time.time() + 86_400))
        await publish(js, ends)
        counter = ChargeCounter(nc, n)
        await counter.start()

        # 3. A second meter process: start-up (books loaded) until its pull requests wait, then
        # the pause runs out and the clock runs to the last ledger.charged.
        async with meter_process(url, home, "ends", profile) as meter:

            async def ready() -> bool:
                return await waiting(js, "meter-calls", "CALLS") and await waiting(js, "meter-accounts", "ACCOUNTS")

            await meter.wait_until(ready, "start its consumers", READY_TIMEOUT_S)
            startup_s, startup_cpu = time.perf_counter() - meter.spawned, meter.cpu_s()
            if counter.seen:
                raise meter.failed("charged calls while its durable was paused")
            if profile:
                meter.proc.send_signal(signal.SIGUSR1)
            # The meter idles until the pause ends: CPU read now is its CPU at the clock's start.
            cpu0, server0 = time.process_time(), process_cpu_s(server_pid)
            meter0, writer0 = meter.own_cpu_s(), meter.children_cpu_s()
            started, until = time.perf_counter() + PAUSE_LEAD_S, time.time() + PAUSE_LEAD_S
            await js.pause_consumer("CALLS", "meter-calls", rfc3339(until))
            await asyncio.wait_for(counter.done.wait(), timeout + PAUSE_LEAD_S)
            server = process_cpu_s(server_pid) - server0
            writer_cpu = meter.children_cpu_s() - writer0
            meter_cpu = meter.own_cpu_s() - meter0 + writer_cpu
            elapsed, cpu = counter.last - started, time.process_time() - cpu0
            if profile:
                meter.proc.send_signal(signal.SIGUSR2)
            while not await drained(js, "meter-calls", "CALLS"):
                await asyncio.sleep(0.05)

            # 4. Holds, the meter still running; then it stops and releases the ledger file.
            holds = await hold_latency(nc, rate=hold_rate, seconds=3)
            await meter.stop()
    finally:
        await nc.close()
    if profile:
        print(f"cProfile of the meter process's event loop over the timed phase ({profile}):", file=sys.stderr)
        pstats.Stats(str(profile), stream=sys.stderr).sort_stats("tottime").print_stats(25)
    verified = verify(home / "meter" / "ledger.duckdb", ends)
    if profile is None:  # the ledger and the logs: checked, not kept (a profile is kept, with them)
        shutil.rmtree(home, ignore_errors=True)
    return {"calls_per_s": n / elapsed, "elapsed_s": elapsed, "cpu_us_per_call": meter_cpu / n * 1e6,
            "server_cpu_us_per_call": server / n * 1e6, "bench_cpu_us_per_call": cpu / n * 1e6,
            "writer_cpu_us_per_call": writer_cpu / n * 1e6, "first_charge_ms": (counter.first - started) * 1000, "startup_s": startup_s, "startup_cpu_s": startup_cpu,
            "holds": holds, "verification": verified}  # fmt: skip


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
            "SELECT count(*) FROM hold_states WHERE status = 'open' AND call_id NOT LIKE 'lat_%'"
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
        for label, figures in (("baseline: raw nats-py, in the bench", baseline),
                               ("meter (python -m services.meter)", meter)):  # fmt: skip
            print(f"  {label:<40}{figures['calls_per_s']:>10,.0f}{figures['elapsed_s']:>9.2f}s"
                  f"{figures['cpu_us_per_call']:>14.1f}{figures['server_cpu_us_per_call']:>16.1f}")  # fmt: skip
        print(f"CPU us/call: the baseline's is the bench process's; the meter's is its own process's and its "
              f"ledger writer's (all threads; the writer alone: {meter['writer_cpu_us_per_call']:.1f}); "
              f"the bench process's beside it (publishing nothing, counting ledger.charged): "
              f"{meter['bench_cpu_us_per_call']:.1f}")  # fmt: skip
        print(f"meter start-up (not timed): {meter['startup_s']:.2f} s from spawn to its pull requests waiting, "
              f"{meter['startup_cpu_s']:.2f} s CPU (interpreter, imports, books loaded, connect); "
              f"first ledger.charged {meter['first_charge_ms']:.1f} ms after the durable's pause ran out")  # fmt: skip
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
