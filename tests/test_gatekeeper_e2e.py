"""Exact admission end to end, every service its own process on a real nats-server:
50 simultaneous offers against a cap of 5, a freed slot, and a gatekeeper killed and
restarted in the middle."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from callplane.broker import publish_all
from callplane.client import send
from callplane.embedded import Stack
from schemas import CallAccepted, CallEnded, CallOffered, CallRejected, SecurityPolicy, decode, timestamp
from schemas.commands import AssignAgent, ConfigureAccount, CreditAccount, RegisterNumber, SetPolicy

NUMBER = "+48123456789"
ACCOUNT = "acct_cap"


@pytest.fixture
def stack(nats_url: str, js: JetStreamContext, tmp_path: Path) -> Iterator[Stack]:
    with Stack(home=tmp_path / "stack", nats_url=nats_url, services=("provisioner", "meter", "gatekeeper")) as running:
        yield running


class Decisions:
    def __init__(self) -> None:
        self.by_call: dict[str, CallAccepted | CallRejected] = {}
        self.credited = asyncio.Event()

    async def collect(self, msg: Msg) -> None:
        event = decode(msg.data)
        if isinstance(event, CallAccepted | CallRejected):
            earlier = self.by_call.setdefault(event.call_id, event)
            assert type(earlier) is type(event), f"two different decisions for {event.call_id}"
        else:
            self.credited.set()

    def accepted(self) -> list[str]:
        return sorted(c for c, d in self.by_call.items() if isinstance(d, CallAccepted))

    async def wait_for(self, count: int, timeout: float = 20.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self.by_call) < count:
            assert asyncio.get_running_loop().time() < deadline, f"{len(self.by_call)} of {count} decisions"
            await asyncio.sleep(0.05)


def offers(first: int, count: int) -> list[CallOffered]:
    now = timestamp(datetime.now(UTC))
    return [
        CallOffered(event_id=f"ev_offer_{i}", occurred_at=now, call_id=f"call_{i}", to=NUMBER, from_="+15551234567")
        for i in range(first, first + count)
    ]


async def test_exactly_the_cap_is_admitted_a_freed_slot_admits_one_and_a_restart_keeps_the_counts(
    stack: Stack, nc: Client, js: JetStreamContext
) -> None:
    decisions = Decisions()
    for subject in ("call.accepted.*", "call.rejected.*", "ledger.credited.*"):
        await nc.subscribe(subject, cb=decisions.collect)
    for command in (
        ConfigureAccount(account_id=ACCOUNT),
        CreditAccount(account_id=ACCOUNT, amount_millicredits=10_000_000, reference="topup"),
        RegisterNumber(number=NUMBER, account_id=ACCOUNT),
        AssignAgent(number=NUMBER, agent_id="agent_1"),
        SetPolicy(number=NUMBER, policy=SecurityPolicy(max_concurrent_calls=5)),
    ):
        assert (await send(nc, "provisioner", command)).ok
    await asyncio.wait_for(decisions.credited.wait(), 10)

    await publish_all(js, offers(0, 50))  # 50 simultaneous offers
    await decisions.wait_for(50)
    admitted = decisions.accepted()
    assert len(admitted) == 5
    assert {d.reason for d in decisions.by_call.values() if isinstance(d, CallRejected)} == {"busy"}

    now = timestamp(datetime.now(UTC))
    await publish_all(js, [CallEnded(event_id="ev_end_0", occurred_at=now, call_id=admitted[0], number=NUMBER, duration_ms=61_000)])
    await asyncio.sleep(0.5)  # the end reaches the gatekeeper before the next offers
    await publish_all(js, offers(50, 3))
    await decisions.wait_for(53)
    assert len(decisions.accepted()) == 6  # exactly one more got the freed slot

    stack.kill("gatekeeper")  # a crash, mid-run: offers keep coming
    await publish_all(js, offers(53, 10))
    await asyncio.sleep(0.5)
    assert len(decisions.by_call) == 53  # nobody decided while it was down
    stack.restart("gatekeeper")  # rebuilds slots from the streams, then takes the backlog
    await decisions.wait_for(63)
    assert len(decisions.accepted()) == 6  # still 5 in progress: every late offer was busy

    await publish_all(js, [CallEnded(event_id="ev_end_1", occurred_at=now, call_id=admitted[1], number=NUMBER, duration_ms=61_000)])
    await asyncio.sleep(0.5)
    await publish_all(js, offers(63, 3))
    await decisions.wait_for(66)
    assert len(decisions.accepted()) == 7


async def test_calls_explain_prints_every_check_of_a_decision(nats_url: str, js: JetStreamContext) -> None:
    from schemas import Check, Decision

    rejected = CallRejected(
        event_id="ev_decision",
        occurred_at=timestamp(datetime.now(UTC)),
        call_id="call_x",
        number=NUMBER,
        reason="caller_blocked",
        sip_status=403,
        decision=Decision(
            policy_version=3,
            checks=(
                Check(name="registered", passed=True, inputs={"number": NUMBER}),
                Check(name="blocked_prefixes", passed=False, inputs={"caller": "+19005550100"}),
            ),
        ),
    )
    await publish_all(js, [rejected])
    for extra in ([], ["--number", NUMBER]):
        run = await asyncio.to_thread(
            __import__("subprocess").run,
            [__import__("sys").executable, "-m", "callplane.cli", "calls", "explain", "call_x", "--url", nats_url, *extra],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
        assert "REJECTED: caller_blocked (SIP 403)" in run.stdout
        assert "policy version 3" in run.stdout
        assert "FAIL  blocked_prefixes  (caller=+19005550100)" in run.stdout


WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.fixture(scope="module")
def hooks():  # noqa: ANN201
    """A real local HTTP server playing the customer's pre-call webhook."""
    from tests.test_gatekeeper_webhook import serving

    with serving() as server:
        yield server


