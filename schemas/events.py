"""Every callplane event (v1) as a msgspec Struct in one tagged union.

This module is the wire contract (SPEC section 2). Rules that keep it evolvable:
fields are only ever added, always with a default; a tag is never reused; decoders
ignore unknown fields. Money is integer millicredits, durations integer milliseconds
(or whole seconds where the name ends in `_s`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import msgspec
from msgspec import Meta, Struct, field

# -- value types -------------------------------------------------------------------

E164 = Annotated[str, Meta(pattern=r"^\+[1-9][0-9]{1,14}$", description="E.164 number, e.g. +48123456789")]
Caller = Annotated[
    str,
    Meta(pattern=r"^(\+[1-9][0-9]{1,14}|anonymous)$", description="E.164 number or 'anonymous'"),
]
# Ids travel as NATS subject tokens, so they may not hold '.', '*', '>' or spaces.
Token = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
Timestamp = Annotated[
    str,
    Meta(
        pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z$",
        description="RFC 3339 UTC with milliseconds, e.g. 2026-11-21T09:59:07.123Z",
    ),
]
INT64_MAX = 2**63 - 1  # ledgers store amounts as BIGINT
NonNegative = Annotated[int, Meta(ge=0, le=INT64_MAX)]
Positive = Annotated[int, Meta(gt=0, le=INT64_MAX)]
HHMM = Annotated[str, Meta(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")]
Prefix = Annotated[str, Meta(pattern=r"^\+[0-9]{1,15}$")]
VariableValue = Union[str, int, float, bool]

Direction = Literal["inbound", "outbound"]
Transport = Literal["udp", "tcp", "tls"]
EndReason = Literal["caller_hangup", "agent_hangup", "cutoff", "transferred", "error"]
CutoffReason = Literal["credit_exhausted", "per_call_cap", "daily_cap"]
RejectReason = Literal[
    "unknown_number",
    "no_agent",
    "source_ip_not_allowed",
    "caller_blocked",
    "caller_not_allowed",
    "encryption_required",
    "outside_hours",
    "busy",
    "hourly_limit",
    "daily_limit",
    "daily_voice_cap",
    "insufficient_credits",
    "webhook_rejected",
    "billing_unavailable",
    "destination_blocked",
    "destination_high_risk",
]

# Outbound destinations the gatekeeper refuses unless the account allows them (AccountConfigured.
# allowed_high_risk_prefixes), and the fraud service watches: premium-rate and revenue-share
# ranges that international revenue share fraud (IRSF) pumps traffic to. A starting list.
HIGH_RISK_PREFIXES: tuple[str, ...] = (
    "+1900", "+1976",  # North American premium rate
    "+4487", "+4490", "+4491", "+4498",  # UK premium / revenue share
    "+881", "+882", "+883",  # global satellite and international networks
    "+979",  # international premium rate
    "+53", "+252", "+232", "+224", "+675", "+677", "+678", "+682", "+688", "+674",  # IRSF hot spots
)  # fmt: skip

# SPEC section 4: the SIP status that goes with every refusal.
SIP_STATUS: dict[str, int] = {
    "unknown_number": 404,
    "no_agent": 480,
    "source_ip_not_allowed": 403,
    "caller_blocked": 403,
    "caller_not_allowed": 403,
    "encryption_required": 488,
    "outside_hours": 480,
    "busy": 486,
    "hourly_limit": 503,
    "daily_limit": 503,
    "daily_voice_cap": 480,
    "insufficient_credits": 402,
    "webhook_rejected": 603,
    "billing_unavailable": 503,
    "destination_blocked": 403,  # outbound: the policy blocks the called prefix
    "destination_high_risk": 403,  # outbound: premium / revenue-share range the account has not allowed
}


class Model(Struct, kw_only=True, frozen=True, omit_defaults=False):
    """Base of nested value objects (not events)."""


# -- nested values -----------------------------------------------------------------


class Hours(Model, kw_only=True):
    start: HHMM
    end: HHMM  # end < start wraps midnight
    timezone: str = "UTC"  # IANA name


class FraudAlertPolicy(Model, kw_only=True):
    calls: Positive  # alert when more than `calls` offers arrive ...
    window_minutes: Positive  # ... within this many minutes
    email: str | None = None
    webhook_url: str | None = None


class SecurityPolicy(Model, kw_only=True):
    """Per-number admission policy (SPEC section 4). Empty means accept every call."""

    allowed_cidrs: tuple[str, ...] = ()
    media_encryption: Literal["disabled", "allowed", "required"] | None = None
    max_concurrent_calls: NonNegative | None = None
    max_calls_per_hour: NonNegative | None = None
    max_calls_per_day: NonNegative | None = None
    hours: Hours | None = None
    allowed_prefixes: tuple[Prefix, ...] = ()
    blocked_prefixes: tuple[Prefix, ...] = ()
    fraud_alert: FraudAlertPolicy | None = None


class OutboundTrunk(Model, kw_only=True):
    address: str  # host or IP, without "sip:"
    transport: Literal["auto", "udp", "tcp", "tls"] = "auto"
    media_encryption: Literal["disabled", "allowed", "required"] = "allowed"
    headers: dict[str, str] = {}
    username: str | None = None
    secret_ref: str | None = None  # reference to the encrypted password, never the password


class InboundTrunk(Model, kw_only=True):
    allowed_addresses: tuple[str, ...] = ()
    allowed_numbers: tuple[E164, ...] = ()
    remote_domains: tuple[str, ...] = ()
    username: str | None = None
    secret_ref: str | None = None


class PreCallWebhook(Model, kw_only=True):
    """An account's pre-call webhook (SPEC section 6); its signing secret is sealed, by reference."""

    url: str
    secret_ref: str | None = None
    timeout_ms: Annotated[int, Meta(ge=1, le=30_000)] = 2000
    fail_closed: bool = False  # on timeout or error: reject instead of proceeding with defaults
    allow_private: bool = False  # let the URL resolve to loopback / private addresses


