"""Commands sent to services over NATS request/reply, and the one reply shape.

Commands are requests, not facts: they travel on `rpc.<service>.<command>` subjects
that no stream captures. A service answers with `Reply`: `ok` and the events the
command produced, or a stable error `code`, a human `message` and the `field` at fault.
"""

from __future__ import annotations

from typing import Literal

import msgspec
from msgspec import Struct

from .events import E164, NonNegative, Positive, SecurityPolicy, Token


class Command(Struct, tag_field="command", kw_only=True, frozen=True):
    pass


class RegisterNumber(Command, tag="register_number", kw_only=True):
    number: E164
    account_id: Token
    provider: Literal["twilio", "sip_trunk"] = "sip_trunk"
    label: str = ""


class AssignAgent(Command, tag="assign_agent", kw_only=True):
    number: E164
    agent_id: str | None


class SetPolicy(Command, tag="set_policy", kw_only=True):
    number: E164
    policy: SecurityPolicy


class UnregisterNumber(Command, tag="unregister_number", kw_only=True):
    number: E164


class ConfigureAccount(Command, tag="configure_account", kw_only=True):
    account_id: Token
    rate_millicredits_per_minute: NonNegative = 30_000
    text_price_millicredits: NonNegative = 0
    daily_voice_cap_s: NonNegative | None = None
    per_call_max_s: Positive | None = None
    timezone: str = "UTC"


class CreditAccount(Command, tag="credit_account", kw_only=True):
    account_id: Token
    amount_millicredits: Positive
    reference: str


class PlaceCall(Command, tag="place_call", kw_only=True):
    """Dialer: call `to` from one of our numbers."""

    from_number: E164
    to: E164
    call_id: Token | None = None


AnyCommand = (
    RegisterNumber | AssignAgent | SetPolicy | UnregisterNumber | ConfigureAccount | CreditAccount | PlaceCall
)


class Reply(Struct, kw_only=True, omit_defaults=True):
    ok: bool
    code: str | None = None  # stable, machine-readable: "conflict", "not_found", "invalid", ...
    message: str | None = None
    field: str | None = None
    event_ids: list[str] = []


_command_decoder = msgspec.json.Decoder(AnyCommand)
_reply_decoder = msgspec.json.Decoder(Reply)
_encoder = msgspec.json.Encoder()


def command_name(cls: type[Command]) -> str:
    return cls.__struct_config__.tag  # type: ignore[return-value]


def decode_command(data: bytes) -> AnyCommand:
    return _command_decoder.decode(data)


def decode_reply(data: bytes) -> Reply:
    return _reply_decoder.decode(data)


def encode_message(value: Command | Reply) -> bytes:
    return _encoder.encode(value)
