"""The phone-number registry and accounts, as pure functions: `decide` turns a command
into events or a refusal; `evolve` folds events into the registry. Ids and `now` are
passed in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from schemas import (
    AccountConfigured,
    AccountCredited,
    AnyEvent,
    Event,
    NumberAssigned,
    NumberPolicySet,
    NumberRegistered,
    NumberUnregistered,
    timestamp,
)
from schemas.commands import (
    AnyCommand,
    AssignAgent,
    ConfigureAccount,
    CreditAccount,
    RegisterNumber,
    SetPolicy,
    UnregisterNumber,
)

DEFAULT_SIP_DOMAIN = "sip.callplane.dev"


@dataclass(frozen=True)
class Refusal:
    code: str  # conflict | not_found | invalid | quota_exceeded
    message: str
    field: str | None = None


@dataclass
class NumberRecord:
    account_id: str
    number_id: str
    agent_id: str | None = None
    policy_version: int = 0


@dataclass
class Registry:
    numbers: dict[str, NumberRecord] = field(default_factory=dict)
    accounts: set[str] = field(default_factory=set)
    credit_references: set[tuple[str, str]] = field(default_factory=set)


def sip_uri(number: str, domain: str = DEFAULT_SIP_DOMAIN) -> str:
    return f"{number}@{domain}:5060;transport=tcp"


def evolve(registry: Registry, event: AnyEvent) -> Registry:
    match event:
        case NumberRegistered(number=n, account_id=a, number_id=i):
            registry.numbers.setdefault(n, NumberRecord(account_id=a, number_id=i))
        case NumberAssigned(number=n, agent_id=agent) if n in registry.numbers:
            registry.numbers[n].agent_id = agent
        case NumberPolicySet(number=n, policy_version=v) if n in registry.numbers:
            registry.numbers[n].policy_version = v
        case NumberUnregistered(number=n):
            registry.numbers.pop(n, None)
        case AccountConfigured(account_id=a):
            registry.accounts.add(a)
        case AccountCredited(account_id=a, reference=r):
            registry.credit_references.add((a, r))
    return registry


def decide(
    registry: Registry,
    command: AnyCommand,
    *,
    now: datetime,
    new_id: Callable[[str], str],
    sip_domain: str = DEFAULT_SIP_DOMAIN,
) -> list[Event] | Refusal:
    """`new_id(prefix)` makes a fresh unique id, e.g. new_id('pn') -> 'pn_3f9a...'."""
    stamp = {"event_id": new_id("ev"), "occurred_at": timestamp(now)}
    match command:
        case RegisterNumber():
            if command.number in registry.numbers:
                return Refusal("conflict", f"{command.number} is already registered", "number")
            return [
                NumberRegistered(
                    **stamp,
                    number=command.number,
                    number_id=new_id("pn"),
                    account_id=command.account_id,
                    provider=command.provider,
                    label=command.label,
                    sip_uri=sip_uri(command.number, sip_domain),
                )
            ]
        case AssignAgent() | SetPolicy() | UnregisterNumber() if command.number not in registry.numbers:
            return Refusal("not_found", f"{command.number} is not registered", "number")
        case AssignAgent():
            return [NumberAssigned(**stamp, number=command.number, agent_id=command.agent_id)]
        case SetPolicy():
            version = registry.numbers[command.number].policy_version + 1
            return [NumberPolicySet(**stamp, number=command.number, policy=command.policy, policy_version=version)]
        case UnregisterNumber():
            return [NumberUnregistered(**stamp, number=command.number)]
        case ConfigureAccount():
            fields = {f: getattr(command, f) for f in command.__struct_fields__}
            return [AccountConfigured(**stamp, **fields)]
        case CreditAccount():
            if (command.account_id, command.reference) in registry.credit_references:
                return []  # the same reference twice credits once
            return [
                AccountCredited(
                    **stamp,
                    account_id=command.account_id,
                    amount_millicredits=command.amount_millicredits,
                    reference=command.reference,
                )
            ]
    return Refusal("invalid", f"the provisioner does not handle {type(command).__name__}")