@pytest.mark.parametrize(
    ("scenario", "fail_closed", "expected"),
    [
        ("ok", False, "accepted"),  # variables and overrides from the webhook
        ("decline", False, "webhook_rejected"),
        ("error", False, "accepted"),  # fail open: proceed with defaults
        ("error", True, "webhook_rejected"),  # fail closed
    ],
)
async def test_the_pre_call_webhook_is_signed_and_its_answer_decides(
    hooks, stack: Stack, js: JetStreamContext, nc: Client, scenario: str, fail_closed: bool, expected: str  # noqa: ANN001
) -> None:
    from standardwebhooks import Webhook

    from schemas.commands import PreCallWebhookConfig

    hooks.received.clear()
    decisions = Decisions()
    for subject in ("call.accepted.*", "call.rejected.*", "ledger.credited.*"):
        await nc.subscribe(subject, cb=decisions.collect)
    hook = PreCallWebhookConfig(
        url=hooks.url(scenario), secret=WEBHOOK_SECRET, fail_closed=fail_closed, allow_private=True
    )
    for command in (
        ConfigureAccount(account_id=ACCOUNT, pre_call_webhook=hook),
        CreditAccount(account_id=ACCOUNT, amount_millicredits=1_000_000, reference="topup"),
        RegisterNumber(number=NUMBER, account_id=ACCOUNT),
        AssignAgent(number=NUMBER, agent_id="agent_1"),
    ):
        reply = await send(nc, "provisioner", command)
        assert reply.ok, reply
    await asyncio.wait_for(decisions.credited.wait(), 10)
    await publish_all(js, offers(0, 1))
    await decisions.wait_for(1)

    decision = decisions.by_call["call_0"]
    assert (decision.reason if isinstance(decision, CallRejected) else "accepted") == expected
    assert decision.decision.checks[-1].name == "pre_call_webhook"
    [request] = hooks.received
    Webhook(WEBHOOK_SECRET).verify(request.body, request.headers)  # raises if the signature is wrong
    assert msgspec.json.decode(request.body) == {
        "caller_id": "+15551234567",
        "agent_id": "agent_1",
        "called_number": NUMBER,
        "call_id": "call_0",
    }
    if scenario == "ok":
        assert decision.dynamic_variables["customer_name"] == "Ada"
        assert decision.dynamic_variables["system__call_sid"] == "call_0"
        assert decision.conversation_config_override["agent"]["first_message"] == "Hi Ada!"
