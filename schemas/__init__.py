"""callplane's wire contract: events, their encoding, and the subjects they travel on.

Services share only this package and the small common runtime in `callplane`.
"""

from .commands import AnyCommand, Command, Reply, command_name, decode_command, decode_reply, encode_message
from .codec import DecodeError, decode, derived_id, encode, parse_timestamp, timestamp
from .events import *  # noqa: F403
from .events import EVENT_TYPES, HIGH_RISK_PREFIXES, SIP_STATUS, TYPES_BY_TAG, AnyEvent, Event, tag_of
from .subjects import STREAMS, dlq, key_of, number_token, of_type, rpc, stream_of, subject_for

__all__ = [
    "AnyCommand",
    "Command",
    "Reply",
    "command_name",
    "decode_command",
    "decode_reply",
    "encode_message",
    "EVENT_TYPES",
    "HIGH_RISK_PREFIXES",
    "SIP_STATUS",
    "STREAMS",
    "TYPES_BY_TAG",
    "AnyEvent",
    "DecodeError",
    "Event",
    "decode",
    "derived_id",
    "dlq",
    "encode",
    "key_of",
    "number_token",
    "of_type",
    "parse_timestamp",
    "rpc",
    "stream_of",
    "subject_for",
    "tag_of",
    "timestamp",
]
