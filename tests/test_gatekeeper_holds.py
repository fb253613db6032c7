"""Credit holds batched per turn of the event loop, against a stand-in meter on a real
nats-server: offers admitted together cost one hold_credits request, counting stays
exact, and a batch is never an excuse to admit on a guess."""

from __future__ import annotations

import asyncio
import io
import json
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import nats.errors
import pytest
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from callplane import logs
from schemas import (
    CallAccepted,
    CallEnded,
    CallOffered,
    CallRejected,
    NumberAssigned,
    NumberPolicySet,
    NumberRegistered,
    Reply,
    SecurityPolicy,
    decode_command,
    encode_message,
    rpc,
    timestamp,
)
from schemas.commands import AnswerCall, HoldCredit, HoldCredits, HoldView
from services.gatekeeper import app
from services.gatekeeper.app import Gatekeeper
from services.gatekeeper.config import GatekeeperSettings
from services.gatekeeper.core import RING_TIMEOUT_S, evolve

NUMBER = "+48123456789"
ACCOUNT = "acct_holds"


class StandInMeter:
    """Answers rpc.meter.hold_credit and rpc.meter.hold_credits as told, and records them.

    mode: "grant" (every hold), "old" (hold_credits refused as a command it does not
    handle, as a meter before hold_credits), "silent" (never answers), "short" (a
    hold_credits reply with one answer too few). `refuse`: call ids refused for credit.
    """

    def __init__(self, nc: Client, mode: str = "grant", refuse: frozenset[str] = frozenset()) -> None:
        self.nc, self.mode, self.refuse = nc, mode, refuse
        self.singles: list[str] = []  # call ids asked for with hold_credit
        self.batches: list[list[str]] = []  # call ids of each hold_credits request

    async def start(self) -> None:
        await self.nc.subscribe(rpc("meter", "hold_credit"), cb=self.on_single)
        await self.nc.subscribe(rpc("meter", "hold_credits"), cb=self.on_batch)
        await self.nc.flush()

    def answer(self, command: HoldCredit) -> Reply:
        if command.call_id in self.refuse:
            return Reply(ok=False, code="insufficient_credits", message="hold refused: insufficient_credits")
        return Reply(ok=True, hold=HoldView(hold_id=f"hold_{command.call_id}", amount_millicredits=100, max_duration_s=600))

    async def on_single(self, msg: Msg) -> None:
        command = decode_command(msg.data)
        assert isinstance(command, HoldCredit)
        self.singles.append(command.call_id)
        if self.mode != "silent":
            await msg.respond(encode_message(self.answer(command)))

    async def on_batch(self, msg: Msg) -> None:
        command = decode_command(msg.data)
        assert isinstance(command, HoldCredits)
        self.batches.append([r.call_id for r in command.requests])
        if self.mode == "silent":
            return
        if self.mode == "old":
            reply = Reply(ok=False, code="invalid", message="the meter does not handle hold_credits", field="command",
                          rule="known_command")
        else:
            replies = [self.answer(r) for r in command.requests]
            reply = Reply(ok=True, replies=replies[:-1] if self.mode == "short" else replies)
        await msg.respond(encode_message(reply))


@pytest.fixture
async def gatekeeper(js: JetStreamContext) -> AsyncIterator[Gatekeeper]:
    keeper = Gatekeeper(js, GatekeeperSettings(hold_timeout_ms=300))
    yield keeper
    await keeper.holds.stop()
    await keeper.http.aclose()


def with_cap(keeper: Gatekeeper, cap: int | None) -> None:
    now = timestamp(datetime.now(UTC))
    for event in (
        NumberRegistered(event_id="r", occurred_at=now, number=NUMBER, number_id="pn_1", account_id=ACCOUNT,
                         provider="sip_trunk"),
        NumberAssigned(event_id="a", occurred_at=now, number=NUMBER, agent_id="agent_1"),
        NumberPolicySet(event_id="p", occurred_at=now, number=NUMBER, policy=SecurityPolicy(max_concurrent_calls=cap),
                        policy_version=1),
    ):
        evolve(keeper.state, event)


