"""The number registry as pure functions: commands to events or refusals, folded back."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import pytest

from schemas import (
    AccountConfigured,
    AccountCredited,
    Hours,
    NumberAssigned,
    NumberPolicySet,
    NumberRegistered,
    NumberUnregistered,
    SecurityPolicy,
)
from schemas.commands import (
    AssignAgent,
    ConfigureAccount,
    CreditAccount,
    PlaceCall,
    RegisterNumber,
    SetPolicy,
    UnregisterNumber,
)
from services.provisioner.core import DEFAULT_SIP_DOMAIN, Refusal, Registry, decide, evolve, sip_uri

NUMBER = "+48123456789"
ACCOUNT = "acct_1"
NOW = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)


def id_maker():
    counter = itertools.count(1)
    return lambda prefix: f"{prefix}_{next(counter)}"


class Provisioner:
    """decide + evolve with a fixed clock and counting ids, like the adapter without NATS."""

    def __init__(self) -> None:
        self.registry = Registry()
        self.new_id = id_maker()

    def run(self, command, **kwargs):
        outcome = decide(self.registry, command, now=NOW, new_id=self.new_id, **kwargs)
        if not isinstance(outcome, Refusal):
            for event in outcome:
                evolve(self.registry, event)
        return outcome


def registered_provisioner(*, agent: str | None = None) -> Provisioner:
    p = Provisioner()
    p.run(RegisterNumber(number=NUMBER, account_id=ACCOUNT))
    if agent:
        p.run(AssignAgent(number=NUMBER, agent_id=agent))
    return p


def test_register_number_produces_one_registered_event_with_ids_from_new_id():
    outcome = Provisioner().run(RegisterNumber(number=NUMBER, account_id=ACCOUNT, provider="twilio", label="support"))
    assert outcome == [
        NumberRegistered(
            event_id="ev_1",
            occurred_at="2026-05-04T12:00:00.000Z",
            number=NUMBER,
            number_id="pn_2",
            account_id=ACCOUNT,
            provider="twilio",
            label="support",
            sip_uri=f"{NUMBER}@{DEFAULT_SIP_DOMAIN}:5060;transport=tcp",
        )
    ]


def test_registering_a_number_twice_is_a_conflict_on_the_number_field():
    p = Provisioner()
    assert isinstance(p.run(RegisterNumber(number=NUMBER, account_id=ACCOUNT)), list)
    again = p.run(RegisterNumber(number=NUMBER, account_id="acct_2"))
    assert isinstance(again, Refusal)
    assert (again.code, again.field) == ("conflict", "number")
    assert NUMBER in again.message


def test_a_number_can_be_registered_again_after_it_was_unregistered():
    p = registered_provisioner()
    p.run(UnregisterNumber(number=NUMBER))
    outcome = p.run(RegisterNumber(number=NUMBER, account_id="acct_2"))
    assert [type(e) for e in outcome] == [NumberRegistered]
    assert p.registry.numbers[NUMBER].account_id == "acct_2"


@pytest.mark.parametrize(
    "command",
    [
        AssignAgent(number=NUMBER, agent_id="agent_1"),
        SetPolicy(number=NUMBER, policy=SecurityPolicy()),
        UnregisterNumber(number=NUMBER),
    ],
    ids=["assign", "set_policy", "unregister"],
)
def test_commands_on_an_unknown_number_are_not_found(command):
    outcome = Provisioner().run(command)
    assert isinstance(outcome, Refusal)
    assert (outcome.code, outcome.field) == ("not_found", "number")


@pytest.mark.parametrize(
    ("command", "event_type"),
    [
        (AssignAgent(number=NUMBER, agent_id="agent_1"), NumberAssigned),
        (AssignAgent(number=NUMBER, agent_id=None), NumberAssigned),
        (SetPolicy(number=NUMBER, policy=SecurityPolicy(max_concurrent_calls=2)), NumberPolicySet),
        (UnregisterNumber(number=NUMBER), NumberUnregistered),
    ],
    ids=["assign", "unassign", "set_policy", "unregister"],
)
def test_commands_on_a_registered_number_produce_one_event_for_it(command, event_type):
    outcome = registered_provisioner().run(command)
    assert [type(e) for e in outcome] == [event_type]
    assert outcome[0].number == NUMBER


def test_commands_on_an_unregistered_number_are_not_found():
    p = registered_provisioner()
    p.run(UnregisterNumber(number=NUMBER))
    outcome = p.run(AssignAgent(number=NUMBER, agent_id="agent_1"))
    assert isinstance(outcome, Refusal) and outcome.code == "not_found"


def test_assignment_is_folded_into_the_registry():
    p = registered_provisioner(agent="agent_1")
    assert p.registry.numbers[NUMBER].agent_id == "agent_1"
    p.run(AssignAgent(number=NUMBER, agent_id=None))
    assert p.registry.numbers[NUMBER].agent_id is None


def test_policy_version_increments_across_set_policy_commands():
    p = registered_provisioner()
    policies = [
        SecurityPolicy(max_concurrent_calls=1),
        SecurityPolicy(allowed_prefixes=("+48",)),
        SecurityPolicy(),
    ]
    events = [p.run(SetPolicy(number=NUMBER, policy=policy))[0] for policy in policies]
    assert [e.policy_version for e in events] == [1, 2, 3]
    assert [e.policy for e in events] == policies


def test_policy_version_starts_again_for_a_number_registered_again():
    p = registered_provisioner()
    p.run(SetPolicy(number=NUMBER, policy=SecurityPolicy()))
    p.run(SetPolicy(number=NUMBER, policy=SecurityPolicy()))
    p.run(UnregisterNumber(number=NUMBER))
    p.run(RegisterNumber(number=NUMBER, account_id=ACCOUNT))
    assert p.run(SetPolicy(number=NUMBER, policy=SecurityPolicy()))[0].policy_version == 1


def test_replaying_the_events_rebuilds_the_same_registry():
    p = Provisioner()
    log = []
    for command in [
        RegisterNumber(number=NUMBER, account_id=ACCOUNT),
        AssignAgent(number=NUMBER, agent_id="agent_1"),
        SetPolicy(number=NUMBER, policy=SecurityPolicy()),
        SetPolicy(number=NUMBER, policy=SecurityPolicy()),
        ConfigureAccount(account_id=ACCOUNT),
        CreditAccount(account_id=ACCOUNT, amount_millicredits=5_000, reference="inv-1"),
    ]:
        log += p.run(command)
    replayed = Registry()
    for event in log:
        evolve(replayed, event)
    assert replayed == p.registry
    assert replayed.numbers[NUMBER].policy_version == 2


def test_the_same_credit_reference_twice_credits_once():
    p = Provisioner()
    credit = CreditAccount(account_id=ACCOUNT, amount_millicredits=10_000, reference="stripe-pi-1")
    first = p.run(credit)
    assert [(type(e), e.amount_millicredits, e.reference) for e in first] == [(AccountCredited, 10_000, "stripe-pi-1")]
    assert p.run(credit) == []
    assert p.run(CreditAccount(account_id=ACCOUNT, amount_millicredits=1, reference="stripe-pi-1")) == []


@pytest.mark.parametrize(
    "second",
    [
        CreditAccount(account_id=ACCOUNT, amount_millicredits=10_000, reference="stripe-pi-2"),
        CreditAccount(account_id="acct_2", amount_millicredits=10_000, reference="stripe-pi-1"),
    ],
    ids=["another reference", "same reference, another account"],
)
def test_a_different_credit_reference_or_account_credits_again(second):
    p = Provisioner()
    p.run(CreditAccount(account_id=ACCOUNT, amount_millicredits=10_000, reference="stripe-pi-1"))
    assert [type(e) for e in p.run(second)] == [AccountCredited]


def test_configure_account_carries_every_setting():
    command = ConfigureAccount(
        account_id=ACCOUNT,
        rate_millicredits_per_minute=25_000,
        text_price_millicredits=400,
        daily_voice_cap_s=3_600,
        per_call_max_s=600,
        timezone="Europe/Warsaw",
    )
    [event] = Provisioner().run(command)
    assert isinstance(event, AccountConfigured)
    assert (
        event.account_id,
        event.rate_millicredits_per_minute,
        event.text_price_millicredits,
        event.daily_voice_cap_s,
        event.per_call_max_s,
        event.timezone,
    ) == (ACCOUNT, 25_000, 400, 3_600, 600, "Europe/Warsaw")


def test_a_command_the_provisioner_does_not_handle_is_invalid():
    outcome = Provisioner().run(PlaceCall(from_number=NUMBER, to="+14155550100"))
    assert isinstance(outcome, Refusal) and outcome.code == "invalid"


@pytest.mark.parametrize(
    ("number", "domain", "expected"),
    [
        (NUMBER, DEFAULT_SIP_DOMAIN, "+48123456789@sip.callplane.dev:5060;transport=tcp"),
        ("+14155550100", "sip.example.com", "+14155550100@sip.example.com:5060;transport=tcp"),
    ],
)
def test_sip_uri_format(number, domain, expected):
    assert sip_uri(number, domain) == expected


def test_registered_number_uses_the_configured_sip_domain():
    [event] = Provisioner().run(RegisterNumber(number=NUMBER, account_id=ACCOUNT), sip_domain="sip.example.com")
    assert event.sip_uri == "+48123456789@sip.example.com:5060;transport=tcp"


# -- bugs / SPEC gaps found -------------------------------------------------------------


@pytest.mark.xfail(
    strict=True,
    reason="SPEC section 3: deleting an assigned number is refused (409) unless forced; decide "
    "unregisters an assigned number unconditionally (and UnregisterNumber has no `force` field)",
)
def test_unregistering_an_assigned_number_is_a_conflict():
    outcome = registered_provisioner(agent="agent_1").run(UnregisterNumber(number=NUMBER))
    assert isinstance(outcome, Refusal) and outcome.code == "conflict"


@pytest.mark.xfail(
    strict=True,
    reason="SetPolicy is accepted without validating allowed_cidrs or hours.timezone; the "
    "gatekeeper then raises (ValueError / ZoneInfoNotFoundError) on every offer to that number "
    "instead of deciding",
)
@pytest.mark.parametrize(
    "policy",
    [
        SecurityPolicy(allowed_cidrs=("10.0.0.0/33",)),
        SecurityPolicy(allowed_cidrs=("office",)),
        SecurityPolicy(hours=Hours(start="09:00", end="17:00", timezone="Europe/Atlantis")),
    ],
    ids=["prefix length 33", "not a cidr", "unknown timezone"],
)
def test_a_policy_the_gatekeeper_cannot_evaluate_is_refused_as_invalid(policy):
    outcome = registered_provisioner().run(SetPolicy(number=NUMBER, policy=policy))
    assert isinstance(outcome, Refusal) and outcome.code == "invalid"
