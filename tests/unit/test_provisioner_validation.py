"""Provisioner input validation: normalized values back, or a refusal naming field and rule."""

from __future__ import annotations

import ipaddress

import phonenumbers
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.events import FraudAlertPolicy, Hours, InboundTrunk, OutboundTrunk, SecurityPolicy
from services.provisioner import validation as v
from services.provisioner.validation import Invalid


def refusal(call) -> Invalid:
    with pytest.raises(Invalid) as caught:
        call()
    return caught.value


# -- e164 --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "normalized"),
    [
        ("+48123456789", "+48123456789"),
        ("+48221234567", "+48221234567"),
        ("+15551234567", "+15551234567"),  # fictional 555 range: possible, not "valid"
        ("+15557654321", "+15557654321"),
        ("+447700900123", "+447700900123"),  # Ofcom drama range
        ("+447911123456", "+447911123456"),
        ("+48 12 345 67 89", "+48123456789"),
        ("+1 (555) 123-4567", "+15551234567"),
        (" +48123456789 ", "+48123456789"),
    ],
)
def test_e164_accepts_possible_international_numbers_and_normalizes_them(given, normalized):
    assert v.e164(given) == normalized


@pytest.mark.parametrize(
    "given",
    [
        "48123456789",  # no '+'
        "+0123456789",  # no country code starts with 0
        "+48abc456789",
        "+1 800 FLOWERS",  # vanity letters are not accepted
        "+48123456789 ext. 12",
        "+4812",  # too short for Poland
        "+15551234",  # possible only locally: no area code
        "+481234567890123456",  # too long
        "+999123456789",  # unassigned country code
        "+",
        "",
        "++48123456789",
        "+48123456789\n+48221234567",
    ],
)
def test_e164_refuses_anything_but_a_possible_international_number(given):
    error = refusal(lambda: v.e164(given))
    assert (error.field, error.rule) == ("number", "e164")


def test_e164_names_the_field_it_was_given():
    error = refusal(lambda: v.e164("123", "inbound_trunk.allowed_numbers[1]"))
    assert (error.field, error.rule) == ("inbound_trunk.allowed_numbers[1]", "e164")
    assert str(error).startswith("inbound_trunk.allowed_numbers[1]: ")


def test_a_non_string_is_refused_with_the_type_rule():
    error = refusal(lambda: v.e164(48123456789))
    assert (error.field, error.rule) == ("number", "type")


# -- cidr --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "normalized"),
    [
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("192.168.1.0/24", "192.168.1.0/24"),
        ("0.0.0.0/0", "0.0.0.0/0"),
        ("203.0.113.7", "203.0.113.7/32"),  # a bare address is one host
        ("203.0.113.7/32", "203.0.113.7/32"),
        ("2001:DB8::/32", "2001:db8::/32"),
        ("2001:0db8:0000::/48", "2001:db8::/48"),
        ("::1", "::1/128"),
        ("::/0", "::/0"),
    ],
)
def test_cidr_accepts_ipv4_and_ipv6_networks_and_normalizes_them(given, normalized):
    assert v.cidr(given, "policy.allowed_cidrs[0]") == normalized


@pytest.mark.parametrize(
    "given",
    [
        "010.0.0.0/8",  # leading-zero octet: octal to some tools
        "10.0.0.01",
        "10.0.0.1/8",  # host bits set
        "2001:db8::1/32",
        "10.0.0.0/33",
        "2001:db8::/129",
        "10.0.0.0/08",
        "10.0.0.0/255.0.0.0",  # netmask notation
        "fe80::1%eth0/128",  # zone id
        "10.0.0.0/",
        "10.0.0/8",
        "example.com",
        " 10.0.0.0/8",
        "",
    ],
)
def test_cidr_refuses_malformed_or_non_strict_networks(given):
    error = refusal(lambda: v.cidr(given, "policy.allowed_cidrs[2]"))
    assert (error.field, error.rule) == ("policy.allowed_cidrs[2]", "cidr")


@st.composite
def networks(draw):
    address = draw(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)))
    length = draw(st.integers(0, address.max_prefixlen))
    return ipaddress.ip_network(f"{address}/{length}", strict=False)  # host bits cleared


