"""The consumer runtime against a real nats-server: dead-lettering, the ack policy,
outputs published before the input is acked, start order under concurrency, draining
on stop, surviving pull-loop errors and reconnects, and Nats-Msg-Id on every publish."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from callplane import broker as runtime
from callplane import natswire, topology
from callplane.broker import (
    DLQ_REASON,
    DLQ_SEQUENCE,
    DLQ_SUBJECT,
    Consumer,
    consume,
    consumers,
    make_broker,
    publish,
    start_consumers,
    stop_consumers,
)
from callplane.config import NatsSettings
from schemas import AnyEvent, CallAccepted, CallAnswered, CallOffered, Event, FraudAlert, decode, encode, timestamp

NUMBER = "+48123456789"
SUBJECT = "call.offered.48123456789"


def now() -> str:
    return timestamp(datetime.now(UTC))


def offer(event_id: str, call_id: str = "call_1") -> CallOffered:
    return CallOffered(event_id=event_id, occurred_at=now(), call_id=call_id, to=NUMBER, from_="+15551234567")


def accepted(source: CallOffered) -> CallAccepted:
    return CallAccepted(
        event_id=f"{source.event_id}/decision",
        occurred_at=now(),
        call_id=source.call_id,
        number=NUMBER,
        account_id="acct_1",
        agent_id="agent_1",
    )


def answered(source: CallOffered) -> CallAnswered:
    return CallAnswered(event_id=f"{source.event_id}/answered", occurred_at=now(), call_id=source.call_id, number=NUMBER)


def alert(source: CallOffered) -> FraudAlert:
    return FraudAlert(
        event_id=f"{source.event_id}/alert",
        occurred_at=now(),
        number=NUMBER,
        rule="test",
        count=1,
        threshold=1,
        window_s=60,
        first_at=source.occurred_at,
        last_at=source.occurred_at,
    )


class Recorder:
    def __init__(self, fail_on: set[str] = frozenset(), produce=None) -> None:  # noqa: ANN001
        self.seen: list[AnyEvent] = []
        self.attempts: dict[str, int] = {}
        self.fail_on = fail_on
        self.produce = produce or (lambda _event: [])

    async def __call__(self, event: AnyEvent, _meta: Msg.Metadata) -> list[Event]:
        self.attempts[event.event_id] = self.attempts.get(event.event_id, 0) + 1
        if event.event_id in self.fail_on:
            raise RuntimeError("handler bug")
        self.seen.append(event)
        return self.produce(event)


@contextlib.asynccontextmanager
async def running(
    nats_url: str, handler, *, batch: int = 8, spec: topology.ConsumerSpec | None = None, register=consume  # noqa: ANN001
) -> AsyncIterator:
    """A broker with one consumer (by default on the `fraud` durable: CALLS, call.offered.*),
    started and stopped as callplane.service does."""
    broker = make_broker(NatsSettings(nats_url=nats_url), service="fraud")
    register(broker, spec or topology.consumer("fraud"), handler, batch=batch)
    await broker.start()
    await start_consumers(broker)
    try:
        yield broker
    finally:
        await stop_consumers(broker)
        await broker.stop()


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


async def stored(js: JetStreamContext, stream: str, subjects: list[str]) -> list[Msg]:
    """Every message of `stream` on `subjects`, in stream order."""
    config = ConsumerConfig(filter_subjects=subjects, ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL)
    sub = await js.pull_subscribe(subjects[0], stream=stream, config=config)
    found: list[Msg] = []
    with contextlib.suppress(nats.errors.TimeoutError):
        while True:
            batch = await sub.fetch(100, timeout=0.5)
            found += batch
            if batch[-1].metadata.num_pending == 0:
                break
    await sub.unsubscribe()
    return found


async def wait_until(condition, timeout: float = 10.0) -> None:  # noqa: ANN001
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def settled(js: JetStreamContext, durable: str = "fraud", timeout: float = 10.0):  # noqa: ANN201
    """Wait until the durable has nothing pending and nothing unacked; return its info."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        info = await js.consumer_info("CALLS", durable)
        if info.num_pending == 0 and info.num_ack_pending == 0:
            return info
        assert asyncio.get_running_loop().time() < deadline, f"not settled: {info}"
        await asyncio.sleep(0.05)


