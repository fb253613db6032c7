"""Commands sent to services over NATS request/reply, and the one reply shape.

Commands are requests, not facts: they travel on `rpc.<service>.<command>` subjects
that no stream captures. A service answers with `Reply`: `ok` and the events the
command produced, or a stable error `code`, a human `message` and the `field` at fault.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from .events import E164, NonNegative, Positive, SecurityPolicy, Token


class Command(Struct, tag_field="command", kw_only=True, frozen=True):
    pass


class TwilioCredentials(Struct, kw_only=True, frozen=True):
    account_sid: str  # AC + 32 hex
    auth_token: str  # a secret: encrypted at rest, never in events, logs or replies


class SipCredentials(Struct, kw_only=True, frozen=True):
    username: str
    password: str  # a secret, as above


class OutboundTrunkConfig(Struct, kw_only=True, frozen=True):
    address: str  # host or IP of the trunk, without "sip:"
    transport: Literal["auto", "udp", "tcp", "tls"] = "auto"
    media_encryption: Literal["disabled", "allowed", "required"] = "allowed"
    headers: dict[str, str] = {}
    credentials: SipCredentials | None = None


class InboundTrunkConfig(Struct, kw_only=True, frozen=True):
    allowed_addresses: tuple[str, ...] = ()
    allowed_numbers: tuple[str, ...] = ()
    remote_domains: tuple[str, ...] = ()
    credentials: SipCredentials | None = None


class PreCallWebhookConfig(Struct, kw_only=True, frozen=True):
    url: str
    secret: str  # Standard Webhooks signing secret "whsec_<base64>": sealed at rest, never shown
    timeout_ms: int = 2000
    fail_closed: bool = False
    allow_private: bool = False


class RegisterNumber(Command, tag="register_number", kw_only=True):
    """Register (import) a number: from Twilio (with `twilio` credentials) or as a SIP trunk."""

    number: str  # E.164, validated with libphonenumber
    account_id: Token
    provider: Literal["twilio", "sip_trunk"] = "sip_trunk"
    label: str = ""
    twilio: TwilioCredentials | None = None
    outbound_trunk: OutboundTrunkConfig | None = None
    inbound_trunk: InboundTrunkConfig | None = None


class SyncNumber(Command, tag="sync_number", kw_only=True):
    """Refresh a registered number's provider configuration; uses no quota."""

    number: str
    twilio: TwilioCredentials | None = None
    outbound_trunk: OutboundTrunkConfig | None = None
    inbound_trunk: InboundTrunkConfig | None = None


class UpdateNumber(Command, tag="update_number", kw_only=True):
    """Change the label and/or the agent; a field left out is left as it is."""

    number: str
    label: str | UnsetType = UNSET
    agent_id: Token | None | UnsetType = UNSET  # None unassigns
    assignment_type: Literal["agent", "softphone"] | UnsetType = UNSET  # left out: kept (or "agent")


class AssignAgent(Command, tag="assign_agent", kw_only=True):
    number: str
    agent_id: Token | None
    assignment_type: Literal["agent", "softphone"] = "agent"


class SetPolicy(Command, tag="set_policy", kw_only=True):
    number: str
    policy: SecurityPolicy
    # Set it to the policy_version you read to be refused (conflict) if someone changed it since.
    expected_policy_version: int | None = None


class UnregisterNumber(Command, tag="unregister_number", kw_only=True):
    number: str
    force: bool = False  # an assigned number is refused unless forced


class GetNumber(Command, tag="get_number", kw_only=True):
    number: str | None = None
    number_id: str | None = None


class ListNumbers(Command, tag="list_numbers", kw_only=True):
    account_id: str | None = None


class GetAccount(Command, tag="get_account", kw_only=True):
    account_id: str


class RotateSecrets(Command, tag="rotate_secrets", kw_only=True):
    """Re-seal every stored secret under the newest key, so older keys can be retired."""


class ConfigureAccount(Command, tag="configure_account", kw_only=True):
    account_id: Token
    rate_millicredits_per_minute: NonNegative = 30_000
    text_price_millicredits: NonNegative = 0
    daily_voice_cap_s: NonNegative | None = None
    per_call_max_s: Positive | None = None
    timezone: str = "UTC"
    allowed_high_risk_prefixes: tuple[str, ...] = ()  # outbound premium / revenue-share ranges allowed
    pre_call_webhook: PreCallWebhookConfig | None = None


