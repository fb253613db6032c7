"""Admission benchmark: the gatekeeper as shipped against a raw nats-py baseline.

    .venv/bin/python bench/admission.py                 # readable report
    .venv/bin/python bench/admission.py --json          # the same figures as JSON
    .venv/bin/python bench/admission.py --offers 5000 --rate 500 --seconds 3
    .venv/bin/python bench/admission.py --profile gatekeeper   # cProfile of that saturation phase

It starts its own nats-server (JetStream, free port, temporary store) and measures, in one run:

1. saturation: N offers are pre-published to CALLS, then the consumer under test starts on
   the `gatekeeper` durable and the clock runs until N decisions are stored in the stream
   (and every offer is acked). Consumers under test:
     - baseline, continuous pull: raw nats-py, a core subscription on an inbox fed by
       pull requests ($JS.API.CONSUMER.MSG.NEXT) that are topped up as messages arrive;
     - baseline, fetch: raw nats-py, `pull_subscribe_bind` + `fetch(batch)` in a loop;
     - runtime: `callplane.broker.consume` (the consumer runtime, defaults as services
       get them) with the baselines' handler: what the runtime costs over raw nats-py;
     - gatekeeper: `services.gatekeeper.app.wire` through `callplane.service.open_service`
       and `Service.start`, in this process, exactly as `callplane.service.serve` does.
   Both baselines decode with `schemas.decode`, accept, publish a call.accepted of the same
   shape as the gatekeeper's with `js.publish_async` (pipelined PubAcks) and `Nats-Msg-Id`,
   and ack each input once its decision's PubAck arrived.
2. latency: the consumer under test runs in this process while a driver (this script in
   `--driver` mode, a separate process) publishes offers at a fixed rate, stamps each
   publish (monotonic clock), and stamps each decision received on a core NATS
   subscription to call.accepted.* and call.rejected.*.

Streams are deleted and re-created with `callplane.topology.setup` before every phase.
After every phase the decisions stored in CALLS are read back and counted by call_id:
the run says whether every offer got exactly one decision.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import io
import json
import math
import os
import platform
import pstats
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402
import nats  # noqa: E402
import nats.errors  # noqa: E402
from nats.aio.client import Client  # noqa: E402
from nats.aio.msg import Msg  # noqa: E402
from nats.js import JetStreamContext  # noqa: E402
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy  # noqa: E402
from nats.js.errors import NotFoundError  # noqa: E402

from callplane import topology  # noqa: E402
from schemas import (  # noqa: E402
    STREAMS,
    CallAccepted,
    CallOffered,
    Check,
    Decision,
    NumberAssigned,
    NumberRegistered,
    Reply,
    decode,
    decode_command,
    derived_id,
    encode,
    encode_message,
    rpc,
    subject_for,
    timestamp,
)
from schemas.commands import HoldCredit, HoldCredits, HoldView  # noqa: E402
from tests.nats_server import local_server, nats_server_binary  # noqa: E402

NUMBER = "+48123456789"
CALLER = "+15551234567"
ACCOUNT = "acct_bench"
AGENT = "agent_bench"
DURABLE = "gatekeeper"
STREAM = "CALLS"
DECISION_SUBJECTS = ("call.accepted.*", "call.rejected.*")
PROFILE_OUT = ""  # --profile-out: also write the raw cProfile stats there
WARMUP_S = 0.5  # latency phase: offers sent before the measured window (verified, not timed)

# Targets from the issue, for the report.
TARGET_RATIO = 50.0  # admissions at saturation, % of the baseline
TARGET_P99_MS = 5.0  # p99 decision latency at 1,000 offers/s


class DecisionRef(msgspec.Struct):
    """The two fields of a decision the bench needs (msgspec skips the rest)."""

    type: str
    call_id: str


_ref_decoder = msgspec.json.Decoder(DecisionRef)


# -- offers ------------------------------------------------------------------------


def build_offers(tag: str, n: int, start: int = 0) -> list[tuple[str, bytes, str, str]]:
    """(subject, body, Nats-Msg-Id, call_id) of n inbound offers to the bench number."""
    now = timestamp(datetime.now(UTC))
    out = []
    for i in range(start, start + n):
        offer = CallOffered(
            event_id=f"{tag}-{i}",
            occurred_at=now,
            call_id=f"{tag}-{i}",
            to=NUMBER,
            from_=CALLER,
            source_ip="203.0.113.17",
            transport="tls",
            srtp=True,
            user_agent="bench/admission",
            sip_headers={"X-Bench-Call": f"{tag}-{i}"},
        )
        out.append((subject_for(offer), encode(offer), offer.event_id, offer.call_id))
    return out


async def publish_offers(js: JetStreamContext, offers: list[tuple[str, bytes, str, str]]) -> None:
    pending = []
    for subject, body, msg_id, _ in offers:
        pending.append(await js.publish_async(subject, body, headers={"Nats-Msg-Id": msg_id}))
        if len(pending) >= 2000:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)


# -- the baseline: raw nats-py -----------------------------------------------------


def accept(offer: CallOffered) -> CallAccepted:
    """The baselines' decision: a call.accepted of the same shape and size as the gatekeeper's."""
    now = timestamp(datetime.now(UTC))
    return CallAccepted(
        event_id=derived_id(offer.event_id, "decision"),
        occurred_at=now,
        call_id=offer.call_id,
        number=offer.number,
        account_id=ACCOUNT,
        agent_id=AGENT,
        dynamic_variables={
            "system__caller_id": offer.from_,
            "system__called_number": offer.to,
            "system__call_sid": offer.call_id,
            "system__agent_id": AGENT,
            "system__time_utc": now,
        },
        decision=Decision(
            policy_version=0,
            checks=(
                Check(name="registered", passed=True, inputs={"number": offer.number}),
                Check(name="agent_assigned", passed=True, inputs={"agent_id": AGENT}),
            ),
        ),
    )


class Baseline:
    """Consume the gatekeeper durable with nats-py only: decode, accept, publish, ack.

    Each input is acked only after the PubAck of its decision arrived (the same
    at-least-once order as the gatekeeper), but PubAcks are pipelined: an acker task
    awaits them in order while the handler goes on with the next offer.
    """

    def __init__(self, url: str, mode: str, batch: int) -> None:
        self.url, self.mode, self.batch = url, mode, batch
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self.acks: deque[tuple[asyncio.Future, Msg]] = deque()
        self.wake = asyncio.Event()
        self.tasks: list[asyncio.Task] = []
        self.running = False
        self.outstanding = 0  # continuous pull: messages requested and not yet received
        self.inbox = ""
        self.decided = 0

    @property
    def label(self) -> str:
        return "baseline: continuous pull" if self.mode == "pull" else f"baseline: fetch({self.batch})"

    async def prepare(self) -> None:
        self.nc = await nats.connect(self.url, name=f"bench-baseline-{self.mode}")
        self.js = self.nc.jetstream()

    async def start(self) -> None:
        self.running = True
        self.tasks.append(asyncio.create_task(self._acker()))
        if self.mode == "pull":
            self.inbox = self.nc.new_inbox()
            await self.nc.subscribe(self.inbox, cb=self._on_pulled)
            await self._top_up()
        else:
            self.tasks.append(asyncio.create_task(self._fetch_loop()))

    async def stop(self) -> None:
        self.running = False
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await self.nc.close()

    async def handle(self, msg: Msg) -> None:
        offer = decode(msg.data)
        if not isinstance(offer, CallOffered):
            await msg.ack()
            return
        reply = accept(offer)
        future = await self.js.publish_async(subject_for(reply), encode(reply), headers={"Nats-Msg-Id": reply.event_id})
        self.acks.append((future, msg))
        self.wake.set()
        self.decided += 1

    async def _acker(self) -> None:
        while True:
            while not self.acks:
                self.wake.clear()
                await self.wake.wait()
            future, msg = self.acks.popleft()
            try:
                await future
            except Exception:  # noqa: BLE001 - no PubAck: let JetStream redeliver the offer
                await msg.nak()
                continue
            await msg.ack()

    # fetch: the documented nats-py way
    async def _fetch_loop(self) -> None:
        sub = await self.js.pull_subscribe_bind(DURABLE, STREAM)
        while self.running:
            try:
                msgs = await sub.fetch(self.batch, timeout=1.0)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            for msg in msgs:
                await self.handle(msg)

    # continuous pull: pull requests answered on one inbox, handled by a callback
    async def _top_up(self) -> None:
        want = self.batch - self.outstanding
        if want <= 0 or not self.running:
            return
        request = {"batch": want, "expires": 5_000_000_000}  # 5 s, in ns
        await self.nc.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{DURABLE}", json.dumps(request).encode(), reply=self.inbox
        )
        self.outstanding += want

    async def _on_pulled(self, msg: Msg) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if status:
            if status != "100":  # 408 expired / 409: the unfilled part of a request is void
                self.outstanding -= int(msg.headers.get("Nats-Pending-Messages", 0) or 0)
                await self._top_up()
            return
        self.outstanding -= 1
        await self.handle(msg)
        if self.outstanding <= self.batch // 2:
            await self._top_up()


# -- the consumer runtime alone -----------------------------------------------------


class RuntimeBaseline:
    """`callplane.broker.consume` as services get it (its defaults, and the GC tuned as
    `callplane.service.open_service` does), with the baselines' handler (`accept`): what
    the runtime costs over raw nats-py, apart from whatever the gatekeeper's logic costs."""

    label = "runtime: callplane.broker"

    def __init__(self, url: str) -> None:
        self.url = url
        self.broker = None
        self.thresholds = gc.get_threshold()

    async def prepare(self) -> None:
        from callplane.broker import consume, make_broker
        from callplane.config import NatsSettings
        from callplane.service import tune_gc

        self.broker = make_broker(NatsSettings(nats_url=self.url), service="bench")
        await self.broker.connect()
        consume(self.broker, topology.consumer(DURABLE), self.handle)
        tune_gc()  # as callplane.service.open_service does for every service

    async def handle(self, event: object, _meta: object) -> list:
        return [accept(event)] if isinstance(event, CallOffered) else []

    async def start(self) -> None:
        from callplane.broker import start_consumers

        await start_consumers(self.broker)

    async def stop(self) -> None:
        from callplane.broker import stop_consumers

        try:
            await stop_consumers(self.broker)
            await self.broker.stop()
        finally:
            gc.unfreeze()  # undo tune_gc for the phases that follow
            gc.set_threshold(*self.thresholds)


