"""The phone-number registry and accounts, as pure functions.

`decide(registry, command, ...)` validates a command and turns it into events (or a
`Refusal` with a stable code, the field at fault and the rule broken); `evolve` folds
events into the registry, the read model every query is answered from. Ids, `now`
and the references of secrets sealed by the adapter are passed in.

Each number is an aggregate whose version is the stream sequence of its last event:
`Accepted.expected_version` tells the adapter which version the events were decided
against, so a concurrent writer is caught (optimistic concurrency), never overwritten.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from msgspec import UNSET

from schemas import (
    AccountConfigured,
    AccountCredited,
    AnyEvent,
    Event,
    InboundTrunk,
    NumberAssigned,
    NumberLabelSet,
    NumberPolicySet,
    NumberRegistered,
    NumberSynced,
    NumberUnregistered,
    OutboundTrunk,
    PreCallWebhook,
    SecurityPolicy,
    timestamp,
)
from schemas.commands import (
    AccountView,
    AnyCommand,
    AssignAgent,
    ConfigureAccount,
    CreditAccount,
    InboundTrunkConfig,
    InboundTrunkView,
    NumberView,
    OutboundTrunkConfig,
    OutboundTrunkView,
    PreCallWebhookView,
    RegisterNumber,
    SetPolicy,
    SyncNumber,
    TwilioView,
    UnregisterNumber,
    UpdateNumber,
)

from . import validation
from .validation import Invalid

DEFAULT_SIP_DOMAIN = "sip.callplane.dev"
SIP_URI_TEMPLATE = "<your-number>@{domain}:5060;transport=tcp"

# Where a sealed secret of a command goes; the adapter seals and stores each, passing refs in.
SECRET_SLOTS = ("twilio", "outbound_trunk", "inbound_trunk", "pre_call_webhook")


@dataclass(frozen=True)
class Rules:
    sip_domain: str = DEFAULT_SIP_DOMAIN
    max_numbers_per_account: int = 100


@dataclass(frozen=True)
class Refusal:
    code: str  # invalid | conflict | not_found | quota_exceeded
    message: str
    field: str | None = None
    rule: str | None = None


@dataclass(frozen=True)
class Accepted:
    events: list[Event]
    number: str | None = None  # the number aggregate written, if any
    expected_version: int | None = None  # its version the events were decided against


@dataclass
class NumberRecord:
    registered: NumberRegistered
    agent_id: str | None = None
    assignment_type: str | None = None
    label: str = ""
    policy: SecurityPolicy = field(default_factory=SecurityPolicy)
    policy_version: int = 0
    inbound_trunk: InboundTrunk | None = None
    outbound_trunk: OutboundTrunk | None = None
    secret_ref: str | None = None
    twilio_account_sid: str | None = None
    version: int = 0  # stream sequence of the last event applied


@dataclass
class AccountRecord:
    configured: AccountConfigured | None = None
    credit_references: set[str] = field(default_factory=set)
    credited_millicredits: int = 0


@dataclass
class Registry:
    numbers: dict[str, NumberRecord] = field(default_factory=dict)  # by E.164
    ids: dict[str, str] = field(default_factory=dict)  # number_id -> E.164
    accounts: dict[str, AccountRecord] = field(default_factory=dict)
    secret_hints: dict[str, str] = field(default_factory=dict)  # secret_ref -> masked hint
    retired: dict[str, int] = field(default_factory=dict)  # unregistered number -> its last version

    def numbers_of(self, account_id: str) -> int:
        return sum(1 for r in self.numbers.values() if r.registered.account_id == account_id)

    def account(self, account_id: str) -> AccountRecord:
        return self.accounts.setdefault(account_id, AccountRecord())


def sip_uri(number: str, domain: str = DEFAULT_SIP_DOMAIN) -> str:
    return f"{number}@{domain}:5060;transport=tcp"


def credit_event_id(account_id: str, reference: str) -> str:
    """A top-up's event id is a function of its reference: JetStream and the meter both
    drop a repeat, even from another provisioner instance or after the dedup window."""
    digest = hashlib.sha256(f"{account_id}\x00{reference}".encode()).hexdigest()[:32]
    return f"credit_{digest}"


# -- evolve -------------------------------------------------------------------------


def evolve(registry: Registry, event: AnyEvent, *, sequence: int = 0) -> Registry:
    """Fold one event in. Idempotent: an event at or below a number's version is skipped."""
    number = getattr(event, "number", None)
    record = registry.numbers.get(number) if number else None
    known = record.version if record is not None else registry.retired.get(number or "", 0)
    if sequence and sequence <= known:
        return registry  # folded already (the adapter folds its own writes before the projection)
    match event:
        case NumberRegistered():
            if record is None:
                record = registry.numbers[event.number] = NumberRecord(
                    registered=event,
                    label=event.label,
                    inbound_trunk=event.inbound_trunk,
                    outbound_trunk=event.outbound_trunk,
                    secret_ref=event.secret_ref,
                    twilio_account_sid=event.twilio_account_sid,
                )
                registry.ids[event.number_id] = event.number
        case NumberAssigned() if record:
            record.agent_id, record.assignment_type = event.agent_id, event.assignment_type if event.agent_id else None
        case NumberLabelSet() if record:
            record.label = event.label
        case NumberPolicySet() if record:
            record.policy, record.policy_version = event.policy, event.policy_version
        case NumberSynced() if record:
            record.inbound_trunk, record.outbound_trunk = event.inbound_trunk, event.outbound_trunk
            record.secret_ref, record.twilio_account_sid = event.secret_ref, event.twilio_account_sid
        case NumberUnregistered() if record:
            del registry.numbers[event.number]
            registry.ids.pop(record.registered.number_id, None)
            registry.retired[event.number] = sequence or record.version
            record = None
        case AccountConfigured():
            registry.account(event.account_id).configured = event
        case AccountCredited():
            account = registry.account(event.account_id)
            if event.reference not in account.credit_references:
                account.credit_references.add(event.reference)
                account.credited_millicredits += event.amount_millicredits
    if record is not None and sequence:
        record.version = sequence
    return registry