class Check(Model, kw_only=True):
    """One admission check as evaluated: its inputs and whether it passed."""

    name: str
    passed: bool
    inputs: dict[str, VariableValue | None] = {}


class Decision(Model, kw_only=True):
    """Everything needed to explain (and replay) an admission decision."""

    policy_version: NonNegative = 0
    checks: tuple[Check, ...] = ()


# -- events ------------------------------------------------------------------------


class Event(Struct, tag_field="type", kw_only=True, frozen=True):
    """Base of every event. `type` is the tag; `event_id` doubles as Nats-Msg-Id."""

    event_id: Annotated[str, Meta(min_length=1, max_length=200)]
    occurred_at: Timestamp
    v: Positive = 1


class NumberRegistered(Event, tag="number.registered", kw_only=True):
    number: E164
    number_id: Annotated[str, Meta(pattern=r"^pn_[A-Za-z0-9]+$")]
    account_id: Token
    provider: Literal["twilio", "sip_trunk"]
    label: str = ""
    sip_uri: str = ""
    inbound_trunk: InboundTrunk | None = None
    outbound_trunk: OutboundTrunk | None = None
    secret_ref: str | None = None  # Twilio auth token reference, never the token
    twilio_account_sid: str | None = None  # an identifier, not a secret


class NumberAssigned(Event, tag="number.assigned", kw_only=True):
    number: E164
    agent_id: str | None  # None: unassigned
    assignment_type: Literal["agent", "softphone"] | None = "agent"


class NumberPolicySet(Event, tag="number.policy_set", kw_only=True):
    number: E164
    policy: SecurityPolicy
    policy_version: Positive


class NumberUnregistered(Event, tag="number.unregistered", kw_only=True):
    number: E164


class NumberLabelSet(Event, tag="number.label_set", kw_only=True):
    number: E164
    label: str


class NumberSynced(Event, tag="number.synced", kw_only=True):
    """The provider side of a number was refreshed (trunks, credentials): no quota used."""

    number: E164
    provider: Literal["twilio", "sip_trunk"]
    inbound_trunk: InboundTrunk | None = None
    outbound_trunk: OutboundTrunk | None = None
    secret_ref: str | None = None
    twilio_account_sid: str | None = None


class AccountConfigured(Event, tag="account.configured", kw_only=True):
    account_id: Token
    rate_millicredits_per_minute: NonNegative = 30_000  # ElevenLabs voice: 30 credits/min
    text_price_millicredits: NonNegative = 0  # per agent response
    daily_voice_cap_s: NonNegative | None = None
    per_call_max_s: Positive | None = None
    timezone: str = "UTC"
    # Outbound: high-risk (premium, revenue-share) destination prefixes this account may call.
    allowed_high_risk_prefixes: tuple[Prefix, ...] = ()
    pre_call_webhook: PreCallWebhook | None = None


class AccountCredited(Event, tag="account.credited", kw_only=True):
    account_id: Token
    amount_millicredits: Positive
    reference: Annotated[str, Meta(min_length=1, max_length=200)]  # idempotency key


class CallOffered(Event, tag="call.offered", kw_only=True):
    call_id: Token
    direction: Direction = "inbound"
    to: E164
    from_: Caller = field(name="from")
    source_ip: str = ""
    transport: Transport = "udp"
    srtp: bool = False
    user_agent: str = ""
    sip_headers: dict[str, str] = {}

    def __post_init__(self) -> None:
        if self.direction == "outbound" and self.from_ == "anonymous":
            raise ValueError("an outbound call must come from one of our E.164 numbers, not 'anonymous'")

    @property
    def number(self) -> str:
        """The callplane number this call belongs to: the callee inbound, the caller outbound."""
        return self.to if self.direction == "inbound" else self.from_


class CallAccepted(Event, tag="call.accepted", kw_only=True):
    call_id: Token
    number: E164
    account_id: Token
    agent_id: str
    max_duration_s: NonNegative | None = None
    hold_id: str | None = None
    ring_timeout_s: Positive = 60
    auto_answer: bool = True
    dynamic_variables: dict[str, VariableValue] = {}
    # What the pre-call webhook overrode (only allowed keys, e.g. {"agent": {"first_message": ...}}).
    conversation_config_override: dict[str, Any] = {}
    decision: Decision = Decision()
    # The account's prices when the call was admitted: the call is billed at these, so its
    # charge depends on the call's own events only (and a replay bills it the same).
    rate_millicredits_per_minute: NonNegative | None = None
    text_price_millicredits: NonNegative | None = None


