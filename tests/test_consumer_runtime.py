"""The consumer runtime against a real nats-server: dead-lettering, the ack policy,
Nats-Msg-Id on every publish, and the fetch-timeout guard."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import nats.errors
import pytest
from nats.js import JetStreamContext

from callplane import topology
from callplane.broker import DLQ_REASON, DLQ_SEQUENCE, DLQ_SUBJECT, consume, make_broker, publish
from callplane.config import NatsSettings
from schemas import AnyEvent, CallOffered, timestamp

NUMBER = "+48123456789"
SUBJECT = "call.offered.48123456789"


def offer(event_id: str, call_id: str = "call_1") -> CallOffered:
    return CallOffered(
        event_id=event_id, occurred_at=timestamp(datetime.now(UTC)), call_id=call_id, to=NUMBER, from_="+15551234567"
    )


class Recorder:
    def __init__(self, fail_on: set[str] = frozenset()) -> None:
        self.seen: list[AnyEvent] = []
        self.attempts: dict[str, int] = {}
        self.fail_on = fail_on
        self.arrived = asyncio.Event()

    async def __call__(self, event: AnyEvent, _meta: object) -> None:
        self.attempts[event.event_id] = self.attempts.get(event.event_id, 0) + 1
        if event.event_id in self.fail_on:
            raise RuntimeError("handler bug")
        self.seen.append(event)
        self.arrived.set()
        return []


async def running(nats_url: str, handler: Recorder):
    broker = make_broker(NatsSettings(nats_url=nats_url), service="fraud")
    consume(broker, topology.consumer("fraud"), handler, batch=8)
    await broker.start()
    return broker


async def dlq_messages(js: JetStreamContext, expected: int, timeout: float = 10.0) -> list:
    sub = await js.pull_subscribe("dlq.>", stream="DLQ")
    found: list = []
    deadline = asyncio.get_running_loop().time() + timeout
    while len(found) < expected and asyncio.get_running_loop().time() < deadline:
        try:
            found += await sub.fetch(expected - len(found), timeout=0.5)
        except nats.errors.TimeoutError:
            pass
    await sub.unsubscribe()
    return found


async def wait_until(condition, timeout: float = 10.0) -> None:  # noqa: ANN001
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_a_garbage_body_goes_to_the_dlq_with_a_reason_and_the_next_message_is_processed(
    nats_url: str, js: JetStreamContext
) -> None:
    recorder = Recorder()
    broker = await running(nats_url, recorder)
    try:
        garbage = await js.publish(SUBJECT, b"\x00not json{")
        await publish(js, offer("ev_valid"))
        await wait_until(lambda: [e.event_id for e in recorder.seen] == ["ev_valid"])

        [dead] = await dlq_messages(js, 1)
        assert dead.subject == f"dlq.{SUBJECT}"
        assert dead.data == b"\x00not json{"
        assert dead.headers[DLQ_SUBJECT] == SUBJECT
        assert dead.headers[DLQ_SEQUENCE] == str(garbage.seq)
        assert dead.headers[DLQ_REASON].startswith("undecodable:")
        info = await js.consumer_info("CALLS", "fraud")
        assert info.num_ack_pending == 0 and info.num_redelivered == 0  # acked once, never looped
    finally:
        await broker.stop()


async def test_an_event_on_the_wrong_subject_breaks_the_contract_and_is_dead_lettered(
    nats_url: str, js: JetStreamContext
) -> None:
    recorder = Recorder()
    broker = await running(nats_url, recorder)
    try:
        from schemas import encode

        await js.publish("call.offered.49999", encode(offer("ev_misrouted")))
        [dead] = await dlq_messages(js, 1)
        assert dead.subject == "dlq.call.offered.49999"
        assert "belongs on call.offered.48123456789" in dead.headers[DLQ_REASON]
        assert recorder.seen == []
    finally:
        await broker.stop()


async def test_a_failing_handler_is_retried_with_backoff_then_dead_lettered_without_blocking_others(
    nats_url: str, js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(topology, "BACKOFF_S", (0.1, 0.1, 0.1, 0.1))  # shortened for the test
    await topology.setup(js)  # the consumer's server-side backoff too
    recorder = Recorder(fail_on={"ev_poison"})
    broker = await running(nats_url, recorder)
    try:
        await publish(js, offer("ev_poison", "call_poison"))
        await publish(js, offer("ev_fine", "call_fine"))
        await wait_until(lambda: "ev_fine" in [e.event_id for e in recorder.seen])
        [dead] = await dlq_messages(js, 1)
        assert recorder.attempts["ev_poison"] == topology.MAX_DELIVER
        assert dead.headers[DLQ_REASON].startswith(f"handler_failed after {topology.MAX_DELIVER} deliveries")
    finally:
        await broker.stop()


async def test_every_publish_carries_the_event_id_so_jetstream_drops_a_republished_duplicate(
    js: JetStreamContext,
) -> None:
    first = await publish(js, offer("ev_once"))
    again = await publish(js, offer("ev_once"))
    assert again.duplicate and again.seq == first.seq
    assert (await js.stream_info("CALLS")).state.messages == 1


async def test_a_builtin_timeout_from_nats_py_fetch_does_not_crash_the_consume_task(
    nats_url: str, js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nats-py can raise the builtin TimeoutError from fetch; FastStream 0.7.8 only
    suppresses nats.errors.TimeoutError, so without our guard its task dies."""
    raised = 0
    original = JetStreamContext.PullSubscription._fetch_n

    async def flaky(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        nonlocal raised
        if raised < 3:
            raised += 1
            raise TimeoutError  # the builtin one, as asyncio.wait_for raises it
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(JetStreamContext.PullSubscription, "_fetch_n", flaky)
    recorder = Recorder()
    broker = await running(nats_url, recorder)
    try:
        [subscriber] = broker.subscribers
        task = subscriber.tasks[0]
        await wait_until(lambda: raised == 3)
        await publish(js, offer("ev_after_timeouts"))
        await wait_until(lambda: bool(recorder.seen), timeout=5)
        assert subscriber.tasks[0] is task and not task.done()  # the same task, never crashed
    finally:
        await broker.stop()