async def test_a_garbage_body_goes_to_the_dlq_with_a_reason_and_the_next_message_is_processed(
    nats_url: str, js: JetStreamContext
) -> None:
    recorder = Recorder()
    async with running(nats_url, recorder):
        garbage = await js.publish(SUBJECT, b"\x00not json{")
        await publish(js, offer("ev_valid"))
        await wait_until(lambda: [e.event_id for e in recorder.seen] == ["ev_valid"])

        [dead] = await dlq_messages(js, 1)
        assert dead.subject == f"dlq.{SUBJECT}"
        assert dead.data == b"\x00not json{"
        assert dead.headers[DLQ_SUBJECT] == SUBJECT
        assert dead.headers[DLQ_SEQUENCE] == str(garbage.seq)
        assert dead.headers[DLQ_REASON].startswith("undecodable:")
        info = await settled(js)
        assert info.num_redelivered == 0  # acked once, never looped


async def test_an_event_on_the_wrong_subject_breaks_the_contract_and_is_dead_lettered(
    nats_url: str, js: JetStreamContext
) -> None:
    recorder = Recorder()
    async with running(nats_url, recorder):
        await js.publish("call.offered.49999", encode(offer("ev_misrouted")))
        [dead] = await dlq_messages(js, 1)
        assert dead.subject == "dlq.call.offered.49999"
        assert "belongs on call.offered.48123456789" in dead.headers[DLQ_REASON]
        assert recorder.seen == []
        await settled(js)


