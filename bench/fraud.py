"""Fraud detection lag: from publishing the threshold-crossing call.offered to receiving its
fraud.alert, at a steady background load of call.offered, against a raw nats-py baseline
measured in the same run.

It starts its own nats-server (JetStream, free port, temporary store). Two phases, each on
freshly set-up streams (`callplane.topology.setup`), each with its consumer in its own
process (as in production), the load generator and the probes in this one:

  - baseline: raw nats-py: a continuous pull on the `fraud` durable (an inbox fed by
    $JS.API.CONSUMER.MSG.NEXT requests, 1,000 ahead), decoding every offer with
    schemas.decode; a probe offer gets a fraud.alert published (pipelined PubAck), every
    offer is acked. Consume-and-republish with no detection logic: the floor.
  - fraud (as shipped): `python -m services.fraud` with its defaults (every detector on).

Load: RATE offers/s (default 5,000) spread over 1,000 registered numbers (each with a
fraud_alert policy it never exceeds, one account) from 131,072 source IPs (no scanner sweep).
Probes: every PROBE_MS one probe number (policy: more than 1 call in 10 minutes; its first
offer was sent during the warm-up) gets its second offer, the crossing one; the lag is the
time from just before that publish to the fraud.alert arriving on a core subscription.

    .venv/bin/python bench/fraud.py                 # about 1 minute
    .venv/bin/python bench/fraud.py --rate 5000 --seconds 20 --json

Exit status 1 when a probe's alert did not arrive or a phase did not keep up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import nats  # noqa: E402
from nats.aio.msg import Msg  # noqa: E402

from callplane import topology  # noqa: E402
from callplane.broker import publish_all  # noqa: E402
from schemas import (  # noqa: E402
    STREAMS,
    CallOffered,
    FraudAlert,
    FraudAlertPolicy,
    NumberPolicySet,
    NumberRegistered,
    SecurityPolicy,
    decode,
    derived_id,
    encode,
    subject_for,
    timestamp,
)
from tests.nats_server import free_port, nats_server_binary, wait_for_port  # noqa: E402

TARGET_P99_MS = 250.0
BACKGROUND_NUMBERS = 1000
TICK_S = 0.01  # the load generator publishes every 10 ms


def number(i: int, kind: str) -> str:
    return f"+4870{0 if kind == 'bg' else 1}{i:06d}"


def offer(event_id: str, to: str, source_ip: str) -> CallOffered:
    return CallOffered(
        event_id=event_id,
        occurred_at=timestamp(datetime.now(UTC)),
        call_id=event_id,
        to=to,
        from_="+15551234567",
        source_ip=source_ip,
        user_agent="bench/fraud",
    )


async def provision(js, probes: int) -> None:  # noqa: ANN001
    now = timestamp(datetime.now(UTC))
    events = []
    for kind, count, calls, account in (("bg", BACKGROUND_NUMBERS, 1_000_000, "acct_bg"), ("probe", probes, 1, "acct_probe")):
        policy = SecurityPolicy(fraud_alert=FraudAlertPolicy(calls=calls, window_minutes=10))
        for i in range(count):
            n = number(i, kind)
            events.append(NumberRegistered(event_id=f"reg-{n}", occurred_at=now, number=n, number_id=f"pn_{kind}{i}", account_id=account, provider="twilio"))  # fmt: skip
            events.append(NumberPolicySet(event_id=f"pol-{n}", occurred_at=now, number=n, policy=policy, policy_version=1))
    for start in range(0, len(events), 2000):
        await publish_all(js, events[start : start + 2000], timeout=30)


async def reset(js) -> None:  # noqa: ANN001
    for name in [*STREAMS, *(f"KV_{b}" for b in topology.KV_BUCKETS)]:
        try:
            await js.delete_stream(name)
        except nats.js.errors.NotFoundError:
            pass
    await topology.setup(js)


# -- the raw nats-py baseline (a process of its own) ------------------------------------


async def raw_worker(url: str) -> None:
    nc = await nats.connect(url, name="bench-fraud-baseline")
    js = nc.jetstream()
    inbox = nc.new_inbox()
    next_subject = "$JS.API.CONSUMER.MSG.NEXT.CALLS.fraud"
    state = {"requested": 0}

    async def pull() -> None:
        request = {"batch": 1000, "expires": int(30e9), "idle_heartbeat": int(5e9)}
        await nc.publish(next_subject, json.dumps(request).encode(), reply=inbox)
        state["requested"] += 1000

    async def on_message(msg: Msg) -> None:
        if not msg.reply:  # a status about the pull requests
            headers = msg.headers or {}
            if headers.get("Status") in ("408", "409") and headers.get("Nats-Pending-Messages"):
                state["requested"] -= int(headers["Nats-Pending-Messages"])
            elif headers.get("Status") != "100":
                state["requested"] = 0
            if state["requested"] <= 500:
                await pull()
            return
        state["requested"] -= 1
        event = decode(msg.data)
        if event.call_id.startswith("probe"):
            alert = FraudAlert(
                event_id=derived_id(event.event_id, "call_spike"), occurred_at=event.occurred_at, number=event.to,
                rule="call_spike", count=2, threshold=1, window_s=600, first_at=event.occurred_at, last_at=event.occurred_at,
            )  # fmt: skip
            future = await js.publish_async(subject_for(alert), encode(alert), headers={"Nats-Msg-Id": alert.event_id})
            future.add_done_callback(lambda _f: asyncio.ensure_future(msg.ack()))
        else:
            await msg.ack()
        if state["requested"] <= 500:
            await pull()

    await nc.subscribe(inbox, cb=on_message)
    await pull()
    print("ready", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_reader(sys.stdin.fileno(), stop.set)  # the parent closes our stdin
    await stop.wait()
    await nc.drain()


# -- one phase -------------------------------------------------------------------------------


def start_consumer(kind: str, url: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "NATS_URL": url, "PYTHONUNBUFFERED": "1"}
    if kind == "baseline":
        argv = [sys.executable, str(HERE / "fraud.py"), "--worker", "--url", url]
        ready = b"ready"
    else:
        argv = [sys.executable, "-m", "services.fraud"]
        ready = b"service_started"
    out = log.open("wb")
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, cwd=HERE.parent)
    deadline = time.monotonic() + 60
    while ready not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{kind} did not start; its log:\n{log.read_text()[-2000:]}")
        time.sleep(0.05)
    return proc


def stop_consumer(proc: subprocess.Popen) -> float:
    """Stop it; return the CPU seconds it used (children's rusage)."""
    proc.stdin.close()
    proc.terminate()
    _pid, _status, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0
    return usage.ru_utime + usage.ru_stime


async def phase(kind: str, url: str, rate: float, seconds: float, probe_ms: float, workdir: Path) -> dict:
    nc = await nats.connect(url, name=f"bench-fraud-{kind}")
    js = nc.jetstream()
    await reset(js)
    probes = int(seconds * 1000 / probe_ms)
    await provision(js, probes)
    proc = await asyncio.to_thread(start_consumer, kind, url, workdir / f"{kind}.log")
    sent: dict[str, float] = {}
    lags: list[float] = []

    async def on_alert(msg: Msg) -> None:
        got = time.perf_counter()
        alert = decode(msg.data)
        started = sent.pop(alert.event_id, None)
        if started is not None:
            lags.append((got - started) * 1000)

    await nc.subscribe("fraud.alert.*", cb=on_alert)
    published = probed = 0

    async def load(duration: float, probe_every: float | None) -> None:
        """Publish `rate` background offers a second (topped up every tick) and, if asked,
        a probe's crossing offer every `probe_every` seconds."""
        nonlocal published, probed
        loop = asyncio.get_running_loop()
        start, first = loop.time(), published
        next_probe, k = start + (probe_every or 0), 0
        while (now := loop.time()) - start < duration:
            while published - first < (now - start) * rate:
                i = published
                published += 1
                o = offer(f"bg-{i}", number(i % BACKGROUND_NUMBERS, "bg"), f"10.{(i >> 16) & 1}.{(i >> 8) & 255}.{i & 255}")
                await nc.publish(subject_for(o), encode(o), headers={"Nats-Msg-Id": o.event_id})
            if probe_every is not None and now >= next_probe and k < probes:
                o = offer(f"probe-{k}-b", number(k, "probe"), "192.0.2.1")
                sent[derived_id(o.event_id, "call_spike")] = time.perf_counter()
                await nc.publish(subject_for(o), encode(o), headers={"Nats-Msg-Id": o.event_id})
                next_probe += probe_every
                k += 1
                probed += 1
            await asyncio.sleep(TICK_S)

    # Warm-up: background load, and every probe number's first offer.
    for k in range(probes):
        o = offer(f"probe-{k}-a", number(k, "probe"), "192.0.2.1")
        await nc.publish(subject_for(o), encode(o), headers={"Nats-Msg-Id": o.event_id})
    await load(2.0, None)
    measured_from = published
    t0 = time.perf_counter()
    await load(seconds, probe_ms / 1000)
    offered_rate = (published - measured_from) / (time.perf_counter() - t0)
    deadline = time.perf_counter() + 30
    while len(lags) < probed and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
    info = await js.consumer_info("CALLS", "fraud")
    cpu = await asyncio.to_thread(stop_consumer, proc)
    await nc.drain()
    lags.sort()
    return {
        "consumer": kind,
        "offered_per_s": round(offered_rate),
        "probes": probed,
        "alerts": len(lags),
        "p50_ms": round(percentile(lags, 50), 1),
        "p99_ms": round(percentile(lags, 99), 1),
        "max_ms": round(lags[-1], 1) if lags else None,
        "backlog_at_end": info.num_pending + info.num_ack_pending,
        "consumer_cpu_s": round(cpu, 1),
        "wall_s": round(seconds + 2.0, 1),
    }


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


async def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-fraud-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        server = subprocess.Popen(
            [nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(workdir / "store")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port(port)
            url = f"nats://127.0.0.1:{port}"
            results = [
                await phase(kind, url, args.rate, args.seconds, args.probe_ms, workdir) for kind in ("baseline", "fraud")
            ]
        finally:
            server.terminate()
            server.wait()
    machine = {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2), "python": platform.python_version()}
    if args.json:
        print(json.dumps({"machine": machine, "rate": args.rate, "results": results}, indent=2))
    else:
        print(f"fraud detection lag at {args.rate:,.0f} call.offered/s, {args.seconds:g} s, a probe every {args.probe_ms:g} ms")
        print(f"machine: {machine['cpus']} CPUs, load average {machine['load_avg_1m']} (shared with other work)")
        print(f"{'consumer':<10} {'offered/s':>9} {'alerts':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'backlog':>8} {'CPU s':>6}")
        for r in results:
            print(
                f"{r['consumer']:<10} {r['offered_per_s']:>9,} {r['alerts']:>4}/{r['probes']:<4} {r['p50_ms']:>8} "
                f"{r['p99_ms']:>8} {r['max_ms']!s:>8} {r['backlog_at_end']:>8} {r['consumer_cpu_s']:>6}"
            )
        fraud = results[-1]
        verdict = "meets" if fraud["p99_ms"] <= TARGET_P99_MS else "MISSES"
        print(f"fraud p99 {fraud['p99_ms']} ms {verdict} the target of {TARGET_P99_MS:g} ms (baseline p99 {results[0]['p99_ms']} ms)")
    return 0 if all(r["alerts"] == r["probes"] for r in results) else 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=5000, help="background call.offered per second (default 5000)")
    parser.add_argument("--seconds", type=float, default=20, help="measured seconds per phase (default 20)")
    parser.add_argument("--probe-ms", type=float, default=50, help="a threshold-crossing probe every N ms (default 50)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # the baseline's own process
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        asyncio.run(raw_worker(args.url))
        return
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