@given(networks())
def test_any_strict_network_round_trips_through_cidr(network):
    normalized = v.cidr(str(network), "policy.allowed_cidrs[0]")
    assert ipaddress.ip_network(normalized, strict=True) == network
    assert v.cidr(normalized, "policy.allowed_cidrs[0]") == normalized


@given(
    st.sampled_from(["PL", "US", "GB", "DE", "FR", "JP", "BR", "IN", "AU", "ZA"]),
    st.sampled_from(list(phonenumbers.PhoneNumberType.values())),
)
def test_normalized_e164_starts_with_plus_and_parses_back_to_the_same_number(region, kind):
    example = phonenumbers.example_number_for_type(region, kind)
    if example is None:
        return
    formatted = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.INTERNATIONAL)
    normalized = v.e164(formatted)
    assert normalized.startswith("+")
    assert phonenumbers.parse(normalized, None) == example
    assert v.e164(normalized) == normalized


@given(st.from_regex(r"\+[1-9][0-9]{6,14}", fullmatch=True))
def test_e164_output_is_always_plus_digits_that_parse_back(text):
    try:
        normalized = v.e164(text)
    except Invalid as error:
        assert error.rule == "e164"
        return
    assert normalized.startswith("+") and normalized[1:].isdigit()
    assert phonenumbers.parse(normalized, None) == phonenumbers.parse(text, None)


# -- twilio account sid ------------------------------------------------------------

SID = "AC" + "0123456789abcdef" * 2


def test_twilio_sid_accepts_ac_and_32_lowercase_hex():
    assert v.twilio_account_sid(SID) == SID


@pytest.mark.parametrize(
    "given",
    [
        "AC" + "0123456789ABCDEF" * 2,  # upper-case hex: not as Twilio issues it
        "ac" + "0123456789abcdef" * 2,
        "SK" + "0123456789abcdef" * 2,  # an API key SID, not an account
        SID[:-1],
        SID + "0",
        "AC" + "g" * 32,
        "",
    ],
)
def test_twilio_sid_refuses_anything_else(given):
    error = refusal(lambda: v.twilio_account_sid(given, "twilio.account_sid"))
    assert (error.field, error.rule) == ("twilio.account_sid", "twilio_sid")


# -- sip address -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "normalized"),
    [
        ("pbx.example.com", "pbx.example.com"),
        ("PBX.Example.com:5061", "pbx.example.com:5061"),
        ("pbx", "pbx"),
        ("sip-1.carrier.net:5060", "sip-1.carrier.net:5060"),
        ("203.0.113.7", "203.0.113.7"),
        ("203.0.113.7:5060", "203.0.113.7:5060"),
        ("2001:db8::1", "2001:db8::1"),
        ("[2001:DB8::1]:5061", "[2001:db8::1]:5061"),
        ("[2001:db8::1]", "[2001:db8::1]"),
        ("h:65535", "h:65535"),
    ],
)
def test_sip_address_accepts_host_or_ip_with_optional_port(given, normalized):
    assert v.sip_address(given, "outbound_trunk.address") == normalized


@pytest.mark.parametrize(
    "given",
    [
        "sip:pbx.example.com",
        "SIPS:pbx.example.com",
        "alice@pbx.example.com",
        "pbx example.com",
        "pbx.example.com;transport=tcp",
        "pbx.example.com:0",
        "pbx.example.com:65536",
        "pbx.example.com:05060",
        "pbx.example.com:",
        "pbx.example.com:50:60",
        "-pbx.example.com",
        "pbx-.example.com",
        "pbx..example.com",
        "pbx_1.example.com",
        "a" * 64 + ".com",
        "010.0.0.1",
        "1.2.3",
        "[203.0.113.7]:5060",
        "[pbx.example.com]:5060",
        "[2001:db8::1]5060",
        "https://pbx.example.com",
        "",
    ],
)
def test_sip_address_refuses_schemes_users_params_and_bad_hosts_or_ports(given):
    error = refusal(lambda: v.sip_address(given, "outbound_trunk.address"))
    assert (error.field, error.rule) == ("outbound_trunk.address", "sip_address")


# -- small scalars -----------------------------------------------------------------