# -- decide -------------------------------------------------------------------------


def decide(
    registry: Registry,
    command: AnyCommand,
    *,
    now: datetime,
    new_id: Callable[[str], str],
    rules: Rules = Rules(),
    secret_refs: dict[str, str] | None = None,
) -> Accepted | Refusal:
    """`new_id(prefix)` makes a fresh unique id; `secret_refs` maps a SECRET_SLOTS name to
    the reference under which the adapter will store that secret of the command."""
    try:
        return _decide(registry, command, now=now, new_id=new_id, rules=rules, refs=secret_refs or {})
    except Invalid as exc:
        return Refusal("invalid", str(exc), exc.field, exc.rule)


def _decide(registry, command, *, now, new_id, rules, refs) -> Accepted | Refusal:  # noqa: ANN001, C901
    def stamp() -> dict[str, str]:
        return {"event_id": new_id("ev"), "occurred_at": timestamp(now)}

    match command:
        case RegisterNumber():
            number = validation.e164(command.number)
            if number in registry.numbers:
                return Refusal("conflict", f"{number} is already registered", "number", "unique")
            if registry.numbers_of(command.account_id) >= rules.max_numbers_per_account:
                return Refusal(
                    "quota_exceeded",
                    f"account {command.account_id} has its {rules.max_numbers_per_account} numbers",
                    "account_id",
                    "quota",
                )
            inbound, outbound, secret_ref = _provider_config(command, refs)
            event = NumberRegistered(
                twilio_account_sid=command.twilio.account_sid if command.twilio else None,
                **stamp(),
                number=number,
                number_id=new_id("pn"),
                account_id=command.account_id,
                provider=command.provider,
                label=validation.label(command.label),
                sip_uri=sip_uri(number, rules.sip_domain),
                inbound_trunk=inbound,
                outbound_trunk=outbound,
                secret_ref=secret_ref,
            )
            return Accepted([event], number, _version(registry, number))
        case ConfigureAccount():
            validation.timezone(command.timezone, "timezone")
            fields = {name: getattr(command, name) for name in command.__struct_fields__}
            fields["allowed_high_risk_prefixes"] = tuple(
                validation.prefix(p, f"allowed_high_risk_prefixes[{i}]")
                for i, p in enumerate(command.allowed_high_risk_prefixes)
            )
            if (hook := command.pre_call_webhook) is not None:
                validation.webhook_secret(hook.secret, "pre_call_webhook.secret")
                if not 1 <= hook.timeout_ms <= 30_000:
                    raise Invalid("pre_call_webhook.timeout_ms", "range", "must be 1 to 30000")
                fields["pre_call_webhook"] = PreCallWebhook(
                    url=validation.url(hook.url, "pre_call_webhook.url"),
                    secret_ref=refs.get("pre_call_webhook"),
                    timeout_ms=hook.timeout_ms,
                    fail_closed=hook.fail_closed,
                    allow_private=hook.allow_private,
                )
            return Accepted([AccountConfigured(**stamp(), **fields)])
        case CreditAccount():
            if command.reference in registry.account(command.account_id).credit_references:
                return Accepted([])  # the same reference twice credits once
            return Accepted(
                [
                    AccountCredited(
                        event_id=credit_event_id(command.account_id, command.reference),
                        occurred_at=timestamp(now),
                        account_id=command.account_id,
                        amount_millicredits=command.amount_millicredits,
                        reference=command.reference,
                    )
                ]
            )

    if not hasattr(command, "number"):
        return Refusal("invalid", f"the provisioner does not handle {type(command).__name__}", "command", "known_command")
    number = validation.e164(command.number)
    record = registry.numbers.get(number)
    if record is None:
        return Refusal("not_found", f"{number} is not registered", "number", "registered")
    version = record.version
    match command:
        case UpdateNumber() | AssignAgent():
            events: list[Event] = []
            label = getattr(command, "label", None)
            if isinstance(label, str) and validation.label(label) != record.label:
                events.append(NumberLabelSet(**stamp(), number=number, label=validation.label(label)))
            agent_id = record.agent_id if command.agent_id is UNSET else command.agent_id
            kind = command.assignment_type
            if kind is UNSET:
                kind = (record.assignment_type if agent_id == record.agent_id else None) or "agent"
            kind = kind if agent_id is not None else None
            if (agent_id, kind) != (record.agent_id, record.assignment_type):
                events.append(NumberAssigned(**stamp(), number=number, agent_id=agent_id, assignment_type=kind))
            return Accepted(events, number, version)
        case SetPolicy():
            if command.expected_policy_version not in (None, record.policy_version):
                return Refusal(
                    "conflict",
                    f"the policy is at version {record.policy_version}, not {command.expected_policy_version}: "
                    "read it again and reapply your change",
                    "expected_policy_version",
                    "stale",
                )
            policy = validation.policy(command.policy)
            event = NumberPolicySet(**stamp(), number=number, policy=policy, policy_version=record.policy_version + 1)
            return Accepted([event], number, version)
        case SyncNumber():
            provider = record.registered.provider
            inbound, outbound, secret_ref = _provider_config(command, refs, provider=provider)
            event = NumberSynced(
                **stamp(),
                number=number,
                provider=provider,
                inbound_trunk=inbound or record.inbound_trunk,
                outbound_trunk=outbound or record.outbound_trunk,
                secret_ref=secret_ref or record.secret_ref,
                twilio_account_sid=command.twilio.account_sid if command.twilio else record.twilio_account_sid,
            )
            return Accepted([event], number, version)
        case UnregisterNumber():
            if record.agent_id is not None and not command.force:
                return Refusal(
                    "conflict",
                    f"{number} is assigned to {record.agent_id}: unassign it first, or force the deletion",
                    "number",
                    "assigned",
                )
            return Accepted([NumberUnregistered(**stamp(), number=number)], number, version)
    return Refusal("invalid", f"the provisioner does not handle {type(command).__name__}", "command", "known_command")


