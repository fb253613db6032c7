"""Demo traffic for `callplane up --demo`.

Provisions a demo account and numbers through the provisioner, then plays the SIP
edge: offers realistic calls (normal callers, callers from a blocked prefix, calls
to an unregistered number, a burst over a concurrency cap, a fraud spike), answers
and ends the admitted ones, and prints a live summary of what the services decided.
Call durations are simulated (the edge reports them), so minutes of talk take
seconds of wall time.
"""

from __future__ import annotations

import asyncio
import random
import sys
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TextIO

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from schemas import (
    CallAccepted,
    CallAgentReplied,
    CallAnswered,
    CallEnded,
    CallOffered,
    CallRejected,
    Event,
    FraudAlert,
    FraudAlertPolicy,
    LedgerCharged,
    SecurityPolicy,
    decode,
    of_type,
    timestamp,
)
from schemas.commands import AssignAgent, ConfigureAccount, CreditAccount, RegisterNumber, SetPolicy

from .broker import publish
from .client import send

ACCOUNT = "acct_demo"
SUPPORT = "+48221234567"  # concurrency cap 5, premium-rate callers blocked
SALES = "+48221234568"  # fraud alert: more than 10 calls within 1 minute
UNREGISTERED = "+48229999999"
BLOCKED_PREFIX = "+1900"


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


def _now() -> str:
    return timestamp(datetime.now(UTC))


@dataclass
class Summary:
    offered: int = 0
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    ended: int = 0
    charged_millicredits: int = 0
    alerts: int = 0

    def line(self) -> str:
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(self.rejected.items())) or "none"
        return (
            f"offered {self.offered} | accepted {self.accepted} | rejected {sum(self.rejected.values())} "
            f"({reasons}) | ended {self.ended} | charged {self.charged_millicredits / 1000:.3f} credits "
            f"| fraud alerts {self.alerts}"
        )


async def provision(nc: Client) -> None:
    """Idempotent: a second run finds the numbers registered and the top-up applied."""
    commands = [
        ConfigureAccount(account_id=ACCOUNT, rate_millicredits_per_minute=30_000, text_price_millicredits=400),
        CreditAccount(account_id=ACCOUNT, amount_millicredits=100_000_000, reference="demo-welcome-credit"),
        RegisterNumber(number=SUPPORT, account_id=ACCOUNT, label="Support line"),
        RegisterNumber(number=SALES, account_id=ACCOUNT, label="Sales line"),
        AssignAgent(number=SUPPORT, agent_id="agent_support"),
        AssignAgent(number=SALES, agent_id="agent_sales"),
        SetPolicy(number=SUPPORT, policy=SecurityPolicy(max_concurrent_calls=5, blocked_prefixes=(BLOCKED_PREFIX,))),
        SetPolicy(number=SALES, policy=SecurityPolicy(fraud_alert=FraudAlertPolicy(calls=10, window_minutes=1))),
    ]
    for command in commands:
        reply = await send(nc, "provisioner", command)
        if not reply.ok and reply.code != "conflict":
            raise RuntimeError(f"demo provisioning failed at {type(command).__name__}: {reply.message}")