SCALARS_GOOD = [
    (v.hhmm, "00:00", "00:00"),
    (v.hhmm, "09:30", "09:30"),
    (v.hhmm, "23:59", "23:59"),
    (v.timezone, "UTC", "UTC"),
    (v.timezone, "Europe/Warsaw", "Europe/Warsaw"),
    (v.timezone, "America/New_York", "America/New_York"),
    (v.timezone, "Etc/GMT+2", "Etc/GMT+2"),
    (v.prefix, "+4", "+4"),
    (v.prefix, "+48", "+48"),
    (v.prefix, "+" + "1" * 15, "+" + "1" * 15),
    (v.url, "https://hooks.example.com/fraud?key=1", "https://hooks.example.com/fraud?key=1"),
    (v.url, "http://localhost:8000/hook", "http://localhost:8000/hook"),
    (v.url, "https://[::1]:8443/x", "https://[::1]:8443/x"),
    (v.email, "ops@example.com", "ops@example.com"),
    (v.email, "first.last+fraud@sub.example.co.uk", "first.last+fraud@sub.example.co.uk"),
    (v.email, "O'Brien@Example.COM", "O'Brien@example.com"),  # only the domain ignores case
]

SCALARS_BAD = [
    *[(v.hhmm, text, "hhmm") for text in ["24:00", "9:30", "09:60", "0930", "09:30:00", "", "\u0660\u0669:\u0663\u0660"]],
    *[
        (v.timezone, text, "timezone")
        for text in ["", "Mars/Olympus", "europe/warsaw", "localtime", "../etc/passwd", "/usr/share/zoneinfo/UTC"]
    ],
    *[(v.prefix, text, "prefix") for text in ["48", "+", "+" + "1" * 16, "+48 22", "+4a", "+\u0664\u0668", ""]],
    *[
        (v.url, text, "url")
        for text in [
            "ftp://example.com/",
            "https:///path",
            "example.com/hook",
            "https://user:pw@example.com/",
            "https://exa mple.com/",
            "https://example.com:99999/",
            "https://example.com:0/",
            "https://-bad-.com/",
            "https://[::1/hook",
            "https://b\u00fccher.de/",
            "",
        ]
    ],
    *[
        (v.email, text, "email")
        for text in [
            "ops",
            "ops@",
            "@example.com",
            "ops@localhost",
            "ops@@example.com",
            "a b@example.com",
            "ops.@example.com",
            "ops@example..com",
            "ops@-example.com",
            "",
        ]
    ],
]


@pytest.mark.parametrize(("validator", "given", "normalized"), SCALARS_GOOD)
def test_scalar_validators_accept_good_values(validator, given, normalized):
    assert validator(given, "policy.x") == normalized


@pytest.mark.parametrize(("validator", "given", "rule"), SCALARS_BAD)
def test_scalar_validators_refuse_bad_values_naming_field_and_rule(validator, given, rule):
    error = refusal(lambda: validator(given, "policy.x"))
    assert (error.field, error.rule) == ("policy.x", rule)


def test_url_refusals_never_quote_the_url_back():
    error = refusal(lambda: v.url("https://user:hunter2@example.com/hook", "policy.fraud_alert.webhook_url"))
    assert "hunter2" not in str(error)


def test_fields_named_like_secrets_never_have_their_value_quoted():
    assert "s3cr3t" not in str(Invalid("sip.password", "rule", "bad", "s3cr3t"))
    assert "s3cr3t" not in str(Invalid("twilio.auth_token", "rule", "bad", "s3cr3t"))
    assert "'nope'" in str(Invalid("number", "e164", "bad", "nope"))


# -- policy ------------------------------------------------------------------------


def test_an_empty_policy_is_valid_and_unchanged():
    assert v.policy(SecurityPolicy()) == SecurityPolicy()