def _version(registry: Registry, number: str) -> int:
    """A number never registered has version 0; an unregistered one keeps its last."""
    record = registry.numbers.get(number)
    return record.version if record else registry.retired.get(number, 0)


def _provider_config(
    command: RegisterNumber | SyncNumber, refs: dict[str, str], provider: str | None = None
) -> tuple[InboundTrunk | None, OutboundTrunk | None, str | None]:
    """Validate the provider part of a command; secrets become references."""
    provider = provider or command.provider
    secret_ref = None
    if provider == "twilio":
        if command.twilio is None and isinstance(command, RegisterNumber):
            raise Invalid("twilio", "required", "a Twilio number needs twilio.account_sid and twilio.auth_token")
        if command.twilio is not None:
            validation.twilio_account_sid(command.twilio.account_sid, "twilio.account_sid")
            validation.secret_text(command.twilio.auth_token, "twilio.auth_token")
            secret_ref = refs.get("twilio")
    elif command.twilio is not None:
        raise Invalid("twilio", "provider", "twilio credentials go with provider 'twilio'")
    outbound = _outbound(command.outbound_trunk, refs.get("outbound_trunk"))
    inbound = _inbound(command.inbound_trunk, refs.get("inbound_trunk"))
    return inbound, outbound, secret_ref


