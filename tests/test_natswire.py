"""callplane.natswire against nats-py itself: the header parse gives nats-py's result for
any header block, and a message published with a prebuilt header block arrives exactly
as nats-py's own publish of the same headers does (over a real nats-server)."""

from __future__ import annotations

import asyncio

import nats
import pytest
from hypothesis import given
from hypothesis import strategies as st

from callplane import natswire

LINE_PARTS = st.sampled_from([b"Nats-Msg-Id", b"X", b" a b ", b"\xff\xfe", b":", b" ", b"\t", b"\x1c", b"\xc3\xa9", b"v"])
BLOCKS = st.lists(st.lists(LINE_PARTS | st.binary(max_size=8), max_size=6).map(b"".join), max_size=6).map(b"\r\n".join)


@given(BLOCKS)
def test_the_header_parse_gives_nats_pys_result_for_any_block(raw: bytes) -> None:
    assert natswire.parse_header_lines(raw) == natswire.NATS_PY_PARSE_HEADER_LINES(raw)


def test_the_header_parse_skips_names_with_any_whitespace_as_nats_py_does() -> None:
    raw = b"Good: 1\r\nBad\x1cName: 2\r\nAlso Bad: 3\r\nNats-Msg-Id:  ev_1 \r\n"
    assert natswire.parse_header_lines(raw) == {"Good": "1", "Nats-Msg-Id": "ev_1"}
    assert natswire.parse_header_lines(raw) == natswire.NATS_PY_PARSE_HEADER_LINES(raw)


@pytest.mark.parametrize("msg_id", ["ev_1/decision", "  padded  ", "line\r\nInjected: yes", "é-ünïcode"])
async def test_a_prebuilt_header_block_arrives_as_nats_pys_publish_of_the_same_headers(nats_url: str, msg_id: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        sub = await nc.subscribe("natswire.>")
        headers = {"Nats-Msg-Id": msg_id, "Callplane-Origin": "gatekeeper"}
        await nc.publish("natswire.theirs", b"body", reply="_INBOX.r", headers=headers)
        block = natswire.header_block(*(natswire.header_line(k, v) for k, v in headers.items()))
        await natswire.publish_with_header(nc, "natswire.ours", b"body", reply="_INBOX.r", header=block)
        theirs, ours = [await sub.next_msg(timeout=2) for _ in range(2)]
        assert (ours.data, ours.reply, ours.headers) == (theirs.data, theirs.reply, theirs.headers)
        assert "Injected" not in ours.headers
    finally:
        await nc.close()


async def test_what_publish_would_refuse_is_refused_by_publish(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    block = natswire.header_block(natswire.header_line("Nats-Msg-Id", "ev"))
    try:
        with pytest.raises(nats.errors.BadSubjectError):
            await natswire.publish_with_header(nc, "bad subject", b"", reply="_INBOX.r", header=block)
        with pytest.raises(nats.errors.MaxPayloadError):
            await natswire.publish_with_header(nc, "natswire.big", b"x" * (nc.max_payload + 1), reply="r", header=block)
    finally:
        await nc.close()
    with pytest.raises(nats.errors.ConnectionClosedError):
        await natswire.publish_with_header(nc, "natswire.closed", b"", reply="r", header=block)


async def test_ack_acks_a_jetstream_delivery_once_as_msg_ack_does(js) -> None:  # noqa: ANN001
    await js.publish("call.offered.48123456789", b"{}")
    sub = await js.pull_subscribe("call.offered.*", durable="natswire", stream="CALLS")
    [msg] = await sub.fetch(1, timeout=2)
    await natswire.ack(msg)
    with pytest.raises(nats.errors.MsgAlreadyAckdError):
        await natswire.ack(msg)
    await msg._client.flush()
    info = await js.consumer_info("CALLS", "natswire")
    assert (info.ack_floor.stream_seq, info.num_ack_pending, info.num_redelivered) == (1, 0, 0)
    with pytest.raises(nats.errors.NotJSMessageError):
        await natswire.ack(nats.aio.msg.Msg(msg._client, subject="x", reply=""))


async def test_divert_shows_raw_deliveries_first_and_sends_acks_takes_msgs_or_passes_them_on(js) -> None:  # noqa: ANN001
    """Each verdict of `take`: an ack command is sent instead of the delivery (the durable
    sees it acked, the callback never sees it); a function gets the Msg nats-py would have
    built (headers parsed); None leaves the delivery to the subscription's callback."""
    nc = js._nc
    for i, kind in enumerate(["ack", "take", "pass"]):
        await js.publish(f"call.offered.4812345678{i}", kind.encode(), headers={"Nats-Msg-Id": f"m{i}", "Kind": kind})
    seen: list[tuple[bytes, bytes, bytes | None]] = []
    taken: list[nats.aio.msg.Msg] = []
    called: list[nats.aio.msg.Msg] = []

    def take(subject: bytes, reply: bytes, headers: bytes | None) -> natswire.Verdict:
        seen.append((subject, reply, headers))
        if b"Kind: ack" in headers:
            return natswire.ack_command(reply)
        return taken.append if b"Kind: take" in headers else None

    async def callback(msg: nats.aio.msg.Msg) -> None:
        called.append(msg)

    await js.add_consumer("CALLS", durable_name="diverted", ack_policy="explicit")
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=callback)
    natswire.divert(nc, sub._id, take)
    await nc.publish("$JS.API.CONSUMER.MSG.NEXT.CALLS.diverted", b'{"batch": 3, "expires": 2000000000}', reply=inbox)
    for _ in range(100):
        if len(seen) == 3 and called:
            break
        await asyncio.sleep(0.02)
    assert [s for s, _, _ in seen] == [b"call.offered.48123456780", b"call.offered.48123456781", b"call.offered.48123456782"]
    assert [m.data for m in taken] == [b"take"] and taken[0].headers == {"Nats-Msg-Id": "m1", "Kind": "take"}
    assert [m.data for m in called] == [b"pass"]
    assert taken[0].reply == seen[1][1].decode() and taken[0]._client is nc
    for _ in range(100):  # the server applies acks on its own time
        info = await js.consumer_info("CALLS", "diverted")
        if info.ack_floor.stream_seq:
            break
        await asyncio.sleep(0.02)
    assert (info.ack_floor.stream_seq, info.num_ack_pending) == (1, 2)  # only the first was acked

    natswire.divert(nc, sub._id, None)  # stopped: nats-py's way again
    await js.publish("call.offered.48123456783", b"ack", headers={"Kind": "ack"})
    await nc.publish("$JS.API.CONSUMER.MSG.NEXT.CALLS.diverted", b'{"batch": 1, "expires": 2000000000}', reply=inbox)
    for _ in range(100):
        if len(called) == 2:
            break
        await asyncio.sleep(0.02)
    assert [m.data for m in called] == [b"pass", b"ack"] and len(seen) == 3


async def test_a_take_that_raises_leaves_the_delivery_to_nats_py(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        sub = await nc.subscribe("natswire.raw")
        natswire.divert(nc, sub._id, lambda *_: 1 / 0)
        await nc.publish("natswire.raw", b"body", reply="_INBOX.r")
        msg = await sub.next_msg(timeout=2)
        assert msg.data == b"body"
    finally:
        await nc.close()
