"""The metadata a handler gets: Msg.Metadata, parsed from the reply subject when first read."""

from __future__ import annotations

import pytest
from nats.aio.msg import Msg
from nats.errors import NotJSMessageError

from callplane.broker import _LazyMetadata

REPLY = "$JS.ACK.CALLS.gatekeeper.3.12345.12340.1764910000123456789.100"


def test_the_fields_are_those_nats_py_parses_from_the_reply_subject() -> None:
    msg = Msg(_client=None, subject="call.offered.48123456789", reply=REPLY)
    meta = _LazyMetadata(msg)
    assert isinstance(meta, Msg.Metadata)
    expected = Msg.Metadata._from_reply(REPLY)
    assert (meta.sequence, meta.num_pending, meta.num_delivered, meta.timestamp, meta.stream, meta.consumer) == (
        expected.sequence,
        expected.num_pending,
        expected.num_delivered,
        expected.timestamp,
        expected.stream,
        expected.consumer,
    )
    assert meta.sequence.stream == 12345 and meta.num_delivered == 3


def test_nothing_is_parsed_until_a_field_is_read() -> None:
    msg = Msg(_client=None, subject="call.offered.48123456789", reply=REPLY)
    meta = _LazyMetadata(msg)
    assert msg._metadata is None
    assert meta.stream == "CALLS"
    assert msg._metadata is not None


def test_a_message_without_a_jetstream_reply_raises_when_read() -> None:
    meta = _LazyMetadata(Msg(_client=None, subject="x", reply=""))
    with pytest.raises(NotJSMessageError):
        _ = meta.num_delivered