# -- the gatekeeper as shipped ------------------------------------------------------


class ShippedGatekeeper:
    """`callplane.service.serve` for the gatekeeper, minus the signal handling: the same
    `open_service` (connect, wire, topology check, broker start, GC tuned) before the
    clock starts, then `Service.start` (the durable consumers) and `Service.stop`."""

    label = "gatekeeper (as shipped)"  # bench/whatif.py renames it when it patches the path

    def __init__(self, url: str, log_level: str) -> None:
        self.url, self.log_level = url, log_level
        self.service = None
        self.thresholds = gc.get_threshold()

    async def prepare(self) -> None:
        from callplane.service import open_service
        from services.gatekeeper.app import wire
        from services.gatekeeper.config import GatekeeperSettings

        settings = GatekeeperSettings(nats_url=self.url, log_level=self.log_level)
        self.service = await open_service("gatekeeper", settings, wire)

    async def start(self) -> None:
        await self.service.start()

    async def stop(self) -> None:
        try:
            await self.service.stop()
        finally:
            # open_service tuned the GC for good (callplane.service.tune_gc), as a service
            # does once; this process goes on to measure other consumers: undo it.
            gc.unfreeze()
            gc.set_threshold(*self.thresholds)


async def register_number(js: JetStreamContext) -> None:
    """The number every offer calls: registered to an account, its agent assigned."""
    from callplane.broker import publish

    now = timestamp(datetime.now(UTC))
    await publish(
        js,
        NumberRegistered(
            event_id="bench-number-registered",
            occurred_at=now,
            number=NUMBER,
            number_id="pn_bench",
            account_id=ACCOUNT,
            provider="sip_trunk",
        ),
    )
    await publish(js, NumberAssigned(event_id="bench-number-assigned", occurred_at=now, number=NUMBER, agent_id=AGENT))


