"""The number registry as pure functions: commands to events or refusals, folded back."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas import (
    AccountConfigured,
    AccountCredited,
    Event,
    Hours,
    NumberAssigned,
    NumberLabelSet,
    NumberPolicySet,
    NumberRegistered,
    NumberSynced,
    NumberUnregistered,
    SecurityPolicy,
    timestamp,
)
from schemas.commands import (
    AssignAgent,
    ConfigureAccount,
    CreditAccount,
    InboundTrunkConfig,
    OutboundTrunkConfig,
    PlaceCall,
    RegisterNumber,
    SetPolicy,
    SipCredentials,
    SyncNumber,
    TwilioCredentials,
    UnregisterNumber,
    UpdateNumber,
)
from services.provisioner.core import (
    DEFAULT_SIP_DOMAIN,
    Accepted,
    Refusal,
    Registry,
    Rules,
    credit_event_id,
    decide,
    evolve,
    secrets_of,
    sip_uri,
    view_account,
    view_number,
)

NUMBER = "+48123456789"
OTHER = "+48987654321"
ACCOUNT = "acct_1"
NOW = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)
SID = "AC" + "0123456789abcdef" * 2
TOKEN = "canary-twilio-token-7d1f3e9a"
PASSWORD = "canary-trunk-password-5b2c8e"


def id_maker():
    counter = itertools.count(1)
    return lambda prefix: f"{prefix}_{next(counter)}"


class Provisioner:
    """decide + evolve with a fixed clock, counting ids and stream sequences: the adapter
    without NATS. Every accepted event gets the next sequence, as if in one stream."""

    def __init__(self, rules: Rules = Rules()) -> None:
        self.registry = Registry()
        self.rules = rules
        self.new_id = id_maker()
        self.log: list[tuple[int, Event]] = []

    def run(self, command, secret_refs=None):
        outcome = decide(self.registry, command, now=NOW, new_id=self.new_id, rules=self.rules, secret_refs=secret_refs)
        if isinstance(outcome, Accepted):
            for event in outcome.events:
                self.log.append((len(self.log) + 1, event))
                evolve(self.registry, event, sequence=len(self.log))
        return outcome


def events(outcome) -> list[Event]:
    assert isinstance(outcome, Accepted), outcome
    return outcome.events


def refused(outcome) -> tuple[str, str | None, str | None]:
    assert isinstance(outcome, Refusal), outcome
    return outcome.code, outcome.field, outcome.rule


def registered_provisioner(*, agent: str | None = None, label: str = "", rules: Rules = Rules()) -> Provisioner:
    p = Provisioner(rules)
    events(p.run(RegisterNumber(number=NUMBER, account_id=ACCOUNT, label=label)))
    if agent:
        events(p.run(AssignAgent(number=NUMBER, agent_id=agent)))
    return p


def twilio_number(**changes) -> RegisterNumber:
    fields = {"twilio": TwilioCredentials(account_sid=SID, auth_token=TOKEN), **changes}
    return RegisterNumber(number=NUMBER, account_id=ACCOUNT, provider="twilio", **fields)


def outbound(address: str = "trunk.example.com", **changes) -> OutboundTrunkConfig:
    return OutboundTrunkConfig(address=address, **changes)


def inbound(*addresses: str, **changes) -> InboundTrunkConfig:
    return InboundTrunkConfig(allowed_addresses=addresses or ("203.0.113.0/24",), **changes)


# -- registering --------------------------------------------------------------------


def test_register_number_produces_one_registered_event_with_ids_from_new_id():
    outcome = Provisioner().run(RegisterNumber(number=NUMBER, account_id=ACCOUNT, label="support"))
    assert outcome == Accepted(
        [
            NumberRegistered(
                event_id="ev_1",
                occurred_at="2026-05-04T12:00:00.000Z",
                number=NUMBER,
                number_id="pn_2",
                account_id=ACCOUNT,
                provider="sip_trunk",
                label="support",
                sip_uri=f"{NUMBER}@{DEFAULT_SIP_DOMAIN}:5060;transport=tcp",
            )
        ],
        number=NUMBER,
        expected_version=0,
    )


def test_a_number_is_normalized_to_e164_before_it_is_registered():
    [event] = events(Provisioner().run(RegisterNumber(number="+48 123-456-789", account_id=ACCOUNT)))
    assert event.number == NUMBER


def test_registering_a_number_twice_is_a_conflict_on_the_number_field():
    p = registered_provisioner()
    again = p.run(RegisterNumber(number=NUMBER, account_id="acct_2"))
    assert refused(again) == ("conflict", "number", "unique")
    assert NUMBER in again.message


def test_a_number_can_be_registered_again_after_it_was_unregistered():
    p = registered_provisioner()
    events(p.run(UnregisterNumber(number=NUMBER)))
    assert [type(e) for e in events(p.run(RegisterNumber(number=NUMBER, account_id="acct_2")))] == [NumberRegistered]
    assert p.registry.numbers[NUMBER].registered.account_id == "acct_2"


def test_registered_number_uses_the_configured_sip_domain():
    p = Provisioner(Rules(sip_domain="sip.example.com"))
    [event] = events(p.run(RegisterNumber(number=NUMBER, account_id=ACCOUNT)))
    assert event.sip_uri == "+48123456789@sip.example.com:5060;transport=tcp"


@pytest.mark.parametrize(
    ("number", "domain", "expected"),
    [
        (NUMBER, DEFAULT_SIP_DOMAIN, "+48123456789@sip.callplane.dev:5060;transport=tcp"),
        ("+14155550100", "sip.example.com", "+14155550100@sip.example.com:5060;transport=tcp"),
    ],
)
def test_sip_uri_format(number, domain, expected):
    assert sip_uri(number, domain) == expected


@pytest.mark.parametrize(
    ("command", "field", "rule"),
    [
        (RegisterNumber(number="48123456789", account_id=ACCOUNT), "number", "e164"),
        (RegisterNumber(number=NUMBER, account_id=ACCOUNT, provider="twilio"), "twilio", "required"),
        (
            RegisterNumber(number=NUMBER, account_id=ACCOUNT, twilio=twilio_number().twilio),
            "twilio",
            "provider",
        ),
        (
            twilio_number(twilio=TwilioCredentials(account_sid="AC123", auth_token=TOKEN)),
            "twilio.account_sid",
            "twilio_sid",
        ),
        (
            twilio_number(twilio=TwilioCredentials(account_sid="AC" + SID[2:].upper(), auth_token=TOKEN)),
            "twilio.account_sid",
            "twilio_sid",
        ),
        (twilio_number(twilio=TwilioCredentials(account_sid=SID, auth_token="")), "twilio.auth_token", "secret_length"),
        (RegisterNumber(number=NUMBER, account_id=ACCOUNT, label="x" * 201), "label", "max_length"),
        (
            RegisterNumber(number=NUMBER, account_id=ACCOUNT, outbound_trunk=outbound("sip:trunk.example.com")),
            "outbound_trunk.address",
            "sip_address",
        ),
        (
            RegisterNumber(number=NUMBER, account_id=ACCOUNT, inbound_trunk=inbound("10.0.0.0/33")),
            "inbound_trunk.allowed_addresses[0]",
            "cidr",
        ),
        (
            RegisterNumber(
                number=NUMBER,
                account_id=ACCOUNT,
                outbound_trunk=outbound(credentials=SipCredentials(username="u", password="x" * 513)),
            ),
            "outbound_trunk.credentials.password",
            "secret_length",
        ),
    ],
    ids=[
        "not e164",
        "twilio without credentials",
        "twilio credentials on a sip trunk",
        "short sid",
        "uppercase sid",
        "empty token",
        "long label",
        "sip: in the trunk address",
        "bad inbound cidr",
        "long trunk password",
    ],
)
def test_an_invalid_registration_is_refused_naming_the_field_and_the_rule(command, field, rule):
    outcome = Provisioner().run(command, secret_refs={"twilio": "sec_t", "outbound_trunk": "sec_o"})
    assert refused(outcome) == ("invalid", field, rule)
    assert field in outcome.message
    assert TOKEN not in outcome.message and "x" * 100 not in outcome.message


# -- secrets become references --------------------------------------------------------


def test_a_twilio_token_becomes_a_reference_and_never_reaches_the_event():
    [event] = events(Provisioner().run(twilio_number(), secret_refs={"twilio": "sec_x"}))
    assert (event.provider, event.secret_ref, event.twilio_account_sid) == ("twilio", "sec_x", SID)
    assert TOKEN.encode() not in msgspec.json.encode(event)


@pytest.mark.parametrize("slot", ["outbound_trunk", "inbound_trunk"])
def test_a_trunk_password_becomes_a_reference_and_the_username_is_kept(slot):
    credentials = SipCredentials(username="trunk_user", password=PASSWORD)
    trunk = outbound(credentials=credentials) if slot == "outbound_trunk" else inbound(credentials=credentials)
    command = RegisterNumber(number=NUMBER, account_id=ACCOUNT, **{slot: trunk})
    [event] = events(Provisioner().run(command, secret_refs={slot: "sec_trunk"}))
    stored = getattr(event, slot)
    assert (stored.username, stored.secret_ref) == ("trunk_user", "sec_trunk")
    assert PASSWORD.encode() not in msgspec.json.encode(event)


def test_a_trunk_without_credentials_has_no_reference_even_if_one_is_offered():
    command = RegisterNumber(number=NUMBER, account_id=ACCOUNT, outbound_trunk=outbound())
    [event] = events(Provisioner().run(command, secret_refs={"outbound_trunk": "sec_unused"}))
    assert (event.outbound_trunk.username, event.outbound_trunk.secret_ref) == (None, None)


def test_secrets_of_finds_every_plaintext_by_slot():
    credentials = SipCredentials(username="u", password=PASSWORD)
    trunks = {"outbound_trunk": outbound(credentials=credentials), "inbound_trunk": inbound(credentials=credentials)}
    command = twilio_number(**trunks)
    assert secrets_of(command) == {"twilio": TOKEN, "outbound_trunk": PASSWORD, "inbound_trunk": PASSWORD}
    assert secrets_of(RegisterNumber(number=NUMBER, account_id=ACCOUNT, outbound_trunk=outbound())) == {}
    assert secrets_of(AssignAgent(number=NUMBER, agent_id="agent_1")) == {}


def test_view_number_shows_hints_of_secrets_and_never_a_plaintext():
    credentials = SipCredentials(username="trunk_user", password=PASSWORD)
    p = Provisioner()
    refs = {"twilio": "sec_t", "outbound_trunk": "sec_o", "inbound_trunk": "sec_i"}
    trunks = {"outbound_trunk": outbound(credentials=credentials), "inbound_trunk": inbound(credentials=credentials)}
    events(p.run(twilio_number(**trunks), refs))
    p.registry.secret_hints.update({"sec_t": "••••••••9e3a", "sec_o": "••••••••8e2c", "sec_i": "••••••••"})
    view = view_number(p.registry, p.registry.numbers[NUMBER])
    assert (view.twilio.account_sid, view.twilio.auth_token_hint) == (SID, "••••••••9e3a")
    assert (view.outbound_trunk.username, view.outbound_trunk.password_hint) == ("trunk_user", "••••••••8e2c")
    assert view.inbound_trunk.password_hint == "••••••••"
    shown = msgspec.json.encode(view)
    assert TOKEN.encode() not in shown and PASSWORD.encode() not in shown and b"sec_" not in shown


def test_view_number_has_no_hint_for_a_secret_whose_hint_is_unknown():
    p = Provisioner()
    events(p.run(twilio_number(), {"twilio": "sec_t"}))
    assert view_number(p.registry, p.registry.numbers[NUMBER]).twilio.auth_token_hint is None


def test_view_number_of_a_sip_trunk_number_has_no_twilio_part():
    p = registered_provisioner(label="support")
    view = view_number(p.registry, p.registry.numbers[NUMBER])
    assert (view.phone_number, view.account_id, view.label, view.twilio) == (NUMBER, ACCOUNT, "support", None)
    assert view.version == 1
    assert view.phone_number_id == p.registry.numbers[NUMBER].registered.number_id


# -- quota ----------------------------------------------------------------------------


def test_registering_beyond_the_accounts_quota_is_refused_on_the_account_field():
    p = Provisioner(Rules(max_numbers_per_account=2))
    for number in ("+48123456781", "+48123456782"):
        events(p.run(RegisterNumber(number=number, account_id=ACCOUNT)))
    outcome = p.run(RegisterNumber(number=NUMBER, account_id=ACCOUNT))
    assert refused(outcome) == ("quota_exceeded", "account_id", "quota")
    events(p.run(RegisterNumber(number=NUMBER, account_id="acct_2")))  # another account has its own quota


def test_an_unregistered_number_frees_its_place_in_the_quota():
    p = Provisioner(Rules(max_numbers_per_account=1))
    events(p.run(RegisterNumber(number=OTHER, account_id=ACCOUNT)))
    events(p.run(UnregisterNumber(number=OTHER)))
    events(p.run(RegisterNumber(number=NUMBER, account_id=ACCOUNT)))


# -- commands on one number -------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        AssignAgent(number=NUMBER, agent_id="agent_1"),
        UpdateNumber(number=NUMBER, label="x"),
        SetPolicy(number=NUMBER, policy=SecurityPolicy()),
        SyncNumber(number=NUMBER),
        UnregisterNumber(number=NUMBER),
    ],
    ids=["assign", "update", "set_policy", "sync", "unregister"],
)
def test_commands_on_an_unknown_number_are_not_found(command):
    assert refused(Provisioner().run(command)) == ("not_found", "number", "registered")


@pytest.mark.parametrize(
    ("agent", "command", "event_type"),
    [
        (None, AssignAgent(number=NUMBER, agent_id="agent_1"), NumberAssigned),
        ("agent_1", AssignAgent(number=NUMBER, agent_id=None), NumberAssigned),
        (None, SetPolicy(number=NUMBER, policy=SecurityPolicy(max_concurrent_calls=2)), NumberPolicySet),
        (None, SyncNumber(number=NUMBER), NumberSynced),
        (None, UnregisterNumber(number=NUMBER), NumberUnregistered),
    ],
    ids=["assign", "unassign", "set_policy", "sync", "unregister"],
)
def test_commands_on_a_registered_number_produce_one_event_for_it(agent, command, event_type):
    outcome = registered_provisioner(agent=agent).run(command)
    assert [type(e) for e in events(outcome)] == [event_type]
    assert outcome.events[0].number == NUMBER and outcome.number == NUMBER


def test_commands_on_an_unregistered_number_are_not_found():
    p = registered_provisioner()
    events(p.run(UnregisterNumber(number=NUMBER)))
    assert refused(p.run(AssignAgent(number=NUMBER, agent_id="agent_1")))[0] == "not_found"


def test_assignment_is_folded_into_the_registry():
    p = registered_provisioner(agent="agent_1")
    assert (p.registry.numbers[NUMBER].agent_id, p.registry.numbers[NUMBER].assignment_type) == ("agent_1", "agent")
    events(p.run(AssignAgent(number=NUMBER, agent_id=None)))
    assert (p.registry.numbers[NUMBER].agent_id, p.registry.numbers[NUMBER].assignment_type) == (None, None)


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (UpdateNumber(number=NUMBER, label="sales"), [(NumberLabelSet, "sales")]),
        (UpdateNumber(number=NUMBER, label="  sales  "), [(NumberLabelSet, "sales")]),
        (UpdateNumber(number=NUMBER, agent_id="agent_2"), [(NumberAssigned, "agent_2")]),
        (
            UpdateNumber(number=NUMBER, label="sales", agent_id="agent_2"),
            [(NumberLabelSet, "sales"), (NumberAssigned, "agent_2")],
        ),
        (UpdateNumber(number=NUMBER, agent_id=None), [(NumberAssigned, None)]),
        (UpdateNumber(number=NUMBER), []),
        (UpdateNumber(number=NUMBER, label="support", agent_id="agent_1"), []),
        (UpdateNumber(number=NUMBER, label=" support "), []),
        (AssignAgent(number=NUMBER, agent_id="agent_1"), []),
    ],
    ids=[
        "label only",
        "label trimmed",
        "agent only",
        "both",
        "agent None unassigns",
        "nothing given",
        "nothing changed",
        "same label once trimmed",
        "assign the same agent",
    ],
)
def test_update_number_produces_an_event_per_field_that_changes(command, expected):
    p = registered_provisioner(agent="agent_1", label="support")
    produced = events(p.run(command))
    assert [(type(e), e.label if isinstance(e, NumberLabelSet) else e.agent_id) for e in produced] == expected
    record = p.registry.numbers[NUMBER]
    for event_type, value in expected:
        assert (record.label if event_type is NumberLabelSet else record.agent_id) == value


def test_unassigning_clears_the_assignment_type():
    p = registered_provisioner()
    events(p.run(UpdateNumber(number=NUMBER, agent_id="phone_1", assignment_type="softphone")))
    assert p.registry.numbers[NUMBER].assignment_type == "softphone"
    [event] = events(p.run(UpdateNumber(number=NUMBER, agent_id=None, assignment_type="softphone")))
    assert (event.agent_id, event.assignment_type) == (None, None)


def test_an_invalid_label_update_is_refused():
    p = registered_provisioner()
    assert refused(p.run(UpdateNumber(number=NUMBER, label="a\nb"))) == ("invalid", "label", "printable")


@pytest.mark.parametrize(
    ("agent", "force", "expected"),
    [
        (None, False, NumberUnregistered),
        ("agent_1", False, ("conflict", "number", "assigned")),
        ("agent_1", True, NumberUnregistered),
    ],
    ids=["unassigned", "assigned", "assigned, forced"],
)
def test_unregistering_an_assigned_number_is_a_conflict_unless_forced(agent, force, expected):
    p = registered_provisioner(agent=agent)
    outcome = p.run(UnregisterNumber(number=NUMBER, force=force))
    if isinstance(expected, tuple):
        assert refused(outcome) == expected
        assert "agent_1" in outcome.message and NUMBER in p.registry.numbers
    else:
        assert [type(e) for e in events(outcome)] == [expected]
        assert NUMBER not in p.registry.numbers


# -- policy ---------------------------------------------------------------------------


def test_policy_version_increments_across_set_policy_commands():
    p = registered_provisioner()
    policies = [
        SecurityPolicy(max_concurrent_calls=1),
        SecurityPolicy(allowed_prefixes=("+48",)),
        SecurityPolicy(),
    ]
    produced = [events(p.run(SetPolicy(number=NUMBER, policy=policy)))[0] for policy in policies]
    assert [e.policy_version for e in produced] == [1, 2, 3]
    assert [e.policy for e in produced] == policies


def test_policy_version_starts_again_for_a_number_registered_again():
    p = registered_provisioner()
    events(p.run(SetPolicy(number=NUMBER, policy=SecurityPolicy())))
    events(p.run(SetPolicy(number=NUMBER, policy=SecurityPolicy())))
    events(p.run(UnregisterNumber(number=NUMBER)))
    events(p.run(RegisterNumber(number=NUMBER, account_id=ACCOUNT)))
    assert events(p.run(SetPolicy(number=NUMBER, policy=SecurityPolicy())))[0].policy_version == 1


@pytest.mark.parametrize(
    ("policy", "field", "rule"),
    [
        (SecurityPolicy(allowed_cidrs=("10.0.0.0/33",)), "policy.allowed_cidrs[0]", "cidr"),
        (SecurityPolicy(allowed_cidrs=("10.0.0.0/8", "office")), "policy.allowed_cidrs[1]", "cidr"),
        (
            SecurityPolicy(hours=Hours(start="09:00", end="17:00", timezone="Europe/Atlantis")),
            "policy.hours.timezone",
            "timezone",
        ),
        (SecurityPolicy(blocked_prefixes=("48",)), "policy.blocked_prefixes[0]", "prefix"),
    ],
    ids=["prefix length 33", "not a cidr", "unknown timezone", "prefix without +"],
)
def test_a_policy_the_gatekeeper_cannot_evaluate_is_refused_as_invalid(policy, field, rule):
    p = registered_provisioner()
    assert refused(p.run(SetPolicy(number=NUMBER, policy=policy))) == ("invalid", field, rule)
    assert p.registry.numbers[NUMBER].policy_version == 0


def test_a_policy_is_stored_normalized():
    p = registered_provisioner()
    policy = SecurityPolicy(allowed_cidrs=("10.0.0.1", "10.0.0.1/32", "2001:DB8::/32"))
    [event] = events(p.run(SetPolicy(number=NUMBER, policy=policy)))
    assert event.policy.allowed_cidrs == ("10.0.0.1/32", "2001:db8::/32")
    assert p.registry.numbers[NUMBER].policy == event.policy


# -- sync -----------------------------------------------------------------------------

A, B = outbound("a.example.com"), outbound("b.example.com")
I, J = inbound("203.0.113.0/24"), inbound("198.51.100.0/24")


@pytest.mark.parametrize(
    ("outbound_trunk", "inbound_trunk", "expected"),
    [
        (B, None, ("b.example.com", ("203.0.113.0/24",))),
        (None, J, ("a.example.com", ("198.51.100.0/24",))),
        (B, J, ("b.example.com", ("198.51.100.0/24",))),
        (None, None, ("a.example.com", ("203.0.113.0/24",))),
    ],
    ids=["outbound only", "inbound only", "both", "neither"],
)
def test_sync_replaces_the_trunks_given_and_keeps_the_others(outbound_trunk, inbound_trunk, expected):
    p = Provisioner()
    events(p.run(RegisterNumber(number=NUMBER, account_id=ACCOUNT, outbound_trunk=A, inbound_trunk=I)))
    [event] = events(p.run(SyncNumber(number=NUMBER, outbound_trunk=outbound_trunk, inbound_trunk=inbound_trunk)))
    assert event.provider == "sip_trunk"
    assert (event.outbound_trunk.address, event.inbound_trunk.allowed_addresses) == expected
    record = p.registry.numbers[NUMBER]
    assert (record.outbound_trunk, record.inbound_trunk) == (event.outbound_trunk, event.inbound_trunk)


def test_sync_uses_no_quota():
    p = registered_provisioner(rules=Rules(max_numbers_per_account=1))
    events(p.run(SyncNumber(number=NUMBER, outbound_trunk=B)))
    assert p.registry.numbers_of(ACCOUNT) == 1


def test_sync_of_a_twilio_number_keeps_the_provider_and_replaces_the_credentials_given():
    p = Provisioner()
    events(p.run(twilio_number(), {"twilio": "sec_1"}))
    other_sid = "AC" + "f" * 32
    renew = SyncNumber(number=NUMBER, twilio=TwilioCredentials(account_sid=other_sid, auth_token=TOKEN))
    [renewed] = events(p.run(renew, {"twilio": "sec_2"}))
    assert (renewed.provider, renewed.secret_ref, renewed.twilio_account_sid) == ("twilio", "sec_2", other_sid)
    assert TOKEN.encode() not in msgspec.json.encode(renewed)
    [kept] = events(p.run(SyncNumber(number=NUMBER, outbound_trunk=B)))
    assert (kept.provider, kept.secret_ref, kept.twilio_account_sid) == ("twilio", "sec_2", other_sid)
    assert p.registry.numbers[NUMBER].secret_ref == "sec_2"


def test_sync_of_a_sip_trunk_number_refuses_twilio_credentials():
    sync = SyncNumber(number=NUMBER, twilio=TwilioCredentials(account_sid=SID, auth_token=TOKEN))
    assert refused(registered_provisioner().run(sync)) == ("invalid", "twilio", "provider")


def test_sync_of_a_twilio_number_checks_the_sid():
    p = Provisioner()
    events(p.run(twilio_number(), {"twilio": "sec_1"}))
    bad = SyncNumber(number=NUMBER, twilio=TwilioCredentials(account_sid="AC" + "g" * 32, auth_token=TOKEN))
    assert refused(p.run(bad)) == ("invalid", "twilio.account_sid", "twilio_sid")


# -- versions and idempotent folding ----------------------------------------------------


def _register(number: str = NUMBER) -> RegisterNumber:
    return RegisterNumber(number=number, account_id=ACCOUNT)


def _assign() -> AssignAgent:
    return AssignAgent(number=NUMBER, agent_id="agent_1")


def _policy() -> SetPolicy:
    return SetPolicy(number=NUMBER, policy=SecurityPolicy())


def _unregister(force: bool = False) -> UnregisterNumber:
    return UnregisterNumber(number=NUMBER, force=force)


@pytest.mark.parametrize(
    ("history", "command", "expected_version"),
    [
        ([], _register(), 0),
        ([_register()], _assign(), 1),
        ([_register(), _assign(), _policy()], _policy(), 3),
        (
            [_register(), _register(OTHER), AssignAgent(number=OTHER, agent_id="agent_1")],
            UpdateNumber(number=NUMBER, label="x"),
            1,
        ),
        ([_register(), UpdateNumber(number=NUMBER, label="x", agent_id="a")], _unregister(force=True), 3),
        ([_register(), _policy(), _unregister()], _register(), 3),
        ([_register(), _unregister(), _register()], SyncNumber(number=NUMBER), 3),
    ],
    ids=[
        "never registered",
        "after registration",
        "after three events",
        "another number's events do not count",
        "two events of one command",
        "retired after unregister",
        "registered again",
    ],
)
def test_expected_version_is_the_sequence_of_the_numbers_last_event(history, command, expected_version):
    p = Provisioner()
    for earlier in history:
        events(p.run(earlier))
    outcome = p.run(command)
    assert isinstance(outcome, Accepted) and outcome.expected_version == expected_version


def test_unregistering_retires_the_numbers_version():
    p = registered_provisioner(agent="agent_1")
    assert p.registry.numbers[NUMBER].version == 2
    events(p.run(UnregisterNumber(number=NUMBER, force=True)))
    assert p.registry.retired == {NUMBER: 3}
    assert NUMBER not in p.registry.numbers and p.registry.ids == {}


def test_an_event_at_or_below_the_numbers_version_is_skipped():
    p = registered_provisioner(label="first")
    [label_set] = events(p.run(UpdateNumber(number=NUMBER, label="second")))
    stale = NumberLabelSet(event_id="ev_old", occurred_at=timestamp(NOW), number=NUMBER, label="stale")
    for sequence in (1, 2):
        evolve(p.registry, stale, sequence=sequence)
    evolve(p.registry, label_set, sequence=2)  # a redelivery
    assert (p.registry.numbers[NUMBER].label, p.registry.numbers[NUMBER].version) == ("second", 2)
    evolve(p.registry, stale, sequence=3)
    assert (p.registry.numbers[NUMBER].label, p.registry.numbers[NUMBER].version) == ("stale", 3)


def test_an_event_at_or_below_a_retired_version_is_skipped():
    p = registered_provisioner()
    [(_, registered)] = p.log
    events(p.run(UnregisterNumber(number=NUMBER)))
    evolve(p.registry, registered, sequence=1)
    assert NUMBER not in p.registry.numbers


def test_replaying_the_events_rebuilds_the_same_registry():
    p = Provisioner()
    for command in [
        RegisterNumber(number=NUMBER, account_id=ACCOUNT),
        AssignAgent(number=NUMBER, agent_id="agent_1"),
        SetPolicy(number=NUMBER, policy=SecurityPolicy()),
        SetPolicy(number=NUMBER, policy=SecurityPolicy()),
        UpdateNumber(number=NUMBER, label="support"),
        SyncNumber(number=NUMBER, outbound_trunk=A),
        ConfigureAccount(account_id=ACCOUNT),
        CreditAccount(account_id=ACCOUNT, amount_millicredits=5_000, reference="inv-1"),
    ]:
        events(p.run(command))
    replayed = Registry()
    for sequence, event in p.log:
        evolve(replayed, event, sequence=sequence)
    assert replayed == p.registry
    assert replayed.numbers[NUMBER].policy_version == 2


# -- accounts -------------------------------------------------------------------------


def test_the_same_credit_reference_twice_credits_once():
    p = Provisioner()
    credit = CreditAccount(account_id=ACCOUNT, amount_millicredits=10_000, reference="stripe-pi-1")
    [event] = events(p.run(credit))
    assert (type(event), event.amount_millicredits, event.reference) == (AccountCredited, 10_000, "stripe-pi-1")
    assert event.event_id == credit_event_id(ACCOUNT, "stripe-pi-1")
    assert p.run(credit) == Accepted([])
    assert p.run(CreditAccount(account_id=ACCOUNT, amount_millicredits=1, reference="stripe-pi-1")) == Accepted([])
    assert p.registry.accounts[ACCOUNT].credited_millicredits == 10_000


def test_a_credits_event_id_depends_on_the_account_and_reference_only():
    credit = CreditAccount(account_id=ACCOUNT, amount_millicredits=10_000, reference="stripe-pi-1")
    [first] = events(Provisioner().run(credit))
    other = Provisioner()
    other.new_id("ev")  # another instance, at another point of its id sequence
    [second] = events(other.run(credit))
    assert first.event_id == second.event_id == credit_event_id(ACCOUNT, "stripe-pi-1")
    distinct = {
        credit_event_id(ACCOUNT, "stripe-pi-1"),
        credit_event_id(ACCOUNT, "stripe-pi-2"),
        credit_event_id("acct_2", "stripe-pi-1"),
        credit_event_id("acct_1\x00x", "y"),
        credit_event_id("acct_1", "\x00xy"),
    }
    assert len(distinct) == 5


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
    events(p.run(CreditAccount(account_id=ACCOUNT, amount_millicredits=10_000, reference="stripe-pi-1")))
    assert [type(e) for e in events(p.run(second))] == [AccountCredited]


def test_configure_account_carries_every_setting():
    command = ConfigureAccount(
        account_id=ACCOUNT,
        rate_millicredits_per_minute=25_000,
        text_price_millicredits=400,
        daily_voice_cap_s=3_600,
        per_call_max_s=600,
        timezone="Europe/Warsaw",
    )
    [event] = events(Provisioner().run(command))
    assert isinstance(event, AccountConfigured)
    assert (
        event.account_id,
        event.rate_millicredits_per_minute,
        event.text_price_millicredits,
        event.daily_voice_cap_s,
        event.per_call_max_s,
        event.timezone,
    ) == (ACCOUNT, 25_000, 400, 3_600, 600, "Europe/Warsaw")


def test_configure_account_refuses_an_unknown_timezone():
    outcome = Provisioner().run(ConfigureAccount(account_id=ACCOUNT, timezone="Europe/Atlantis"))
    assert refused(outcome) == ("invalid", "timezone", "timezone")


def test_view_account_shows_settings_numbers_and_credits():
    p = registered_provisioner()
    assert view_account(p.registry, ACCOUNT) is None  # numbers, but not configured
    events(p.run(ConfigureAccount(account_id=ACCOUNT, per_call_max_s=600, timezone="Europe/Warsaw")))
    for reference in ("inv-1", "inv-2"):
        events(p.run(CreditAccount(account_id=ACCOUNT, amount_millicredits=2_500, reference=reference)))
    view = view_account(p.registry, ACCOUNT)
    assert (view.account_id, view.per_call_max_s, view.timezone, view.numbers, view.credited_millicredits) == (
        ACCOUNT,
        600,
        "Europe/Warsaw",
        1,
        5_000,
    )
    assert view_account(p.registry, "acct_unknown") is None


def test_a_command_the_provisioner_does_not_handle_is_invalid():
    outcome = Provisioner().run(PlaceCall(from_number=NUMBER, to="+14155550100"))
    assert refused(outcome) == ("invalid", "command", "known_command")


# -- replay: the read model is a function of the event log --------------------------------

NUMBERS = ("+48123456781", "+48123456782", "+14155550100")
POLICIES = (
    SecurityPolicy(),
    SecurityPolicy(max_concurrent_calls=1, blocked_prefixes=("+1900",)),
    SecurityPolicy(allowed_cidrs=("10.0.0.1",)),
    SecurityPolicy(allowed_cidrs=("office",)),  # refused: no events
)
numbers = st.sampled_from(NUMBERS)
commands = st.one_of(
    st.builds(RegisterNumber, number=numbers, account_id=st.sampled_from(("acct_1", "acct_2"))),
    st.builds(AssignAgent, number=numbers, agent_id=st.sampled_from((None, "agent_1", "agent_2"))),
    st.builds(SetPolicy, number=numbers, policy=st.sampled_from(POLICIES)),
    st.builds(UnregisterNumber, number=numbers, force=st.booleans()),
)


def read_model(registry: Registry) -> tuple[dict, dict]:
    return {n: view_number(registry, r) for n, r in registry.numbers.items()}, dict(registry.retired)


@given(st.lists(commands, max_size=40))
def test_replaying_the_event_log_from_scratch_gives_the_same_read_model(script):
    p = Provisioner()
    for command in script:
        p.run(command)
    replayed = Registry()
    for sequence, event in p.log:
        evolve(replayed, event, sequence=sequence)
    assert read_model(replayed) == read_model(p.registry)
    last = {e.number: sequence for sequence, e in p.log}
    assert {n: r.version for n, r in p.registry.numbers.items()} == {n: last[n] for n in p.registry.numbers}


def test_a_policy_change_based_on_a_stale_version_is_a_conflict():
    p = registered_provisioner()
    assert isinstance(p.run(SetPolicy(number=NUMBER, policy=SecurityPolicy(max_concurrent_calls=1))), Accepted)
    stale = p.run(SetPolicy(number=NUMBER, policy=SecurityPolicy(max_concurrent_calls=2), expected_policy_version=0))
    assert isinstance(stale, Refusal) and (stale.code, stale.field, stale.rule) == ("conflict", "expected_policy_version", "stale")
    fresh = p.run(SetPolicy(number=NUMBER, policy=SecurityPolicy(max_concurrent_calls=2), expected_policy_version=1))
    assert isinstance(fresh, Accepted) and fresh.events[0].policy_version == 2