def _outbound(config: OutboundTrunkConfig | None, ref: str | None) -> OutboundTrunk | None:
    if config is None:
        return None
    if config.credentials:
        validation.secret_text(config.credentials.password, "outbound_trunk.credentials.password")
    trunk = OutboundTrunk(
        address=config.address,
        transport=config.transport,
        media_encryption=config.media_encryption,
        headers=config.headers,
        username=config.credentials.username if config.credentials else None,
        secret_ref=ref if config.credentials else None,
    )
    return validation.outbound_trunk(trunk)


def _inbound(config: InboundTrunkConfig | None, ref: str | None) -> InboundTrunk | None:
    if config is None:
        return None
    if config.credentials:
        validation.secret_text(config.credentials.password, "inbound_trunk.credentials.password")
    trunk = InboundTrunk(
        allowed_addresses=config.allowed_addresses,
        allowed_numbers=config.allowed_numbers,
        remote_domains=config.remote_domains,
        username=config.credentials.username if config.credentials else None,
        secret_ref=ref if config.credentials else None,
    )
    return validation.inbound_trunk(trunk)


def secrets_of(command: AnyCommand) -> dict[str, str]:
    """The plaintext secrets a command carries, by SECRET_SLOTS name (for the adapter to seal)."""
    found: dict[str, str] = {}
    if (twilio := getattr(command, "twilio", None)) is not None:
        found["twilio"] = twilio.auth_token
    for slot in ("outbound_trunk", "inbound_trunk"):
        trunk = getattr(command, slot, None)
        if trunk is not None and trunk.credentials is not None:
            found[slot] = trunk.credentials.password
    if (hook := getattr(command, "pre_call_webhook", None)) is not None:
        found["pre_call_webhook"] = hook.secret
    return found


# -- views --------------------------------------------------------------------------


def view_number(registry: Registry, record: NumberRecord) -> NumberView:
    hint = registry.secret_hints.get
    registered = record.registered
    out, inn = record.outbound_trunk, record.inbound_trunk
    return NumberView(
        phone_number_id=registered.number_id,
        phone_number=registered.number,
        account_id=registered.account_id,
        provider=registered.provider,
        label=record.label,
        sip_uri=registered.sip_uri,
        agent_id=record.agent_id,
        assignment_type=record.assignment_type,  # type: ignore[arg-type]
        policy=record.policy,
        policy_version=record.policy_version,
        twilio=TwilioView(account_sid=registered.twilio_account_sid or "", auth_token_hint=hint(record.secret_ref or ""))
        if registered.provider == "twilio"
        else None,
        outbound_trunk=OutboundTrunkView(
            address=out.address,
            transport=out.transport,
            media_encryption=out.media_encryption,
            headers=out.headers,
            username=out.username,
            password_hint=hint(out.secret_ref or ""),
        )
        if out
        else None,
        inbound_trunk=InboundTrunkView(
            allowed_addresses=inn.allowed_addresses,
            allowed_numbers=inn.allowed_numbers,
            remote_domains=inn.remote_domains,
            username=inn.username,
            password_hint=hint(inn.secret_ref or ""),
        )
        if inn
        else None,
        version=record.version,
    )


def view_account(registry: Registry, account_id: str) -> AccountView | None:
    account = registry.accounts.get(account_id)
    if account is None or account.configured is None:
        return None
    c = account.configured
    return AccountView(
        account_id=account_id,
        rate_millicredits_per_minute=c.rate_millicredits_per_minute,
        text_price_millicredits=c.text_price_millicredits,
        daily_voice_cap_s=c.daily_voice_cap_s,
        per_call_max_s=c.per_call_max_s,
        timezone=c.timezone,
        allowed_high_risk_prefixes=c.allowed_high_risk_prefixes,
        pre_call_webhook=PreCallWebhookView(
            url=c.pre_call_webhook.url,
            secret_hint=registry.secret_hints.get(c.pre_call_webhook.secret_ref or ""),
            timeout_ms=c.pre_call_webhook.timeout_ms,
            fail_closed=c.pre_call_webhook.fail_closed,
            allow_private=c.pre_call_webhook.allow_private,
        )
        if c.pre_call_webhook
        else None,
        numbers=registry.numbers_of(account_id),
        credited_millicredits=account.credited_millicredits,
    )