# -- measurement helpers ------------------------------------------------------------


class GcWatch:
    """Collections of the garbage collector in this process (the consumer under test) while
    a phase runs: how many full (generation 2) ones and how long the longest pause was."""

    def __init__(self) -> None:
        self.started = 0.0
        self.pauses: list[tuple[int, float]] = []
        self.tracked_objects = 0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.started = time.perf_counter()
        else:
            self.pauses.append((info["generation"], (time.perf_counter() - self.started) * 1000))

    def __enter__(self) -> GcWatch:
        self.tracked_objects = len(gc.get_objects())
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *_exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def summary(self) -> dict:
        full = [ms for generation, ms in self.pauses if generation == 2]
        return {
            "tracked_objects_at_start": self.tracked_objects,
            "collections": len(self.pauses),
            "full_collections": len(full),
            "full_max_ms": max(full, default=0.0),
            "max_ms": max((ms for _, ms in self.pauses), default=0.0),  # the longest of any generation
            "full_total_ms": sum(full),
            "all_total_ms": sum(ms for _, ms in self.pauses),
        }



def process_cpu_s(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


class Env:
    def __init__(self, url: str, server_pid: int, log_level: str) -> None:
        self.url, self.server_pid, self.log_level = url, server_pid, log_level
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self.meter: StandInMeter | None = None

    async def connect(self) -> None:
        self.nc = await nats.connect(self.url, name="bench-control")
        self.js = self.nc.jetstream()

    async def reset(self, *, gatekeeper: bool) -> None:
        # The consumer of the previous phase is gone, but its objects may sit in reference
        # cycles: free them now, not during the next phase's measurement.
        gc.collect()
        for name in STREAMS:
            with contextlib.suppress(NotFoundError):
                await self.js.delete_stream(name)
        await topology.setup(self.js)
        if gatekeeper:
            await register_number(self.js)

    async def stream_state(self) -> dict:
        """Raw STREAM.INFO state (nats-py's StreamState drops last_ts)."""
        response = await self.nc.request(f"$JS.API.STREAM.INFO.{STREAM}", b"", timeout=5)
        return json.loads(response.data)["state"]

    def server_cpu_s(self) -> float:
        return process_cpu_s(self.server_pid)

    async def decision_subjects(self) -> dict[str, int]:
        """Decisions stored in CALLS, by subject (call.accepted.<number>, call.rejected.<number>)."""
        request = json.dumps({"subjects_filter": "call.*.*"}).encode()
        response = await self.nc.request(f"$JS.API.STREAM.INFO.{STREAM}", request, timeout=5)
        subjects = json.loads(response.data)["state"].get("subjects") or {}
        return {s: n for s, n in subjects.items() if s.split(".")[1] in ("accepted", "rejected")}

    async def last_decision_ts(self, subjects: dict[str, int]) -> float:
        """The server's time of the last stored decision (epoch seconds; 0.0 if none)."""
        last = 0.0
        for subject in subjects:
            got = await self.nc.request(
                f"$JS.API.DIRECT.GET.{STREAM}", json.dumps({"last_by_subj": subject}).encode(), timeout=5
            )
            if got.headers and "Nats-Time-Stamp" in got.headers:
                last = max(last, parse_server_ts(got.headers["Nats-Time-Stamp"]))
        return last

    def sut(self, kind: str, batch: int) -> Baseline | RuntimeBaseline | ShippedGatekeeper:
        if kind == "gatekeeper":
            return ShippedGatekeeper(self.url, self.log_level)
        if kind == "runtime":
            return RuntimeBaseline(self.url)
        return Baseline(self.url, kind, batch)


def parse_server_ts(value: str) -> float:
    """nats-server's RFC 3339 UTC time with nanoseconds -> epoch seconds."""
    value = value.rstrip("Z")
    whole, _, fraction = value.partition(".")
    return datetime.fromisoformat(whole).replace(tzinfo=UTC).timestamp() + (float(f"0.{fraction}") if fraction else 0.0)


async def wait_drained(env: Env, offers: int, deadline: float) -> tuple[bool, dict[str, int]]:
    """Until CALLS holds a decision per offer and the durable has nothing pending or unacked
    (an accepted call's call.answered comes back to the durable too)."""
    subjects: dict[str, int] = {}
    while True:
        subjects = await env.decision_subjects()
        if sum(subjects.values()) >= offers:
            info = await env.js.consumer_info(STREAM, DURABLE)
            if info.num_pending == 0 and info.num_ack_pending == 0:
                return True, subjects
        if time.monotonic() > deadline:
            return False, subjects
        await asyncio.sleep(0.02)


@dataclass
class Verification:
    offers: int
    decisions_stored: int
    accepted: int
    rejected: int
    offers_with_one: int
    offers_with_none: int
    offers_with_more: int
    unexpected: int

    @property
    def exactly_once(self) -> bool:
        return self.offers_with_one == self.offers and self.decisions_stored == self.offers and not self.unexpected

    def text(self) -> str:
        if self.exactly_once:
            return (
                f"OK: {self.offers}/{self.offers} offers have exactly one stored decision "
                f"({self.accepted} accepted, {self.rejected} rejected)"
            )
        return (
            f"FAILED: {self.offers_with_one}/{self.offers} offers with exactly one decision, "
            f"{self.offers_with_none} with none, {self.offers_with_more} with several, {self.unexpected} unexpected"
        )


async def verify(env: Env, call_ids: list[str], timeout: float = 30.0) -> Verification:
    """Read every decision stored in CALLS back and count them by call_id."""
    config = ConsumerConfig(
        filter_subjects=list(DECISION_SUBJECTS),
        ack_policy=AckPolicy.NONE,
        deliver_policy=DeliverPolicy.ALL,
        mem_storage=True,
        inactive_threshold=30.0,
    )
    sub = await env.js.pull_subscribe("call.>", stream=STREAM, config=config)
    counts: Counter[str] = Counter()
    types: Counter[str] = Counter()
    deadline = time.monotonic() + timeout
    with contextlib.suppress(Exception):
        while time.monotonic() < deadline:
            try:
                msgs = await sub.fetch(1000, timeout=1.0)
            except (nats.errors.TimeoutError, TimeoutError):
                break
            for msg in msgs:
                ref = _ref_decoder.decode(msg.data)
                counts[ref.call_id] += 1
                types[ref.type] += 1
            if msgs and msgs[-1].metadata.num_pending == 0:
                break
    with contextlib.suppress(Exception):
        await sub.unsubscribe()
    expected = set(call_ids)
    per_offer = [counts.get(c, 0) for c in call_ids]
    return Verification(
        offers=len(call_ids),
        decisions_stored=sum(counts.values()),
        accepted=types["call.accepted"],
        rejected=types["call.rejected"],
        offers_with_one=sum(1 for c in per_offer if c == 1),
        offers_with_none=sum(1 for c in per_offer if c == 0),
        offers_with_more=sum(1 for c in per_offer if c > 1),
        unexpected=sum(n for c, n in counts.items() if c not in expected),
    )


# -- phases -------------------------------------------------------------------------


@dataclass
class Saturation:
    consumer: str
    offers: int
    completed: bool
    decisions_per_s: float  # offers / (last decision stored - consumer start)
    elapsed_s: float
    drained_s: float  # until every offer was also acked (polled every 20 ms)
    publish_offers_per_s: float
    cpu_us_per_offer_bench: float  # this process (the consumer under test, plus 50 polls/s)
    cpu_us_per_offer_server: float
    redelivered: int
    gc: dict
    verification: Verification
    meter: dict  # the stand-in meter during the phase: requests, holds, holds per request, CPU


async def saturation(env: Env, kind: str, n: int, batch: int, timeout: float, profile: bool) -> Saturation:
    await env.reset(gatekeeper=kind == "gatekeeper")
    offers = build_offers(f"s{kind[:2]}", n)
    started = time.monotonic()
    await publish_offers(env.js, offers)
    publish_rate = n / (time.monotonic() - started)
    state = await env.stream_state()
    assert state["messages"] == n, f"expected {n} offers in {STREAM}, found {state['messages']}"

    sut = env.sut(kind, batch)
    await sut.prepare()
    gc.collect()  # start from a clean heap, as a freshly started service would
    profiler = cProfile.Profile() if profile else None
    hops = count_thread_hops() if profile else contextlib.nullcontext(Counter())
    watch = GcWatch()
    meter0 = await meter_snapshot(env)
    cpu0, server0 = time.process_time(), env.server_cpu_s()
    wall0, t0 = time.time(), time.monotonic()
    if profiler:
        profiler.enable()
    with watch, hops as hop_counts:
        await sut.start()
        try:
            completed, state = await wait_drained(env, n, t0 + timeout)
        finally:
            drained = time.monotonic() - t0
            if profiler:
                profiler.disable()
            cpu, server = time.process_time() - cpu0, env.server_cpu_s() - server0
            meter = meter_delta(meter0, await meter_snapshot(env), n)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sut.stop(), 10)
    if profiler:
        print_profile(profiler, sut.label)
        print(f"calls run in anyio's worker threads during the phase ({n} offers):", file=sys.stderr)
        for name, count in hop_counts.most_common(5) or [("none", 0)]:
            print(f"  {count:8d}  {name}", file=sys.stderr)
        if PROFILE_OUT:
            profiler.dump_stats(PROFILE_OUT)
    decisions = sum(state.values())
    elapsed = await env.last_decision_ts(state) - wall0 if completed else drained
    info = await env.js.consumer_info(STREAM, DURABLE)
    return Saturation(
        consumer=sut.label,
        offers=n,
        completed=completed,
        decisions_per_s=decisions / elapsed if elapsed > 0 else float("nan"),
        elapsed_s=elapsed,
        drained_s=drained,
        publish_offers_per_s=publish_rate,
        cpu_us_per_offer_bench=cpu / n * 1e6,
        cpu_us_per_offer_server=server / n * 1e6,
        redelivered=info.num_redelivered or 0,
        gc=watch.summary(),
        verification=await verify(env, [o[3] for o in offers]),
        meter=meter,
    )