class CreditAccount(Command, tag="credit_account", kw_only=True):
    account_id: Token
    amount_millicredits: Positive
    reference: Annotated[str, Meta(min_length=1, max_length=200)]  # the same reference credits once


class HoldCredit(Command, tag="hold_credit", kw_only=True):
    """Gatekeeper to meter: reserve the first minute of an admitted call (idempotent by call_id)."""

    call_id: Token
    account_id: Token
    number: str


class HoldCredits(Command, tag="hold_credits", kw_only=True):
    """Gatekeeper to meter: several holds in one round trip. The reply's `replies` answer
    them one for one, in order; each is what `hold_credit` would have answered."""

    requests: Annotated[list[HoldCredit], Meta(min_length=1, max_length=1000)]


class AnswerCall(Command, tag="answer_call", kw_only=True):
    """An agent that answers by itself (auto_answer off) picks up a ringing call."""

    call_id: Token
    number: str


class PlaceCall(Command, tag="place_call", kw_only=True):
    """Dialer: call `to` from one of our numbers."""

    from_number: E164
    to: E164
    call_id: Token | None = None


AnyCommand = (
    RegisterNumber
    | SyncNumber
    | UpdateNumber
    | AssignAgent
    | SetPolicy
    | UnregisterNumber
    | GetNumber
    | ListNumbers
    | GetAccount
    | RotateSecrets
    | ConfigureAccount
    | CreditAccount
    | PlaceCall
    | HoldCredit
    | HoldCredits
    | AnswerCall
)


# -- what queries answer with (no secrets: a hint of the last four characters at most) --


class TwilioView(Struct, kw_only=True):
    account_sid: str
    auth_token_hint: str | None = None


class OutboundTrunkView(Struct, kw_only=True):
    address: str
    transport: str
    media_encryption: str
    headers: dict[str, str] = {}
    username: str | None = None
    password_hint: str | None = None


class InboundTrunkView(Struct, kw_only=True):
    allowed_addresses: tuple[str, ...] = ()
    allowed_numbers: tuple[str, ...] = ()
    remote_domains: tuple[str, ...] = ()
    username: str | None = None
    password_hint: str | None = None


class NumberView(Struct, kw_only=True):
    phone_number_id: str
    phone_number: str
    account_id: str
    provider: Literal["twilio", "sip_trunk"]
    label: str
    sip_uri: str
    agent_id: str | None = None
    assignment_type: Literal["agent", "softphone"] | None = None
    policy: SecurityPolicy = SecurityPolicy()
    policy_version: int = 0
    twilio: TwilioView | None = None
    outbound_trunk: OutboundTrunkView | None = None
    inbound_trunk: InboundTrunkView | None = None
    version: int = 0  # stream sequence of the number's last event (optimistic concurrency)


class PreCallWebhookView(Struct, kw_only=True):
    url: str
    secret_hint: str | None = None
    timeout_ms: int = 2000
    fail_closed: bool = False
    allow_private: bool = False


class AccountView(Struct, kw_only=True):
    account_id: str
    rate_millicredits_per_minute: int
    text_price_millicredits: int
    daily_voice_cap_s: int | None = None
    per_call_max_s: int | None = None
    timezone: str = "UTC"
    allowed_high_risk_prefixes: tuple[str, ...] = ()
    pre_call_webhook: PreCallWebhookView | None = None
    numbers: int = 0
    credited_millicredits: int = 0  # total of all top-ups (balances belong to the meter)


class HoldView(Struct, kw_only=True):
    hold_id: str
    amount_millicredits: int
    max_duration_s: int | None = None  # None: no cap applies


class Reply(Struct, kw_only=True, omit_defaults=True):
    ok: bool
    code: str | None = None  # stable, machine-readable: "conflict", "not_found", "invalid", ...
    message: str | None = None
    field: str | None = None
    rule: str | None = None  # the validation rule broken, e.g. "e164", "cidr"
    event_ids: list[str] = []
    number: NumberView | None = None  # get_number, and commands that change a number
    numbers: list[NumberView] | None = None  # list_numbers
    account: AccountView | None = None  # get_account, configure_account
    hold: HoldView | None = None  # hold_credit
    replies: list[Reply] | None = None  # hold_credits: one per request, in order


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