def offers(first: int, count: int) -> list[CallOffered]:
    now = timestamp(datetime.now(UTC))
    return [
        CallOffered(event_id=f"ev_{i}", occurred_at=now, call_id=f"call_{i}", to=NUMBER, from_="+15551234567")
        for i in range(first, first + count)
    ]


async def simultaneously(keeper: Gatekeeper, batch: list[CallOffered]) -> dict[str, CallAccepted | CallRejected]:
    """Every offer's handler started in the same turn of the event loop, as the consumer
    runtime starts the messages of one delivery."""
    handlers = asyncio.gather(*(keeper.on_call_event(offer, None) for offer in batch))  # type: ignore[arg-type]
    outputs = await asyncio.wait_for(handlers, 5)  # a hold never settled would hang its call
    decisions = {}
    for produced in outputs:
        decision = produced[0]
        assert isinstance(decision, CallAccepted | CallRejected)
        decisions[decision.call_id] = decision
    return decisions


def reasons(decisions: dict[str, CallAccepted | CallRejected]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for decision in decisions.values():
        key = "accepted" if isinstance(decision, CallAccepted) else decision.reason
        counts[key] = counts.get(key, 0) + 1
    return counts


@pytest.mark.parametrize(("offered", "cap"), [(20, 7), (5, 10), (12, 12), (40, 1)])
async def test_offers_admitted_together_cost_one_request_and_exactly_min_n_c_are_admitted(
    gatekeeper: Gatekeeper, nc: Client, offered: int, cap: int
) -> None:
    meter = StandInMeter(nc)
    await meter.start()
    with_cap(gatekeeper, cap)
    decisions = await simultaneously(gatekeeper, offers(0, offered))
    admitted = min(offered, cap)
    assert reasons(decisions) == {"accepted": admitted, **({"busy": offered - admitted} if offered > admitted else {})}
    for decision in decisions.values():
        if isinstance(decision, CallAccepted):
            assert (decision.hold_id, decision.max_duration_s) == (f"hold_{decision.call_id}", 600)
    if admitted > 1:
        assert (len(meter.batches), meter.singles) == (1, [])
        assert sorted(meter.batches[0]) == sorted(c for c, d in decisions.items() if isinstance(d, CallAccepted))
    else:
        assert (meter.batches, len(meter.singles)) == ([], 1)  # a lone hold goes as hold_credit


async def test_each_answer_of_a_batch_decides_its_own_call_and_a_refusal_frees_its_slot(
    gatekeeper: Gatekeeper, nc: Client
) -> None:
    meter = StandInMeter(nc, refuse=frozenset({"call_1", "call_3"}))
    await meter.start()
    with_cap(gatekeeper, 4)
    decisions = await simultaneously(gatekeeper, offers(0, 6))
    assert {c: d.reason for c, d in decisions.items() if isinstance(d, CallRejected)} == {
        "call_1": "insufficient_credits",
        "call_3": "insufficient_credits",
        "call_4": "busy",
        "call_5": "busy",
    }
    # The two refused after the hold freed their slots: two more get in, and no more.
    later = await simultaneously(gatekeeper, offers(6, 3))
    assert reasons(later) == {"accepted": 2, "busy": 1}
    assert reasons(decisions | later)["accepted"] == 4


async def test_a_batch_not_answered_in_time_refuses_each_of_its_calls_billing_unavailable(
    gatekeeper: Gatekeeper, nc: Client
) -> None:
    meter = StandInMeter(nc, mode="silent")
    await meter.start()
    with_cap(gatekeeper, 5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    decisions = await simultaneously(gatekeeper, offers(0, 8))
    assert loop.time() - started < 0.3 + 0.25  # one deadline for the batch, not one per call in turn
    assert reasons(decisions) == {"billing_unavailable": 5, "busy": 3}
    assert all(d.sip_status == 503 for d in decisions.values() if d.reason == "billing_unavailable")
    assert len(meter.batches) == 1
    # Never admitted: their slots are free again.
    meter.mode = "grant"
    assert reasons(await simultaneously(gatekeeper, offers(8, 5))) == {"accepted": 5}


async def test_a_batch_reply_without_one_answer_per_hold_admits_none_of_them(gatekeeper: Gatekeeper, nc: Client) -> None:
    meter = StandInMeter(nc, mode="short")
    await meter.start()
    with_cap(gatekeeper, None)
    assert reasons(await simultaneously(gatekeeper, offers(0, 4))) == {"billing_unavailable": 4}


async def test_a_meter_without_hold_credits_gets_the_holds_one_by_one_until_batches_are_tried_again(
    gatekeeper: Gatekeeper, nc: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    meter = StandInMeter(nc, mode="old")
    await meter.start()
    with_cap(gatekeeper, 3)
    decisions = await simultaneously(gatekeeper, offers(0, 5))
    assert reasons(decisions) == {"accepted": 3, "busy": 2}
    assert (len(meter.batches), sorted(meter.singles)) == (1, sorted(meter.batches[0]))
    # Batching pauses: the next burst goes one by one at once, without a refused batch first.
    with_cap(gatekeeper, None)
    assert reasons(await simultaneously(gatekeeper, offers(5, 4))) == {"accepted": 4}
    assert (len(meter.batches), len(meter.singles)) == (1, 7)
    # Once the pause is over, a batch is tried again (the meter may have been upgraded).
    monkeypatch.setattr(app, "HOLD_BATCH_RETRY_S", 0.0)
    gatekeeper.holds._singles_until = 0.0
    meter.mode = "grant"
    assert reasons(await simultaneously(gatekeeper, offers(9, 4))) == {"accepted": 4}
    assert (len(meter.batches), len(meter.singles)) == (2, 7)


async def test_hold_batching_off_asks_one_by_one(js: JetStreamContext, nc: Client) -> None:
    keeper = Gatekeeper(js, GatekeeperSettings(hold_batching=False))
    try:
        meter = StandInMeter(nc)
        await meter.start()
        with_cap(keeper, None)
        assert reasons(await simultaneously(keeper, offers(0, 3))) == {"accepted": 3}
        assert (meter.batches, len(meter.singles)) == ([], 3)
    finally:
        await keeper.holds.stop()
        await keeper.http.aclose()


class BrokenConnection:
    """A NATS client whose requests fail with an error that is not a timeout (closed,
    draining, or the reconnect buffer full): not an answer from the meter."""

    async def request(self, *_args: object, **_kwargs: object) -> None:
        raise nats.errors.ConnectionClosedError


@pytest.mark.parametrize("count", [1, 3])  # a lone hold_credit, and a hold_credits batch
async def test_a_hold_request_that_fails_fails_its_handlers_instead_of_leaving_them_waiting(
    gatekeeper: Gatekeeper, nc: Client, count: int
) -> None:
    with_cap(gatekeeper, 3)
    gatekeeper.holds.nc = BrokenConnection()  # type: ignore[assignment]
    handlers = [
        asyncio.ensure_future(gatekeeper.on_call_event(offer, None))  # type: ignore[arg-type]
        for offer in offers(0, count)
    ]
    done, _ = await asyncio.wait(handlers, timeout=2)
    assert len(done) == count, "a hold never settled: its offer would wait (and hold its slot) forever"
    for handler in handlers:
        with pytest.raises(nats.errors.ConnectionClosedError):  # as before batching: the runtime retries it
            handler.result()
    # Not admitted, so holding nothing: their slots and window places are free until their
    # retries (or, if those never come, at once rather than when a lease runs out).
    line = gatekeeper.state.lines[NUMBER]
    assert line.active == {} and not line.admitted and not gatekeeper.state.pending
    # Never admitted on a guess; their retries, with the meter back, decide them, within the cap.
    gatekeeper.holds.nc = nc
    meter = StandInMeter(nc)
    await meter.start()
    assert reasons(await simultaneously(gatekeeper, offers(0, count) + offers(10, 3))) == {
        "accepted": 3,
        "busy": count,
    }



class ChangingMeter(StandInMeter):
    """Refuses the first hold of call `changing` and grants a later one (credit freed
    meanwhile), each answered after `delay_s`: what a repeat of an offer whose hold is
    pending would meet."""

    def __init__(self, nc: Client, changing: str, delay_s: float) -> None:
        super().__init__(nc)
        self.changing, self.delay_s = changing, delay_s

    def answer(self, command: HoldCredit) -> Reply:
        if command.call_id == self.changing and self.singles.count(command.call_id) == 1:
            return Reply(ok=False, code="insufficient_credits", message="hold refused: insufficient_credits")
        return super().answer(command)

    async def on_single(self, msg: Msg) -> None:
        command = decode_command(msg.data)
        assert isinstance(command, HoldCredit)
        self.singles.append(command.call_id)
        reply = self.answer(command)
        await asyncio.sleep(self.delay_s)
        await msg.respond(encode_message(reply))


async def test_an_offer_repeated_while_its_hold_is_pending_gets_the_same_final_decision(
    gatekeeper: Gatekeeper, nc: Client
) -> None:
    meter = ChangingMeter(nc, "call_0", delay_s=0.1)
    await meter.start()
    with_cap(gatekeeper, 1)
    offer = offers(0, 1)[0]
    first = asyncio.ensure_future(gatekeeper.on_call_event(offer, None))  # type: ignore[arg-type]
    await asyncio.sleep(0.03)  # its hold is asked for and not answered yet
    # The same offer again: JetStream redelivers it, or the edge sent it twice.
    again = asyncio.ensure_future(gatekeeper.on_call_event(offer, None))  # type: ignore[arg-type]
    first_out, again_out = await asyncio.wait_for(asyncio.gather(first, again), 2)
    assert isinstance(first_out[0], CallRejected) and first_out[0].reason == "insufficient_credits"
    assert again_out == first_out  # published with the same event id: a different answer would be dropped
    assert meter.singles == ["call_0"]  # one hold asked for one call
    assert gatekeeper.state.decision("call_0") == first_out[0]
    # The refusal freed the slot in the state as in the stream: the next call gets it.
    assert reasons(await simultaneously(gatekeeper, offers(1, 2))) == {"accepted": 1, "busy": 1}


async def test_a_call_whose_hold_is_pending_is_not_ringing_yet(
    gatekeeper: Gatekeeper, nc: Client, js: JetStreamContext
) -> None:
    """Lifecycle order: nothing may answer (or miss) a call before it is accepted."""
    meter = ChangingMeter(nc, "call_0", delay_s=0.2)  # call_0's hold: refused, after 0.2 s
    await meter.start()
    with_cap(gatekeeper, 1)
    handler = asyncio.ensure_future(gatekeeper.on_call_event(offers(0, 1)[0], None))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    reply = await gatekeeper.answer(AnswerCall(call_id="call_0", number=NUMBER))
    assert (reply.ok, reply.code) == (False, "not_found")
    clock = gatekeeper.clock
    gatekeeper.clock = lambda: clock() + timedelta(seconds=RING_TIMEOUT_S + 1)
    assert await gatekeeper.publish_due() == []  # nor missed, however late: its ring has not begun
    gatekeeper.clock = clock
    assert (await js.stream_info("CALLS")).state.messages == 0  # no call.answered before call.accepted
    produced = await asyncio.wait_for(handler, 2)
    assert [type(event) for event in produced] == [CallRejected]


def ended(call_id: str) -> CallEnded:
    return CallEnded(event_id=f"end_{call_id}", occurred_at=timestamp(datetime.now(UTC)), call_id=call_id, number=NUMBER,
                     duration_ms=1000, end_reason="caller_hangup")


async def test_a_delivered_batch_is_decided_in_order_with_one_hold_request_and_frees_slots_where_they_end(
    gatekeeper: Gatekeeper, nc: Client
) -> None:
    """`on_call_events`, as `consume_batches` calls it: offers take their slots in delivery
    order before anything is awaited (an end in the batch frees a slot for the offers
    after it, not before), the held ones cost one request, and an offer repeated in the
    batch gets the first one's decision without a second hold."""
    meter = StandInMeter(nc)
    await meter.start()
    with_cap(gatekeeper, 2)
    o = offers(0, 4)
    items = [(o[0], None), (o[1], None), (o[2], None), (ended("call_0"), None), (o[3], None), (o[0], None)]
    results = await asyncio.wait_for(gatekeeper.on_call_events(items), 5)  # type: ignore[arg-type]
    decided = [r[0] for r in results if r]
    assert [(d.call_id, type(d).__name__, getattr(d, "reason", "")) for d in decided] == [
        ("call_0", "CallAccepted", ""),
        ("call_1", "CallAccepted", ""),
        ("call_2", "CallRejected", "busy"),  # before call_0 ended
        ("call_3", "CallAccepted", ""),  # after it
        ("call_0", "CallAccepted", ""),  # the repeat: the same decision
    ]
    assert results[3] == [] and results[5][0] == results[0][0]  # the repeat: the same decision, and
    assert [e.event_id for e in results[5]] == [e.event_id for e in results[0]]  # the same ids (deduplicated)
    assert meter.batches == [["call_0", "call_1", "call_3"]] and meter.singles == []


async def test_a_hold_that_fails_fails_its_own_message_in_a_batch_and_gives_its_slot_back(
    gatekeeper: Gatekeeper, nc: Client
) -> None:
    with_cap(gatekeeper, 5)
    gatekeeper.holds.nc = BrokenConnection()  # type: ignore[assignment]
    results = await asyncio.wait_for(gatekeeper.on_call_events([(offer, None) for offer in offers(0, 3)]), 5)  # type: ignore[arg-type]
    assert all(isinstance(r, nats.errors.ConnectionClosedError) for r in results)
    line = gatekeeper.state.lines[NUMBER]
    assert line.active == {} and not line.admitted and not gatekeeper.state.pending and not gatekeeper._completing


async def test_each_decision_is_logged_as_one_json_line_naming_its_call(
    js: JetStreamContext, nc: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    saved = structlog.get_config()
    logs.configure("gatekeeper", "info", json=True)  # as the service does, before it wires
    keeper = Gatekeeper(js, GatekeeperSettings(hold_timeout_ms=300))
    try:
        await StandInMeter(nc, refuse=frozenset({"call_1"})).start()
        with_cap(keeper, 5)
        await asyncio.wait_for(keeper.on_call_events([(offer, None) for offer in offers(0, 2)]), 5)  # type: ignore[arg-type]
        await asyncio.sleep(0.01)  # the turn's lines are written when it ends
    finally:
        await keeper.holds.stop()
        await keeper.http.aclose()
        structlog.configure(**saved)
    lines = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
    decided = {(line["event"], line["call_id"], line["event_id"], line.get("reason")) for line in lines if line["event"].startswith("call_")}
    assert decided == {("call_accepted", "call_0", "ev_0", None), ("call_rejected", "call_1", "ev_1", "insufficient_credits")}
    assert all(line["service"] == "gatekeeper" and line["level"] == "info" for line in lines)


async def test_a_webhook_call_cancelled_fails_its_own_message_and_gives_its_slot_back(
    gatekeeper: Gatekeeper, nc: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    await StandInMeter(nc).start()
    with_cap(gatekeeper, 5)
    first, second = offers(0, 2)

    async def webhook(offer: CallOffered, _provisional: CallAccepted, _hook: object) -> None:
        if offer.call_id == first.call_id:
            raise asyncio.CancelledError  # what gather reports for a webhook task cancelled under it

    monkeypatch.setattr(gatekeeper, "_webhook_of", lambda *_: object())  # every account has a webhook
    monkeypatch.setattr(gatekeeper, "ask_webhook", webhook)
    results = await asyncio.wait_for(gatekeeper.on_call_events([(first, None), (second, None)]), 5)  # type: ignore[arg-type]
    assert isinstance(results[0], RuntimeError)
    assert isinstance(results[1], list) and isinstance(results[1][0], CallAccepted)
    line = gatekeeper.state.lines[NUMBER]
    assert set(line.active) == {second.call_id} and not gatekeeper._completing