@dataclass
class Latency:
    consumer: str
    rate: float
    seconds: float
    completed: bool
    offers_sent: int  # including the warm-up
    measured: int  # offers in the measured window (after the warm-up)
    decisions_received: int  # measured offers whose decision arrived (first copy)
    duplicates_on_wire: int
    achieved_rate: float
    max_schedule_lag_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    redelivered: int
    gc: dict
    verification: Verification
    meter: dict
    error: str = ""


async def latency(env: Env, kind: str, rate: float, seconds: float, batch: int, timeout: float) -> Latency:
    await env.reset(gatekeeper=kind == "gatekeeper")
    sut = env.sut(kind, batch)
    await sut.prepare()
    gc.collect()  # start from a clean heap, as a freshly started service would
    watch = GcWatch()
    watch.__enter__()
    meter0 = await meter_snapshot(env)
    await sut.start()
    tag = f"l{kind[:2]}"
    driver: dict = {}
    meter: dict = {}
    error = ""
    sent, completed = 0, False
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(Path(__file__).resolve()),
            "--driver",
            env.url,
            "--rate",
            str(rate),
            "--seconds",
            str(seconds),
            "--tag",
            tag,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout=seconds + WARMUP_S + timeout)
            driver = json.loads(out)
        except (TimeoutError, json.JSONDecodeError) as exc:
            error = f"driver failed: {exc!r}"
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        sent = driver.get("offers_sent", 0)
        completed, _ = await wait_drained(env, sent, time.monotonic() + timeout) if sent else (False, {})
        meter = meter_delta(meter0, await meter_snapshot(env), sent)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(sut.stop(), 10)
        watch.__exit__()
    info = await env.js.consumer_info(STREAM, DURABLE)
    stats = driver.get("latency_ms", {})
    nan = float("nan")
    return Latency(
        consumer=sut.label,
        rate=rate,
        seconds=seconds,
        completed=completed and not error and driver.get("missing", 1) == 0,
        offers_sent=sent,
        measured=driver.get("measured", 0),
        decisions_received=driver.get("received", 0),
        duplicates_on_wire=driver.get("duplicates", 0),
        achieved_rate=driver.get("achieved_rate", nan),
        max_schedule_lag_ms=driver.get("max_schedule_lag_ms", nan),
        p50_ms=stats.get("p50", nan),
        p90_ms=stats.get("p90", nan),
        p99_ms=stats.get("p99", nan),
        max_ms=stats.get("max", nan),
        mean_ms=stats.get("mean", nan),
        redelivered=info.num_redelivered or 0,
        gc=watch.summary(),
        verification=await verify(env, [f"{tag}-{i}" for i in range(sent)]),
        meter=meter,
        error=error,
    )


