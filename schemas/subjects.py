"""NATS subjects and streams. Nobody formats a subject anywhere else.

A subject is `<type>.<key>`: the key is the E.164 number without '+' for call.*,
number.* and fraud.*, and the account id for account.* and ledger.*. The key token
is what partitions work across instances.
"""

from __future__ import annotations

from typing import Final

from .events import (
    AccountConfigured,
    AccountCredited,
    CallOffered,
    Event,
    LedgerEvent,
    tag_of,
)

# Stream name -> the subjects it captures (SPEC section 2).
STREAMS: Final[dict[str, str]] = {
    "CALLS": "call.>",
    "NUMBERS": "number.>",
    "ACCOUNTS": "account.>",
    "LEDGER": "ledger.>",
    "ALERTS": "fraud.>",
    "DLQ": "dlq.>",
}

# Request/reply subjects live outside every stream's subjects: commands are not facts.
RPC_PREFIX: Final = "rpc"


def number_token(e164: str) -> str:
    """'+48123456789' -> '48123456789'."""
    return e164.removeprefix("+")


def key_of(event: Event) -> str:
    if isinstance(event, (AccountConfigured, AccountCredited, LedgerEvent)):
        return event.account_id
    if isinstance(event, CallOffered):
        return number_token(event.number)
    number = getattr(event, "number", None)
    if number is None:
        raise ValueError(f"{type(event).__name__} has no subject key")
    return number_token(number)


def subject_for(event: Event) -> str:
    """The subject an event is published on, e.g. 'call.offered.48123456789'."""
    return f"{tag_of(type(event))}.{key_of(event)}"


def of_type(event_type: type[Event], key: str = "*") -> str:
    """Filter for one event type: all keys by default, or one key."""
    return f"{tag_of(event_type)}.{key}"


def stream_of(subject: str) -> str:
    """The stream that captures a subject (by its first token)."""
    head = subject.split(".", 1)[0]
    for name, pattern in STREAMS.items():
        if pattern.split(".", 1)[0] == head:
            return name
    raise ValueError(f"no stream captures {subject!r}")


def dlq(subject: str) -> str:
    """Where a message that cannot be processed goes: 'dlq.<original subject>'."""
    return f"dlq.{subject}"


def rpc(service: str, command: str) -> str:
    """Request/reply subject of a service command, e.g. 'rpc.provisioner.register_number'."""
    return f"{RPC_PREFIX}.{service}.{command}"