def test_policy_is_returned_normalized():
    given = SecurityPolicy(
        allowed_cidrs=("203.0.113.7", "2001:DB8::/32", "203.0.113.7/32"),
        media_encryption="required",
        max_concurrent_calls=0,
        max_calls_per_hour=10,
        hours=Hours(start="22:00", end="06:00", timezone="Europe/Warsaw"),
        allowed_prefixes=("+48", "+44", "+48"),
        blocked_prefixes=("+4870", "+4870"),
        fraud_alert=FraudAlertPolicy(
            calls=20, window_minutes=5, email="ops@Example.com", webhook_url="https://h.example.com/x"
        ),
    )
    result = v.policy(given)
    assert result.allowed_cidrs == ("203.0.113.7/32", "2001:db8::/32")
    assert result.allowed_prefixes == ("+48", "+44")
    assert result.blocked_prefixes == ("+4870",)
    assert result.fraud_alert.email == "ops@example.com"
    assert result.hours == given.hours
    assert result.max_calls_per_hour == 10


@pytest.mark.parametrize(
    ("policy", "field", "rule"),
    [
        (SecurityPolicy(allowed_cidrs=("10.0.0.0/8", "192.168.0.0/16", "10.0.0.1/8")), "policy.allowed_cidrs[2]", "cidr"),
        (SecurityPolicy(media_encryption="maybe"), "policy.media_encryption", "enum"),
        (SecurityPolicy(max_concurrent_calls=-1), "policy.max_concurrent_calls", "non_negative"),
        (SecurityPolicy(max_calls_per_day=True), "policy.max_calls_per_day", "non_negative"),
        (SecurityPolicy(hours=Hours(start="9:00", end="17:00")), "policy.hours.start", "hhmm"),
        (SecurityPolicy(hours=Hours(start="09:00", end="24:00")), "policy.hours.end", "hhmm"),
        (SecurityPolicy(hours=Hours(start="09:00", end="17:00", timezone="")), "policy.hours.timezone", "timezone"),
        (SecurityPolicy(hours=Hours(start="09:00", end="17:00", timezone="CET/Nowhere")), "policy.hours.timezone", "timezone"),
        (SecurityPolicy(allowed_prefixes=("+48", "48")), "policy.allowed_prefixes[1]", "prefix"),
        (SecurityPolicy(blocked_prefixes=("+",)), "policy.blocked_prefixes[0]", "prefix"),
        (SecurityPolicy(fraud_alert=FraudAlertPolicy(calls=0, window_minutes=5)), "policy.fraud_alert.calls", "positive"),
        (SecurityPolicy(fraud_alert=FraudAlertPolicy(calls=5, window_minutes=0)), "policy.fraud_alert.window_minutes", "positive"),
        (SecurityPolicy(fraud_alert=FraudAlertPolicy(calls=5, window_minutes=5, email="ops")), "policy.fraud_alert.email", "email"),
        (
            SecurityPolicy(fraud_alert=FraudAlertPolicy(calls=5, window_minutes=5, webhook_url="ftp://x.com")),
            "policy.fraud_alert.webhook_url",
            "url",
        ),
    ],
)  # fmt: skip
def test_policy_refusals_name_the_field_path_and_rule(policy, field, rule):
    error = refusal(lambda: v.policy(policy))
    assert (error.field, error.rule) == (field, rule)


# -- trunks ------------------------------------------------------------------------


def test_outbound_trunk_is_returned_normalized():
    trunk = OutboundTrunk(
        address="PBX.Example.com:5061",
        transport="tls",
        media_encryption="required",
        headers={"X-Customer": "acme", "P-Asserted-Identity": "<sip:+48123456789@pbx>"},
        username="acme",
        secret_ref="sec_1",
    )
    result = v.outbound_trunk(trunk)
    assert result.address == "pbx.example.com:5061"
    assert result.headers == trunk.headers
    assert (result.username, result.secret_ref) == ("acme", "sec_1")