# -- the stand-in meter (a separate process) ----------------------------------------

METER_STATS = "bench.meter.stats"  # the stand-in meter answers its counters here
HOLD_MILLICREDITS = 1_000


def _held(command: HoldCredit) -> Reply:
    hold = HoldView(hold_id=f"hold_{command.call_id}", amount_millicredits=HOLD_MILLICREDITS)
    return Reply(ok=True, hold=hold)


async def serve_meter(url: str, mode: str) -> None:
    """A raw nats-py responder standing in for the meter's credit holds, so that the
    gatekeeper admits calls. It grants every hold (no ledger). mode `batch` answers
    hold_credit and hold_credits; `single` answers hold_credits as a meter that does not
    handle it (`invalid`, like callplane.commands.serve_commands). Prints `ready` once
    subscribed and runs until its stdin closes."""
    nc = await nats.connect(url, name="bench-meter")
    counts: Counter[str] = Counter()

    async def on_hold(msg: Msg) -> None:
        command = decode_command(msg.data)
        counts["requests"] += 1
        counts["holds"] += 1
        await msg.respond(encode_message(_held(command)))

    async def on_holds(msg: Msg) -> None:
        command = decode_command(msg.data)
        if mode != "batch" or not isinstance(command, HoldCredits):
            counts["refused_batches"] += 1
            message = "the meter does not handle hold_credits"
            reply = Reply(ok=False, code="invalid", message=message, field="command", rule="known_command")
            await msg.respond(encode_message(reply))
            return
        counts["requests"] += 1
        counts["batches"] += 1
        counts["holds"] += len(command.requests)
        counts["largest_batch"] = max(counts["largest_batch"], len(command.requests))
        await msg.respond(encode_message(Reply(ok=True, replies=[_held(r) for r in command.requests])))

    async def on_stats(msg: Msg) -> None:
        await msg.respond(json.dumps(dict(counts)).encode())

    await nc.subscribe(rpc("meter", "hold_credit"), cb=on_hold)
    await nc.subscribe(rpc("meter", "hold_credits"), cb=on_holds)
    await nc.subscribe(METER_STATS, cb=on_stats)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the bench closes it
    await nc.close()


class StandInMeter:
    """The stand-in meter process, started once per run (`--meter batch|single`)."""

    def __init__(self, url: str, mode: str) -> None:
        self.url, self.mode = url, mode
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, str(Path(__file__).resolve()), "--meter-process", self.url, "--meter", self.mode,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        if line.strip() != b"ready":
            raise RuntimeError(f"the stand-in meter did not start: {line!r}")

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()

    def cpu_s(self) -> float:
        return process_cpu_s(self.proc.pid) if self.proc else float("nan")