class CallRejected(Event, tag="call.rejected", kw_only=True):
    call_id: Token
    number: E164
    reason: RejectReason
    sip_status: Annotated[int, Meta(ge=400, le=699)]
    decision: Decision = Decision()


class CallAnswered(Event, tag="call.answered", kw_only=True):
    call_id: Token
    number: E164


class CallMissed(Event, tag="call.missed", kw_only=True):
    call_id: Token
    number: E164


class CallAgentReplied(Event, tag="call.agent_replied", kw_only=True):
    call_id: Token
    number: E164
    model: str = ""
    responses: NonNegative = 1


class CallEnded(Event, tag="call.ended", kw_only=True):
    call_id: Token
    number: E164
    duration_ms: NonNegative  # answer to hang-up; 0 if never answered
    silent_ms: NonNegative = 0
    end_reason: EndReason = "caller_hangup"


class CallCutoff(Event, tag="call.cutoff", kw_only=True):
    call_id: Token
    number: E164
    reason: CutoffReason


class CallTransferred(Event, tag="call.transferred", kw_only=True):
    call_id: Token
    number: E164
    destination: str
    transfer_type: Literal["conference", "sip_refer"] = "sip_refer"


class LedgerEvent(Event, kw_only=True):
    account_id: Token
    amount_millicredits: NonNegative
    balance_millicredits: int  # the account balance after this entry


class LedgerHeld(LedgerEvent, tag="ledger.held", kw_only=True):
    call_id: Token
    hold_id: str


class LedgerCharged(LedgerEvent, tag="ledger.charged", kw_only=True):
    call_id: Token
    number: E164 | None = None
    charged_s: NonNegative = 0
    voice_millicredits: NonNegative = 0
    text_millicredits: NonNegative = 0


class LedgerReleased(LedgerEvent, tag="ledger.released", kw_only=True):
    call_id: Token
    hold_id: str


class LedgerCredited(LedgerEvent, tag="ledger.credited", kw_only=True):
    reference: str


class Tally(Model, kw_only=True):
    value: str  # a source IP, a caller prefix, a user agent ...
    count: NonNegative


class AlertEvidence(Model, kw_only=True):
    """What an operator needs to judge an alert without opening the stream."""

    first_call_id: str = ""
    last_call_id: str = ""
    top_source_ips: tuple[Tally, ...] = ()
    top_caller_prefixes: tuple[Tally, ...] = ()
    source_ip: str = ""  # scanner_sweep: the scanning address
    user_agent: str = ""  # scanner_sweep: a known scanner's user agent
    distinct_numbers: NonNegative = 0  # scanner_sweep / account_spike: numbers touched
    destination_prefix: str = ""  # irsf_destination: the high-risk range called
    baseline_per_minute: float | None = None  # baseline_jump: the EWMA before the jump
    z_score: float | None = None  # baseline_jump


class FraudAlert(Event, tag="fraud.alert", kw_only=True):
    """One alert per episode of a fraud detector, named by `rule`: call_spike (offers to a
    number), scanner_sweep (one source IP, many numbers or a scanner's user agent),
    account_spike (offers across an account), irsf_destination (outbound to high-risk
    ranges) or baseline_jump (a minute far above the number's own baseline). No new alert
    for the same rule and key until its episode has ended (SPEC sections 2 and 4)."""

    number: E164  # the number of the call that crossed the threshold
    account_id: Token | None = None
    rule: str  # call_spike | scanner_sweep | account_spike | irsf_destination | baseline_jump
    count: NonNegative
    threshold: NonNegative
    window_s: Positive
    first_at: Timestamp
    last_at: Timestamp
    summary: str = ""  # one line for a human, e.g. "12 calls to +48... within 5 min (threshold 10)"
    evidence: AlertEvidence = AlertEvidence()


AnyEvent = Union[
    NumberRegistered,
    NumberAssigned,
    NumberPolicySet,
    NumberUnregistered,
    NumberLabelSet,
    NumberSynced,
    AccountConfigured,
    AccountCredited,
    CallOffered,
    CallAccepted,
    CallRejected,
    CallAnswered,
    CallMissed,
    CallAgentReplied,
    CallEnded,
    CallCutoff,
    CallTransferred,
    LedgerHeld,
    LedgerCharged,
    LedgerReleased,
    LedgerCredited,
    FraudAlert,
]

EVENT_TYPES: tuple[type[Event], ...] = AnyEvent.__args__  # type: ignore[attr-defined]


def tag_of(cls: type[Event]) -> str:
    """The `type` tag of an event class, e.g. 'call.offered'."""
    return cls.__struct_config__.tag  # type: ignore[return-value]


TYPES_BY_TAG: dict[str, type[Event]] = {tag_of(cls): cls for cls in EVENT_TYPES}