@pytest.mark.parametrize(
    ("trunk", "field", "rule"),
    [
        (OutboundTrunk(address="sip:pbx.example.com"), "outbound_trunk.address", "sip_address"),
        (OutboundTrunk(address="pbx", transport="ws"), "outbound_trunk.transport", "enum"),
        (OutboundTrunk(address="pbx", media_encryption="on"), "outbound_trunk.media_encryption", "enum"),
        (OutboundTrunk(address="pbx", headers={"X Bad": "1"}), "outbound_trunk.headers", "sip_header"),
        (OutboundTrunk(address="pbx", headers={"": "1"}), "outbound_trunk.headers", "sip_header"),
        (OutboundTrunk(address="pbx", headers={"X-A:": "1"}), "outbound_trunk.headers", "sip_header"),
        (OutboundTrunk(address="pbx", headers={"From": "x"}), "outbound_trunk.headers[From]", "reserved_header"),
        (OutboundTrunk(address="pbx", headers={"call-id": "x"}), "outbound_trunk.headers[call-id]", "reserved_header"),
        (OutboundTrunk(address="pbx", headers={"Max-Forwards": "1"}), "outbound_trunk.headers[Max-Forwards]", "reserved_header"),
        (OutboundTrunk(address="pbx", headers={"f": "x"}), "outbound_trunk.headers[f]", "reserved_header"),
        (OutboundTrunk(address="pbx", headers={"X-A": "1", "x-a": "2"}), "outbound_trunk.headers[x-a]", "duplicate_header"),
        (OutboundTrunk(address="pbx", headers={"X-A": "1\r\nVia: evil"}), "outbound_trunk.headers[X-A]", "header_value"),
        (OutboundTrunk(address="pbx", username=""), "outbound_trunk.username", "username"),
        (OutboundTrunk(address="pbx", username="a b"), "outbound_trunk.username", "username"),
        (OutboundTrunk(address="pbx", secret_ref="hunter2"), "outbound_trunk.secret_ref", "secret_ref"),
    ],
)  # fmt: skip
def test_outbound_trunk_refusals_name_the_field_path_and_rule(trunk, field, rule):
    error = refusal(lambda: v.outbound_trunk(trunk))
    assert (error.field, error.rule) == (field, rule)


def test_header_values_and_secret_refs_are_never_quoted_back():
    error = refusal(lambda: v.outbound_trunk(OutboundTrunk(address="pbx", headers={"X-Key": "k3y\n"})))
    assert "k3y" not in str(error)
    error = refusal(lambda: v.outbound_trunk(OutboundTrunk(address="pbx", secret_ref="hunter2")))
    assert "hunter2" not in str(error)


def test_inbound_trunk_is_returned_normalized():
    trunk = InboundTrunk(
        allowed_addresses=("203.0.113.7", "198.51.100.0/24", "2001:DB8::/32", "203.0.113.7/32"),
        allowed_numbers=("+48 12 345 67 89", "+48123456789", "+15551234567"),
        remote_domains=("PBX.Example.com", "pbx.example.com", "carrier.net"),
    )
    result = v.inbound_trunk(trunk)
    assert result.allowed_addresses == ("203.0.113.7/32", "198.51.100.0/24", "2001:db8::/32")
    assert result.allowed_numbers == ("+48123456789", "+15551234567")
    assert result.remote_domains == ("pbx.example.com", "carrier.net")


@pytest.mark.parametrize(
    ("trunk", "field", "rule"),
    [
        (InboundTrunk(allowed_addresses=("10.0.0.0/8", "10.0.0.1/8")), "inbound_trunk.allowed_addresses[1]", "cidr"),
        (InboundTrunk(allowed_addresses=("pbx.example.com",)), "inbound_trunk.allowed_addresses[0]", "cidr"),
        (InboundTrunk(allowed_numbers=("+48123456789", "123")), "inbound_trunk.allowed_numbers[1]", "e164"),
        (InboundTrunk(remote_domains=("sip:carrier.net",)), "inbound_trunk.remote_domains[0]", "hostname"),
        (InboundTrunk(remote_domains=("carrier.net", "bad_domain.net")), "inbound_trunk.remote_domains[1]", "hostname"),
        (InboundTrunk(remote_domains=("\u212aarrier.net",)), "inbound_trunk.remote_domains[0]", "hostname"),
        (InboundTrunk(remote_domains=("carrier.net.",)), "inbound_trunk.remote_domains[0]", "hostname"),
        (InboundTrunk(username="x\ty"), "inbound_trunk.username", "username"),
        (InboundTrunk(secret_ref="sec_"), "inbound_trunk.secret_ref", "secret_ref"),
    ],
)  # fmt: skip
def test_inbound_trunk_refusals_name_the_field_path_and_rule(trunk, field, rule):
    error = refusal(lambda: v.inbound_trunk(trunk))
    assert (error.field, error.rule) == (field, rule)