async def meter_snapshot(env: Env) -> dict:
    """The stand-in meter's counters and CPU time so far (empty without a meter)."""
    if env.meter is None:
        return {}
    response = await env.nc.request(METER_STATS, b"", timeout=5)
    return {**json.loads(response.data), "cpu_s": env.meter.cpu_s()}


def meter_delta(before: dict, after: dict, offers: int) -> dict:
    if not after:
        return {}
    requests = after.get("requests", 0) - before.get("requests", 0)
    holds = after.get("holds", 0) - before.get("holds", 0)
    return {
        "requests": requests,
        "holds": holds,
        "batches": after.get("batches", 0) - before.get("batches", 0),
        "refused_batches": after.get("refused_batches", 0) - before.get("refused_batches", 0),
        "holds_per_request": holds / requests if requests else 0.0,
        "cpu_us_per_offer": (after["cpu_s"] - before["cpu_s"]) / offers * 1e6 if offers else float("nan"),
    }


# -- the latency driver (a separate process) ----------------------------------------


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)]


async def drive(url: str, rate: float, seconds: float, tag: str, drain_timeout: float = 15.0) -> dict:
    nc = await nats.connect(url, name="bench-driver")
    js = nc.jetstream()
    warm, measured = int(rate * WARMUP_S), int(rate * seconds)
    offers = build_offers(tag, warm + measured)
    index = {o[3]: i for i, o in enumerate(offers)}
    sent = [0.0] * len(offers)
    received: dict[int, float] = {}
    copies: Counter[int] = Counter()
    all_in = asyncio.Event()

    async def on_decision(msg: Msg) -> None:
        now = time.monotonic()
        i = index.get(_ref_decoder.decode(msg.data).call_id)
        if i is None:
            return
        copies[i] += 1
        if i not in received:
            received[i] = now
            if len(received) == len(offers):
                all_in.set()

    for subject in DECISION_SUBJECTS:
        await nc.subscribe(subject, cb=on_decision)
    await nc.flush()

    futures = []
    lag = 0.0
    t0 = time.monotonic()
    for i, (subject, body, msg_id, _) in enumerate(offers):
        due = t0 + i / rate
        if (delay := due - time.monotonic()) > 0:
            await asyncio.sleep(delay)
        sent[i] = now = time.monotonic()
        lag = max(lag, now - due) if i >= warm else lag
        futures.append(await js.publish_async(subject, body, headers={"Nats-Msg-Id": msg_id}))
    window = time.monotonic() - (t0 + warm / rate)
    acks = await asyncio.gather(*futures, return_exceptions=True)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_in.wait(), drain_timeout)
    await nc.close()

    latencies = sorted((received[i] - sent[i]) * 1000 for i in range(warm, len(offers)) if i in received)
    return {
        "offers_sent": len(offers),
        "warmup": warm,
        "measured": measured,
        "received": len(latencies),
        "missing": len(offers) - len(received),
        "duplicates": sum(c - 1 for c in copies.values() if c > 1),
        "publish_errors": sum(1 for a in acks if isinstance(a, BaseException)),
        "achieved_rate": measured / window if window > 0 else float("nan"),
        "max_schedule_lag_ms": lag * 1000,
        "latency_ms": {
            "p50": percentile(latencies, 50),
            "p90": percentile(latencies, 90),
            "p99": percentile(latencies, 99),
            "max": latencies[-1] if latencies else float("nan"),
            "mean": sum(latencies) / len(latencies) if latencies else float("nan"),
        },
    }


# -- profile ------------------------------------------------------------------------