async def test_a_failing_handler_is_retried_with_backoff_then_dead_lettered_without_blocking_others(
    nats_url: str, js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(topology, "BACKOFF_S", (0.1, 0.1, 0.1, 0.1))  # shortened for the test
    await topology.setup(js)  # the consumer's server-side backoff too
    recorder = Recorder(fail_on={"ev_poison"})
    async with running(nats_url, recorder):
        await publish(js, offer("ev_poison", "call_poison"))
        await publish(js, offer("ev_fine", "call_fine"))
        await wait_until(lambda: "ev_fine" in [e.event_id for e in recorder.seen])
        [dead] = await dlq_messages(js, 1)
        assert recorder.attempts["ev_poison"] == topology.MAX_DELIVER
        assert dead.headers[DLQ_REASON].startswith(f"handler_failed after {topology.MAX_DELIVER} deliveries")
        await settled(js)


async def test_every_publish_carries_the_event_id_so_jetstream_drops_a_republished_duplicate(
    js: JetStreamContext,
) -> None:
    first = await publish(js, offer("ev_once"))
    again = await publish(js, offer("ev_once"))
    assert again.duplicate and again.seq == first.seq
    assert (await js.stream_info("CALLS")).state.messages == 1


async def test_outputs_are_stored_in_order_before_the_input_is_acked(
    nats_url: str, js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A handler returning two events: both stored, in order, each with its event id as
    Nats-Msg-Id, and when the input is acked both are in the stream already."""
    stored_at_ack: list[int] = []
    ack = natswire.ack

    async def spy_ack(msg: Msg) -> None:
        stored_at_ack.append((await js.stream_info("CALLS")).state.messages)
        await ack(msg)

    monkeypatch.setattr(natswire, "ack", spy_ack)
    recorder = Recorder(produce=lambda event: [accepted(event), answered(event)])
    async with running(nats_url, recorder):
        source = offer("ev_two_outputs", "call_two")
        await publish(js, source)
        info = await settled(js)
        assert info.num_redelivered == 0
    assert stored_at_ack == [3]  # one ack, when the input and both outputs were stored
    outputs = await stored(js, "CALLS", ["call.accepted.*", "call.answered.*"])
    assert [m.headers["Nats-Msg-Id"] for m in outputs] == [f"{source.event_id}/decision", f"{source.event_id}/answered"]
    assert [m.subject for m in outputs] == ["call.accepted.48123456789", "call.answered.48123456789"]


async def test_an_input_whose_output_cannot_be_stored_is_not_acked_and_is_handled_again(
    nats_url: str, js: JetStreamContext
) -> None:
    """No stream captures fraud.* (ALERTS deleted): the publish fails, the offer is nak'd
    and redelivered; once the stream is back the alert is stored and the offer acked."""
    await js.delete_stream("ALERTS")
    recorder = Recorder(produce=lambda event: [alert(event)])
    async with running(nats_url, recorder):
        await publish(js, offer("ev_alerting"))
        await wait_until(lambda: recorder.attempts.get("ev_alerting", 0) >= 2)  # nak'd: back after 1 s
        info = await js.consumer_info("CALLS", "fraud")
        assert info.num_ack_pending == 1 and info.ack_floor.stream_seq == 0  # not acked
        await js.add_stream(topology.stream_config("ALERTS"))
        await settled(js, timeout=15)
    assert recorder.attempts["ev_alerting"] in (3, 4)  # 1 s, then 5 s backoff; stored on the third try
    [stored_alert] = await stored(js, "ALERTS", ["fraud.>"])
    assert stored_alert.headers["Nats-Msg-Id"] == "ev_alerting/alert"
    assert await dlq_messages(js, 1, timeout=0.5) == []


async def test_an_output_never_stored_dead_letters_the_input_after_the_last_delivery(
    nats_url: str, js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(topology, "BACKOFF_S", (0.1, 0.1, 0.1, 0.1))
    await topology.setup(js)
    await js.delete_stream("ALERTS")
    recorder = Recorder(produce=lambda event: [alert(event)])
    async with running(nats_url, recorder):
        await publish(js, offer("ev_alert_lost"))
        [dead] = await dlq_messages(js, 1)
        assert dead.headers[DLQ_REASON].startswith(f"publish_failed after {topology.MAX_DELIVER} deliveries")
        assert recorder.attempts["ev_alert_lost"] == topology.MAX_DELIVER
        await settled(js)


async def without_fast_batches(js: JetStreamContext, stream: str) -> None:
    """The stream as set up before `allow_batched`: answered one PubAck per message."""
    config = (await js.stream_info(stream)).config
    config.allow_batched = False
    await js.update_stream(config)


@pytest.mark.parametrize("batched", [True, False], ids=["fast batch", "one PubAck each"])
async def test_a_lost_puback_times_out_the_input_is_handled_again_and_stored_once(
    nats_url: str, js: JetStreamContext, monkeypatch: pytest.MonkeyPatch, batched: bool
) -> None:
    """The answer that says the output is stored (the batch commit's PubAck, or the output's
    own) never arrives (dropped here): after PUBACK_TIMEOUT_S the offer is nak'd, not acked;
    the second try publishes the same event id, JetStream drops the copy, answers, and the
    offer is acked. The decision is stored once."""
    if not batched:
        await without_fast_batches(js, "CALLS")
    monkeypatch.setattr(runtime, "PUBACK_TIMEOUT_S", 0.3)
    dropped = 0
    on_puback = runtime.Consumer._on_puback

    async def lossy(self, msg: Msg) -> None:  # noqa: ANN001
        nonlocal dropped
        assert msg.subject.endswith(".$FI") == batched
        if dropped == 0 and not msg.data.startswith(b'{"type":"ack"'):  # a flow ack says nothing stored
            dropped += 1
            return
        await on_puback(self, msg)

    monkeypatch.setattr(runtime.Consumer, "_on_puback", lossy)
    recorder = Recorder(produce=lambda event: [accepted(event)])
    async with running(nats_url, recorder):
        await publish(js, offer("ev_puback_lost"))
        await settled(js, timeout=15)
    assert dropped == 1 and recorder.attempts["ev_puback_lost"] == 2
    assert len(await stored(js, "CALLS", ["call.accepted.*"])) == 1


async def test_a_turn_of_outputs_is_one_fast_batch_answered_once_and_a_refused_output_fails_only_its_input(
    nats_url: str, nc: Client, js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two offers handled in one turn, each producing an alert on the same subject, which
    ALERTS takes once (one message per subject, discard new): both outputs go out in one
    batch, JetStream refuses the second by its batch sequence, and only that offer is
    retried (then dead-lettered); the first is acked after the batch's single answer."""
    monkeypatch.setattr(topology, "BACKOFF_S", (1.0, 0.1, 0.1, 0.1))  # ack wait 1 s: no redelivery under load
    await topology.setup(js)
    config = (await js.stream_info("ALERTS")).config
    config.max_msgs_per_subject, config.discard_new_per_subject = 1, True
    await js.update_stream(config)
    batch_sizes: list[int] = []
    send_commits = runtime.Consumer._send_commits

    async def spy(self, batches) -> None:  # noqa: ANN001
        batch_sizes.extend(len(b.works) for b in batches)
        await send_commits(self, batches)

    monkeypatch.setattr(runtime.Consumer, "_send_commits", spy)
    answers: list[bytes] = []
    on_puback = runtime.Consumer._on_puback

    async def count(self, msg: Msg) -> None:  # noqa: ANN001
        answers.append(msg.data)
        await on_puback(self, msg)

    monkeypatch.setattr(runtime.Consumer, "_on_puback", count)
    on_the_wire: list[Msg] = []

    async def core_subscriber(msg: Msg) -> None:
        on_the_wire.append(msg)

    await nc.subscribe("fraud.alert.>", cb=core_subscriber)
    await publish(js, offer("ev_first", "call_1"))
    await publish(js, offer("ev_second", "call_2"))
    both_here = asyncio.Event()

    class Together(Recorder):
        """The first tries of both offers return in the same event-loop turn (one batch)."""

        async def __call__(self, event: AnyEvent, meta: Msg.Metadata) -> list[Event]:
            produced = await super().__call__(event, meta)
            if sum(self.attempts.values()) == 1:
                await both_here.wait()  # woken first by the second's set(), next turn
            elif sum(self.attempts.values()) == 2:
                both_here.set()
                await asyncio.sleep(0)  # ... and this one right after it, in the same turn
            return produced

    recorder = Together(produce=lambda event: [alert(event)])
    async with running(nats_url, recorder):
        [dead] = await dlq_messages(js, 1)
        await settled(js)
    assert batch_sizes[0] == 2, f"both outputs in the first batch: {batch_sizes}"
    assert recorder.attempts == {"ev_first": 1, "ev_second": topology.MAX_DELIVER}
    assert dead.headers[DLQ_REASON].startswith("publish_failed") and "per subject" in dead.headers[DLQ_REASON]
    [stored_alert] = await stored(js, "ALERTS", ["fraud.>"])
    assert stored_alert.headers["Nats-Msg-Id"] == "ev_first/alert"
    first_batch = [a for a in answers if b'"batch":"' in a or b'"type":"err"' in a][:2]
    assert b'"type":"err","seq":2' in first_batch[0] and b'"batch":"1"' in first_batch[1], answers
    # Per batch the commit's answer (and a flow ack at its start when it has more than one
    # output), plus one per refusal: none per stored output.
    assert len(answers) == sum(1 + (size > 1) for size in batch_sizes) + topology.MAX_DELIVER, answers
    # Every message a core subscriber of the subject got is an output: no empty commit markers.
    assert [decode(m.data).event_id for m in on_the_wire] == ["ev_first/alert"] + ["ev_second/alert"] * topology.MAX_DELIVER


async def test_handlers_start_in_stream_order_while_running_concurrently(nats_url: str, js: JetStreamContext) -> None:
    started: list[str] = []
    running_now = peak = 0

    async def handler(event: AnyEvent, _meta: Msg.Metadata) -> list[Event]:
        nonlocal running_now, peak
        started.append(event.event_id)  # before the first await: the order handlers began in
        running_now += 1
        peak = max(peak, running_now)
        await asyncio.sleep(random.uniform(0, 0.01))
        running_now -= 1
        return []

    sent = [f"ev_{i:03d}" for i in range(500)]
    pending = [await js.publish_async(SUBJECT, encode(offer(e, f"call_{e}")), headers={"Nats-Msg-Id": e}) for e in sent]
    await asyncio.gather(*pending)
    async with running(nats_url, handler, batch=64):
        await settled(js)
    assert started == sent
    assert peak > 1  # they did overlap


async def test_deliveries_beyond_a_shrunken_window_wait_and_handlers_still_start_in_stream_order(
    nats_url: str, js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow first handler shrinks the window (16 at start) to a few messages while a pull
    request for more is still open; the messages that request brings are read while the
    window is full: they wait in `_on_message` (and every one after them, though room
    comes back meanwhile), and no handler starts out of turn."""
    started: list[str] = []
    waited = 0
    on_message = Consumer._on_message

    async def counting(self: Consumer, msg: Msg) -> None:
        nonlocal waited
        waited += bool(msg.reply)
        await on_message(self, msg)

    monkeypatch.setattr(Consumer, "_on_message", counting)

    async def handler(event: AnyEvent, _meta: Msg.Metadata) -> list[Event]:
        if event.event_id in started:
            return []  # redelivered (a slow machine: waiting outlasted the ack wait): first starts count
        started.append(event.event_id)
        if event.event_id == "ev_000":
            time.sleep(0.06)  # busy: the window becomes 0.25 s (a share of the ack wait) / 60 ms = 4
        else:
            await asyncio.sleep(0.05)  # in flight a while, not busy
        return []

    sent = [f"ev_{i:03d}" for i in range(41)]
    async with running(nats_url, handler, batch=64):
        await js.publish(SUBJECT, encode(offer(sent[0], "call_0")), headers={"Nats-Msg-Id": sent[0]})
        await wait_until(lambda: started == sent[:1])
        await asyncio.gather(
            *[await js.publish_async(SUBJECT, encode(offer(e, f"call_{e}")), headers={"Nats-Msg-Id": e}) for e in sent[1:]]
        )
        await settled(js)
    assert started == sent
    assert waited > 0  # some deliveries did come while the window was full


def test_once_a_delivery_waits_for_room_every_later_one_waits_behind_it() -> None:
    """`Consumer._take` as the connection reads three deliveries: the first comes while the
    window is full and is left to `_on_message`; room comes back before that one was taken,
    yet the next must not overtake it; once it was taken, deliveries are taken at once."""
    consumer = Consumer(topology.consumer("fraud"), Recorder(), batch=2)
    consumer._window = 1
    consumer._inflight.add(object())  # full
    assert consumer._take(b"call.offered.48123456789", b"$JS.ACK.1", None) is None
    consumer._inflight.clear()  # room again, the first still on its way to `_on_message`
    assert consumer._take(b"call.offered.48123456789", b"$JS.ACK.2", None) is None
    consumer._deferred = 0  # `_on_message` took both
    assert consumer._take(b"call.offered.48123456789", b"$JS.ACK.3", None) == consumer._accept
    wide = Consumer(topology.consumer("meter-calls"), Recorder())  # server filter call.>, no offers wanted
    assert wide._take(b"call.offered.48123456789", b"$JS.ACK.5", None) == natswire.ack_command(b"$JS.ACK.5")


def test_own_outputs_are_recognised_in_the_raw_header_block_or_left_to_the_parsed_one() -> None:
    gatekeeper = Consumer(topology.consumer("gatekeeper"), Recorder())  # skip_own
    subject = b"call.answered.48123456789"
    own = b"NATS/1.0\r\nNats-Msg-Id: ev/answered\r\nCallplane-Origin: gatekeeper\r\n\r\n"
    theirs = b"NATS/1.0\r\nNats-Msg-Id: ev/answered\r\nCallplane-Origin: edge\r\n\r\n"
    unusual = b"NATS/1.0\r\nCallplane-Origin:gatekeeper \r\n\r\n"  # as nats-py parses it: ours
    overridden = own[:-2] + b"Callplane-Origin: edge\r\n\r\n"  # the last one counts, as in nats-py
    assert gatekeeper._take(subject, b"$JS.ACK.1", own) == natswire.ack_command(b"$JS.ACK.1")
    assert gatekeeper._take(subject, b"$JS.ACK.2", unusual) == natswire.ack_command(b"$JS.ACK.2")
    assert gatekeeper._take(subject, b"$JS.ACK.3", theirs) == gatekeeper._accept
    assert gatekeeper._take(subject, b"$JS.ACK.4", None) == gatekeeper._accept
    assert gatekeeper._take(subject, b"$JS.ACK.5", overridden) == gatekeeper._accept


async def test_stop_waits_for_handlers_in_flight_and_leaves_nothing_handled_unacked(
    nats_url: str, js: JetStreamContext
) -> None:
    release = asyncio.Event()
    handled: list[str] = []

    async def slow(event: AnyEvent, _meta: Msg.Metadata) -> list[Event]:
        await release.wait()
        handled.append(event.event_id)
        return [accepted(event)]

    sent = [f"ev_stop_{i}" for i in range(40)]
    for e in sent:
        await publish(js, offer(e, f"call_{e}"))
    broker = make_broker(NatsSettings(nats_url=nats_url), service="fraud")
    consume(broker, topology.consumer("fraud"), slow, batch=8)
    await broker.start()
    await start_consumers(broker)
    try:
        [consumer] = consumers(broker)
        await wait_until(lambda: consumer.in_flight == 8)
        stopping = asyncio.create_task(stop_consumers(broker))
        await asyncio.sleep(0.3)
        assert not stopping.done()  # waits for the handlers in flight
        release.set()
        await asyncio.wait_for(stopping, 10)
        assert consumer.in_flight == 0 and not consumer.running
    finally:
        await broker.stop()
    assert sorted(handled) == sorted(sent[:8])
    info = await js.consumer_info("CALLS", "fraud")
    assert info.num_ack_pending == 0  # every handled input acked; the rest were given back
    assert info.ack_floor.stream_seq == 8 and info.num_pending == len(sent) - 8
    assert len(await stored(js, "CALLS", ["call.accepted.*"])) == 8  # their outputs stored


async def test_errors_in_the_pull_loop_do_not_stop_the_consumer(
    nats_url: str, js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Timeouts (nats-py's and the builtin one) and other errors while pulling are logged
    and the loop pulls again."""
    failures = [TimeoutError(), nats.errors.TimeoutError(), nats.errors.ConnectionReconnectingError()]
    pull = runtime.Consumer._pull

    async def flaky(self) -> None:  # noqa: ANN001
        if failures:
            raise failures.pop(0)
        await pull(self)

    monkeypatch.setattr(runtime.Consumer, "_pull", flaky)
    recorder = Recorder()
    async with running(nats_url, recorder) as broker:
        [consumer] = consumers(broker)
        await publish(js, offer("ev_after_errors"))
        await wait_until(lambda: bool(recorder.seen), timeout=10)
        assert not failures and consumer.running


async def test_the_consumer_pulls_again_after_a_reconnect(nats_url: str, js: JetStreamContext) -> None:
    recorder = Recorder()
    async with running(nats_url, recorder) as broker:
        await publish(js, offer("ev_before"))
        await wait_until(lambda: len(recorder.seen) == 1)
        connection = broker.connection
        reconnects = connection.stats["reconnects"]
        connection._transport.close()  # the socket drops: nats-py reconnects
        await wait_until(lambda: connection.stats["reconnects"] > reconnects and connection.is_connected)
        await publish(js, offer("ev_after"))
        # sooner than a missed heartbeat would tell (an ack lost with the socket may redeliver ev_before too)
        await wait_until(lambda: "ev_after" in [e.event_id for e in recorder.seen], timeout=5)
        await settled(js)


async def test_outputs_in_batches_cut_by_reconnects_are_each_stored_once_and_every_input_acked(
    nats_url: str, js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """300 offers, two outputs each, the socket dropped twice while their batches are in
    flight: a batch whose answer was lost with the socket times out and its inputs are
    handled again (their outputs dedupe); in the end every offer is acked and each output is
    stored once, none dead-lettered."""
    monkeypatch.setattr(runtime, "PUBACK_TIMEOUT_S", 0.5)
    monkeypatch.setattr(topology, "BACKOFF_S", (1.0, 0.1, 0.1, 0.1))
    await topology.setup(js)
    offers = [offer(f"ev_r{i}", f"call_r{i}") for i in range(300)]
    recorder = Recorder(produce=lambda event: [accepted(event), answered(event)])
    async with running(nats_url, recorder, batch=64) as broker:
        connection = broker.connection
        for i, source in enumerate(offers):
            await publish(js, source)
            if i in (100, 200):
                reconnects = connection.stats["reconnects"]
                connection._transport.close()
                await wait_until(lambda r=reconnects: connection.stats["reconnects"] > r and connection.is_connected)
        await settled(js, timeout=30)
    outputs = await stored(js, "CALLS", ["call.accepted.*", "call.answered.*"])
    ids = [m.headers["Nats-Msg-Id"] for m in outputs]
    assert len(ids) == len(set(ids)) == 600
    assert {e.event_id for e in recorder.seen} == {o.event_id for o in offers}
    assert await dlq_messages(js, 1, timeout=0.5) == []


async def test_the_consumer_pulls_again_when_its_durable_is_recreated(nats_url: str, js: JetStreamContext) -> None:
    """Deleting the durable ends the pull requests waiting on it (409); once setup has
    created it again the consumer goes on without a restart."""
    recorder = Recorder()
    async with running(nats_url, recorder):
        await publish(js, offer("ev_first"))
        await wait_until(lambda: len(recorder.seen) == 1)
        await js.delete_consumer("CALLS", "fraud")
        await topology.setup(js)
        await publish(js, offer("ev_second", "call_2"))
        await wait_until(lambda: "ev_second" in [e.event_id for e in recorder.seen], timeout=5)
        await settled(js)  # (the new durable delivers the stream from the start again)


async def test_a_slow_synchronous_handler_shrinks_the_window_so_nothing_waits_past_the_ack_wait(
    nats_url: str, js: JetStreamContext
) -> None:
    """20 ms of blocking work per message: a full window of 256 would keep the last one
    waiting 5 s, past the durable's 1 s ack wait (redelivered while still queued). The
    window follows the measured handler time instead: a quarter of the ack wait's worth."""
    import time

    def busy(event: AnyEvent) -> list[Event]:
        time.sleep(0.02)  # CPU-bound work, as a database write in the handler is
        return []

    sent = [f"ev_slow_{i}" for i in range(80)]
    pending = [await js.publish_async(SUBJECT, encode(offer(e, f"call_{e}")), headers={"Nats-Msg-Id": e}) for e in sent]
    await asyncio.gather(*pending)
    recorder = Recorder(produce=busy)
    async with running(nats_url, recorder, batch=256) as broker:
        [consumer] = consumers(broker)
        info = await settled(js, timeout=20)
        assert 5 <= consumer._window <= 15  # 0.25 s / 20 ms = 12
    assert info.num_redelivered == 0 and sorted(recorder.attempts) == sorted(sent)
    assert set(recorder.attempts.values()) == {1}


# -- batches (consume_batches) and a wide server filter ----------------------------------


class BatchRecorder:
    """A batch handler: records each batch; an event in `fail_on` fails alone."""

    def __init__(self, fail_on: set[str] = frozenset(), produce=None) -> None:  # noqa: ANN001
        self.batches: list[list[str]] = []
        self.fail_on = fail_on
        self.produce = produce or (lambda _event: [])

    async def __call__(self, items: list) -> list:  # noqa: ANN001
        self.batches.append([event.event_id for event, _meta in items])
        await asyncio.sleep(0.05)  # a commit: what arrives meanwhile makes up the next batch
        return [
            RuntimeError("not yet") if event.event_id in self.fail_on else self.produce(event) for event, _meta in items
        ]


def running_batches(nats_url: str, handler, spec: topology.ConsumerSpec | None = None):  # noqa: ANN001, ANN201
    return running(nats_url, handler, batch=64, spec=spec, register=runtime.consume_batches)


async def test_a_batch_handler_gets_messages_in_stream_order_and_each_input_is_acked_after_its_outputs(
    nats_url: str, js: JetStreamContext
) -> None:
    offers = [offer(f"ev_{n}", f"call_{n}") for n in range(200)]
    recorder = BatchRecorder(produce=lambda event: [accepted(event)])
    async with running_batches(nats_url, recorder):
        for first in range(0, 200, 50):
            await asyncio.gather(*(publish(js, o) for o in offers[first : first + 50]))
        await settled(js)
    handled = [event_id for batch in recorder.batches for event_id in batch]
    assert handled == [o.event_id for o in offers]  # each once, in stream order
    assert len(recorder.batches) < len(offers) / 4  # in batches, not one by one
    decisions = await stored(js, "CALLS", ["call.accepted.*"])
    assert [m.headers["Nats-Msg-Id"] for m in decisions] == [f"ev_{n}/decision" for n in range(200)]


async def test_an_event_failing_in_a_batch_is_retried_alone_and_its_batch_mates_are_acked(
    nats_url: str, js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(topology, "BACKOFF_S", (0.1, 0.1, 0.1, 0.1))
    await topology.setup(js)
    recorder = BatchRecorder(fail_on={"ev_early"})
    async with running_batches(nats_url, recorder):
        await asyncio.gather(*(publish(js, o) for o in (offer("ev_a", "a"), offer("ev_early", "e"), offer("ev_b", "b"))))
        [dead] = await dlq_messages(js, 1)
        assert dead.headers[DLQ_REASON].startswith(f"handler_failed after {topology.MAX_DELIVER} deliveries")
        await settled(js)
    handled = [event_id for batch in recorder.batches for event_id in batch]
    assert handled.count("ev_a") == handled.count("ev_b") == 1  # never redelivered with it
    assert handled.count("ev_early") == topology.MAX_DELIVER


async def test_under_a_wide_server_filter_only_the_wanted_subjects_reach_the_handler(
    nats_url: str, js: JetStreamContext
) -> None:
    spec = topology.ConsumerSpec(
        "wide", "CALLS", ("call.offered.*", "call.answered.*"), "fraud", server_filter="call.>"
    )
    await js.add_consumer("CALLS", spec.config())
    source = offer("ev_1")
    recorder = BatchRecorder()
    async with running_batches(nats_url, recorder, spec):
        for event in (source, accepted(source), answered(source)):
            await publish(js, event)
        await settled(js, "wide")
    assert [event_id for batch in recorder.batches for event_id in batch] == ["ev_1", "ev_1/answered"]


@pytest.mark.parametrize(
    ("pattern", "subject", "matches"),
    [
        ("call.ended.*", "call.ended.4812", True),
        ("call.ended.*", "call.ended.4812.x", False),
        ("call.ended.*", "call.offered.4812", False),
        ("call.>", "call.ended.4812", True),
        ("call.>", "call", False),
        ("*.ended.*", "call.ended.1", True),
    ],
)
def test_subject_patterns_match_as_nats_matches_them(pattern: str, subject: str, matches: bool) -> None:
    assert topology._subject_matches(pattern, subject) is matches
    spec = topology.ConsumerSpec("d", "CALLS", (pattern, "x.y.z"), "s", server_filter=">")
    assert spec.wants()(subject) is matches


async def test_a_durable_that_skips_its_own_outputs_handles_the_same_events_from_others(
    nats_url: str, js: JetStreamContext
) -> None:
    spec = topology.ConsumerSpec(
        "own", "CALLS", ("call.offered.*", "call.answered.*"), "fraud", server_filter="call.>", skip_own=True
    )
    await js.add_consumer("CALLS", spec.config())
    recorder = BatchRecorder(produce=lambda event: [answered(event)] if isinstance(event, CallOffered) else [])
    async with running_batches(nats_url, recorder, spec):
        await publish(js, offer("ev_1", "call_1"))  # its pick-up comes back from the stream: skipped
        await settled(js, "own")
        await publish(js, answered(offer("ev_2", "call_2")))  # an edge's pick-up: handled
        await settled(js, "own")
    assert [event_id for batch in recorder.batches for event_id in batch] == ["ev_1", "ev_2/answered"]
    [own] = [m for m in await stored(js, "CALLS", ["call.answered.*"]) if m.headers["Nats-Msg-Id"] == "ev_1/answered"]
    assert own.headers[runtime.ORIGIN_HEADER] == "own"


async def test_a_batch_consumer_stopped_on_timeout_starts_no_batch_afterwards(nats_url: str, js: JetStreamContext) -> None:
    """A handler stuck past the stop timeout is cancelled; what gathered behind it is given
    back to JetStream, not handed to the handler once stop() has returned."""
    stuck = asyncio.Event()
    batches: list[list[str]] = []

    async def handler(items: list) -> list:  # noqa: ANN001
        batches.append([event.event_id for event, _meta in items])
        await stuck.wait()  # never set: a commit that hangs
        return [[] for _ in items]

    broker = make_broker(NatsSettings(nats_url=nats_url), service="fraud")
    runtime.consume_batches(broker, topology.consumer("fraud"), handler, batch=8)
    await broker.start()
    await start_consumers(broker)
    try:
        [consumer] = consumers(broker)
        await publish(js, offer("ev_stuck_0", "call_s0"))
        await wait_until(lambda: len(batches) == 1)
        for n in range(1, 4):
            await publish(js, offer(f"ev_stuck_{n}", f"call_s{n}"))
        await wait_until(lambda: consumer.in_flight == 4)  # gathered behind the stuck batch
        await stop_consumers(broker, timeout=0.3)
        await asyncio.sleep(0.3)
        assert batches == [["ev_stuck_0"]]  # nothing handled after stop
        assert consumer.in_flight == 0 and not consumer.running
    finally:
        await broker.stop()