class Edge:
    """Plays the SIP edge: offers calls, answers and hangs up the admitted ones."""

    def __init__(self, nc: Client, summary: Summary, rng: random.Random) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.summary = summary
        self.rng = rng
        self.mine: set[str] = set()
        self.calls: set[asyncio.Task] = set()

    async def offer(self, to: str, caller: str | None = None) -> None:
        caller = caller or f"+44{self.rng.randrange(7_000_000_000, 7_999_999_999)}"
        offer = CallOffered(
            event_id=_id("ev"),
            occurred_at=_now(),
            call_id=_id("call"),
            to=to,
            from_=caller,
            source_ip=f"203.0.113.{self.rng.randrange(1, 255)}",
            transport="tcp",
            user_agent="demo-edge/1.0",
        )
        self.mine.add(offer.call_id)
        self.summary.offered += 1
        await publish(self.js, offer)

    async def on_decision(self, msg: Msg) -> None:
        event = decode(msg.data)
        if event.call_id not in self.mine:
            return
        if isinstance(event, CallAccepted):
            self.summary.accepted += 1
            task = asyncio.create_task(self.talk(event))
            self.calls.add(task)
            task.add_done_callback(self.calls.discard)
        elif isinstance(event, CallRejected):
            self.summary.rejected[event.reason] += 1

    async def talk(self, accepted: CallAccepted) -> None:
        call = {"call_id": accepted.call_id, "number": accepted.number}
        if not accepted.auto_answer:  # the gatekeeper answers auto-answer calls itself
            await asyncio.sleep(0.2)
            await self._emit(CallAnswered(event_id=_id("ev"), occurred_at=_now(), **call))
        await asyncio.sleep(self.rng.uniform(0.5, 2.5))
        responses = self.rng.randrange(1, 12)
        await self._emit(CallAgentReplied(event_id=_id("ev"), occurred_at=_now(), model="demo-llm", responses=responses, **call))
        duration_ms = self.rng.randrange(20_000, 400_000)
        await self._emit(
            CallEnded(
                event_id=_id("ev"),
                occurred_at=_now(),
                duration_ms=duration_ms,
                silent_ms=self.rng.randrange(0, duration_ms // 4),
                end_reason=self.rng.choice(["caller_hangup", "agent_hangup"]),
                **call,
            )
        )
        self.summary.ended += 1

    async def _emit(self, event: Event) -> None:
        await publish(self.js, event)


async def traffic(edge: Edge, stop: asyncio.Event) -> None:
    """One tick a second: normal calls, and now and then something that must be refused."""
    tick = 0
    while not stop.is_set():
        for _ in range(2):
            await edge.offer(SUPPORT)
        await edge.offer(SALES)
        if tick % 4 == 1:
            await edge.offer(SUPPORT, caller=f"{BLOCKED_PREFIX}{edge.rng.randrange(1_000_000, 9_999_999)}")
        if tick % 6 == 2:
            await edge.offer(UNREGISTERED)
        if tick % 10 == 3:  # a burst over the concurrency cap of 5
            await asyncio.gather(*(edge.offer(SUPPORT) for _ in range(8)))
        if tick % 20 == 6:  # a fraud spike: far more than 10 calls within a minute
            await asyncio.gather(*(edge.offer(SALES) for _ in range(15)))
        tick += 1
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except TimeoutError:
            pass


async def run_demo(url: str, *, duration: float | None = None, out: TextIO = sys.stdout, seed: int | None = None) -> Summary:
    """Drive demo traffic until `duration` seconds pass (or forever), then print a summary."""
    summary = Summary()
    nc = await nats.connect(url)
    try:
        await provision(nc)
        await asyncio.sleep(1.0)  # let the meter see the top-up before the first hold
        edge = Edge(nc, summary, random.Random(seed))

        async def on_charged(msg: Msg) -> None:
            event = decode(msg.data)
            if isinstance(event, LedgerCharged) and event.call_id in edge.mine:
                summary.charged_millicredits += event.amount_millicredits

        async def on_alert(msg: Msg) -> None:
            if isinstance(decode(msg.data), FraudAlert):
                summary.alerts += 1

        await nc.subscribe(of_type(CallAccepted), cb=edge.on_decision)
        await nc.subscribe(of_type(CallRejected), cb=edge.on_decision)
        await nc.subscribe(of_type(LedgerCharged), cb=on_charged)
        await nc.subscribe(of_type(FraudAlert), cb=on_alert)

        stop = asyncio.Event()
        driver = asyncio.create_task(traffic(edge, stop))
        started = asyncio.get_running_loop().time()
        try:
            while duration is None or asyncio.get_running_loop().time() - started < duration:
                await asyncio.sleep(1.0)
                print(summary.line(), file=out, flush=True)
        finally:
            stop.set()
            await driver
            if edge.calls:  # let calls in progress hang up, so they are billed
                await asyncio.wait(edge.calls, timeout=5)
            await asyncio.sleep(1.0)  # the last charges and alerts in flight
        print("demo summary: " + summary.line(), file=out, flush=True)
        return summary
    finally:
        await nc.drain()