def print_profile(profiler: cProfile.Profile, label: str, top: int = 25) -> None:
    """Own time grouped by package, then the top functions by own time (to stderr)."""
    stats = pstats.Stats(profiler)
    groups: Counter[str] = Counter()
    total = 0.0
    for (filename, _line, func), (_cc, _nc, tottime, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        total += tottime
        groups[package_of(filename, func)] += tottime
    out = sys.stderr
    print(f"\n== profile of the saturation phase: {label} (own time by package) ==", file=out)
    for name, seconds in groups.most_common(15):
        print(f"  {seconds:7.3f} s  {seconds / total * 100:5.1f} %  {name}", file=out)
    buffer = io.StringIO()
    pstats.Stats(profiler, stream=buffer).sort_stats("tottime").print_stats(top)
    print(buffer.getvalue(), file=out)


@contextlib.contextmanager
def count_thread_hops():  # noqa: ANN201
    """Count what anyio.to_thread.run_sync is asked to run (fast_depends sends sync
    dependencies there), by function, while the block runs."""
    import anyio.to_thread

    counts: Counter[str] = Counter()
    original = anyio.to_thread.run_sync

    async def counting(func, *args, **kwargs):  # noqa: ANN001, ANN202
        target = getattr(func, "func", func)  # functools.partial
        counts[getattr(target, "__qualname__", repr(target))] += 1
        return await original(func, *args, **kwargs)

    anyio.to_thread.run_sync = counting
    try:
        yield counts
    finally:
        anyio.to_thread.run_sync = original


def package_of(filename: str, func: str) -> str:
    if filename == "~":
        return "C builtins (socket I/O, contextvars, msgspec, ...)"
    path = Path(filename)
    parts = path.parts
    if "site-packages" in parts:
        return parts[parts.index("site-packages") + 1]
    with contextlib.suppress(ValueError):
        rel = path.resolve().relative_to(ROOT)
        return "/".join(rel.parts[:2]) if rel.parts[0] == "services" else rel.parts[0]
    if "asyncio" in parts:
        return "stdlib asyncio"
    return f"stdlib {path.stem}"


# -- report -------------------------------------------------------------------------


def machine_info() -> dict:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    server = subprocess.run([nats_server_binary(), "--version"], capture_output=True, text=True, timeout=10)
    versions = {}
    for dist in ("nats-py", "faststream", "msgspec", "structlog"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "services", "callplane", "schemas"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    return {
        "commit": git.stdout.strip() or "unknown",
        "uncommitted_changes_in_measured_code": len(dirty.stdout.splitlines()),
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "nats_server": server.stdout.strip() or server.stderr.strip(),
        **versions,
    }


def fmt(value: float, digits: int = 2) -> str:
    return "n/a" if value != value else f"{value:,.{digits}f}"  # NaN check


def gc_text(g: dict) -> str:
    return f"{g['full_collections']:>3} x, max {g['full_max_ms']:5.1f} ms; any: max {g.get('max_ms', 0.0):5.1f} ms"


def meter_text(consumer: str, m: dict) -> str:
    refused = f", {m['refused_batches']} hold_credits refused as invalid" if m["refused_batches"] else ""
    return (
        f"  stand-in meter, {consumer}: {m['holds']:,} holds in {m['requests']:,} requests "
        f"({m['holds_per_request']:.1f} per request{refused}), meter CPU {fmt(m['cpu_us_per_offer'], 1)} us/offer"
    )


def report(results: dict) -> str:
    m, opts = results["machine"], results["options"]
    lines = [
        "callplane admission benchmark",
        f"machine: {m['cpu_count']} CPUs ({m['cpu_model'] or 'unknown model'}), {m['platform']}",
        f"versions: Python {m['python']}, {m['nats_server']}, nats-py {m.get('nats-py')}, "
        f"faststream {m.get('faststream')}, msgspec {m.get('msgspec')}, structlog {m.get('structlog')}",
        f"code: commit {m['commit']}"
        + (f" + {m['uncommitted_changes_in_measured_code']} uncommitted files in services/ callplane/ schemas/"
           if m["uncommitted_changes_in_measured_code"] else " (services/ callplane/ schemas/ unmodified)")
        + f"; load average before the run: {results['load_before']}",
        f"gatekeeper LOG_LEVEL={opts['log_level']} (JSON lines to a file); stand-in meter: {opts['meter']}; "
        f"run took {results['run_s']:.1f} s",
        "",
        f"Saturation: {opts['offers']:,} offers pre-published to CALLS, then drained by the consumer under test",
        f"  {'consumer':<34}{'decisions/s':>12}{'elapsed':>9}{'acked':>8}{'CPU us/offer':>14}{'server':>8}"
        f"{'redeliv.':>10}   full GCs in this process; longest of any",
    ]
    verifications = []
    for s in results["saturation"]:
        lines.append(
            f"  {s['consumer']:<34}{fmt(s['decisions_per_s'], 0):>12}{s['elapsed_s']:>8.2f}s{s['drained_s']:>7.2f}s"
            f"{fmt(s['cpu_us_per_offer_bench'], 1):>14}{fmt(s['cpu_us_per_offer_server'], 1):>8}{s['redelivered']:>10}   "
            + gc_text(s["gc"])
            + ("" if s["completed"] else "   TIMED OUT")
        )
        verifications.append((f"saturation {s['consumer']}", s, ""))
    for s in results["saturation"]:
        if m := s.get("meter"):
            if m["holds"] or m["refused_batches"]:
                lines.append(meter_text(s["consumer"], m))
    if ratio := results.get("ratio"):
        lines += [
            "",
            f"gatekeeper / baseline ({ratio['baseline']}): {fmt(ratio['percent'], 1)} % "
            f"(target >= {TARGET_RATIO:.0f} %: {'met' if ratio['percent'] >= TARGET_RATIO else 'NOT met'})",
        ]
    lines += [
        "",
        f"Latency: offers published at {fmt(opts['rate'], 0)}/s for {opts['seconds']:g} s "
        f"(after a {WARMUP_S:g} s warm-up), offer publish -> decision received",
        f"  {'consumer':<34}{'p50':>12}{'p90':>12}{'p99':>12}{'max':>12}{'mean':>12}"
        f"{'decisions':>14}{'sent/s':>8}   full GCs in this process; longest of any",
    ]
    for r in results["latency"]:
        lines.append(
            f"  {r['consumer']:<34}"
            + "".join(f"{fmt(r[k]):>9} ms" for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms"))
            + f"{r['decisions_received']:>8}/{r['measured']:<5}{fmt(r['achieved_rate'], 0):>8}   "
            + gc_text(r["gc"])
        )
        wire = f"; decisions seen twice on the wire: {r['duplicates_on_wire']}" if r["duplicates_on_wire"] else ""
        problem = r["error"] or ("" if r["completed"] else "INCOMPLETE (decisions missing or not acked in time)")
        verifications.append((f"latency    {r['consumer']}", r, "; ".join(x for x in (problem, wire) if x)))
    for r in results["latency"]:
        if (m := r.get("meter")) and (m["holds"] or m["refused_batches"]):
            lines.append(meter_text(r["consumer"], m))
    gk = next((r for r in results["latency"] if r["consumer"].startswith("gatekeeper")), None)
    if gk:
        ok = gk["p99_ms"] <= TARGET_P99_MS
        lines += [
            "",
            f"gatekeeper p99 at {fmt(opts['rate'], 0)} offers/s: {fmt(gk['p99_ms'])} ms "
            f"(target <= {TARGET_P99_MS:g} ms at 1,000 offers/s: {'met' if ok else 'NOT met'})",
        ]
    lines += ["", "Verification (decisions stored in CALLS, read back and counted by call_id):"]
    for name, phase, extra in verifications:
        text = Verification(**phase["verification"]).text()
        lines.append(f"  {name:<46} {text}" + (f"; {extra}" if extra else ""))
    lines.append(
        "all offers decided exactly once: " + ("yes" if results["all_exactly_once"] else "NO (see above)")
    )
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------


async def run(args: argparse.Namespace, url: str, server_pid: int) -> dict:
    env = Env(url, server_pid, args.log_level)
    await env.connect()
    results: dict = {"saturation": [], "latency": []}
    if args.meter != "none":
        env.meter = StandInMeter(url, args.meter)
        await env.meter.start()
    try:
        for kind in args.consumers:
            print(f"saturation: {kind} ...", file=sys.stderr)
            s = await saturation(env, kind, args.offers, args.batch if kind != "fetch" else args.fetch_batch,
                                 args.timeout, args.profile == kind)
            results["saturation"].append(asdict(s))
        for kind in args.consumers:
            print(f"latency: {kind} ...", file=sys.stderr)
            r = await latency(env, kind, args.rate, args.seconds,
                              args.batch if kind != "fetch" else args.fetch_batch, args.timeout)
            results["latency"].append(asdict(r))
    finally:
        if env.meter:
            await env.meter.stop()
        await env.nc.close()
    return results


def without_nan(value: object) -> object:
    """JSON has no NaN: a figure that could not be measured is null."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: without_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_nan(v) for v in value]
    return value


def summarize(results: dict) -> None:
    baselines = [s for s in results["saturation"] if s["consumer"].startswith("baseline")]
    gatekeeper = [s for s in results["saturation"] if s["consumer"].startswith("gatekeeper")]
    if baselines and gatekeeper:
        best = max(baselines, key=lambda s: s["decisions_per_s"])
        results["ratio"] = {
            "baseline": best["consumer"],
            "baseline_decisions_per_s": best["decisions_per_s"],
            "gatekeeper_decisions_per_s": gatekeeper[0]["decisions_per_s"],
            "percent": gatekeeper[0]["decisions_per_s"] / best["decisions_per_s"] * 100,
        }
    phases = results["saturation"] + results["latency"]
    results["all_exactly_once"] = all(Verification(**p["verification"]).exactly_once for p in phases) and all(
        p["completed"] for p in phases
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--offers", type=int, default=20_000, help="offers per saturation phase (default 20000)")
    parser.add_argument("--rate", type=float, default=1000.0, help="latency phase: offers per second (default 1000)")
    parser.add_argument("--seconds", type=float, default=5.0, help="latency phase length (default 5)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of the report")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-phase limit in seconds (default 60)")
    parser.add_argument("--batch", type=int, default=1000, help="baseline continuous pull: messages requested ahead")
    parser.add_argument("--fetch-batch", type=int, default=256, help="baseline fetch: batch size (default 256)")
    parser.add_argument(
        "--log-level", default="info", help="the gatekeeper's LOG_LEVEL (default info, the service default)"
    )
    parser.add_argument(
        "--profile", choices=("pull", "fetch", "runtime", "gatekeeper"), help="cProfile that saturation phase (to stderr)"
    )
    parser.add_argument("--profile-out", metavar="FILE", help="with --profile: also dump the raw pstats to FILE")
    parser.add_argument(
        "--consumers",
        type=lambda v: [c for c in v.split(",") if c],
        default=["pull", "fetch", "runtime", "gatekeeper"],
        help="which consumers to measure, comma-separated (default pull,fetch,runtime,gatekeeper)",
    )
    parser.add_argument(
        "--meter",
        choices=("batch", "single", "none"),
        default="batch",
        help="the stand-in meter: grants hold_credit and hold_credits (batch, default), grants hold_credit "
        "only and answers hold_credits `invalid` (single), or no meter: every hold unanswered (none)",
    )
    # internal: the latency driver and stand-in meter processes
    parser.add_argument("--driver", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--meter-process", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="l", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    global PROFILE_OUT
    args = parse_args(argv)
    PROFILE_OUT = args.profile_out or ""
    if args.driver:
        print(json.dumps(asyncio.run(drive(args.driver, args.rate, args.seconds, args.tag))))
        return
    if args.meter_process:
        asyncio.run(serve_meter(args.meter_process, args.meter))
        return

    started = time.monotonic()
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="callplane-bench-") as tmp:
        # The gatekeeper logs as the service does (JSON lines, LOG_LEVEL), into a file, not the report.
        from callplane import logs

        log_file = open(Path(tmp) / "gatekeeper.log", "w")  # noqa: SIM115 - closed below
        real_stdout, sys.stdout = sys.stdout, log_file
        try:
            logs.configure("gatekeeper", args.log_level, json=True)
        finally:
            sys.stdout = real_stdout
        try:
            with local_server(Path(tmp) / "store") as (url, proc):
                results = asyncio.run(run(args, url, proc.pid))
        finally:
            log_file.close()
        results["gatekeeper_log_lines"] = sum(1 for _ in open(Path(tmp) / "gatekeeper.log"))
    results["machine"] = machine_info()
    results["options"] = {
        "offers": args.offers,
        "rate": args.rate,
        "seconds": args.seconds,
        "warmup_s": WARMUP_S,
        "log_level": args.log_level,
        "batch": args.batch,
        "fetch_batch": args.fetch_batch,
        "meter": args.meter,
    }
    results["run_s"] = time.monotonic() - started
    results["load_before"] = load_before
    summarize(results)
    print(json.dumps(without_nan(results), indent=2) if args.json else report(results))
    if not results["all_exactly_once"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
