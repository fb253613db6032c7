"""Admission as pure functions: state folded from events, then `decide` on one offer."""

from __future__ import annotations

import itertools
from collections import deque
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import (
    AccountConfigured,
    CallAccepted,
    CallEnded,
    CallMissed,
    CallOffered,
    CallRejected,
    Hours,
    NumberAssigned,
    NumberPolicySet,
    NumberRegistered,
    NumberUnregistered,
    SecurityPolicy,
    timestamp,
)
from services.gatekeeper.core import State, admitted_within, decide, evolve, ip_allowed, matches_prefix, within_hours

NUMBER = "+48123456789"
OTHER_NUMBER = "+48987654321"
CALLER = "+14155550100"
ACCOUNT = "acct_1"
AGENT = "agent_1"
T0 = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)  # a Monday, noon UTC

_ids = itertools.count(1)


def _stamp(when: datetime = T0) -> dict:
    return {"event_id": f"ev-{next(_ids)}", "occurred_at": timestamp(when)}


def registered(number: str = NUMBER) -> NumberRegistered:
    return NumberRegistered(
        **_stamp(), number=number, number_id="pn_1", account_id=ACCOUNT, provider="sip_trunk"
    )


def assigned(agent_id: str | None = AGENT, number: str = NUMBER) -> NumberAssigned:
    return NumberAssigned(**_stamp(), number=number, agent_id=agent_id)


def policy_set(version: int = 1, number: str = NUMBER, **policy) -> NumberPolicySet:
    return NumberPolicySet(**_stamp(), number=number, policy=SecurityPolicy(**policy), policy_version=version)


def unregistered(number: str = NUMBER) -> NumberUnregistered:
    return NumberUnregistered(**_stamp(), number=number)


def accepted(call_id: str, when: datetime = T0, number: str = NUMBER) -> CallAccepted:
    return CallAccepted(**_stamp(when), call_id=call_id, number=number, account_id=ACCOUNT, agent_id=AGENT)


def rejected(call_id: str, number: str = NUMBER) -> CallRejected:
    return CallRejected(**_stamp(), call_id=call_id, number=number, reason="busy", sip_status=486)


def ended(call_id: str, number: str = NUMBER) -> CallEnded:
    return CallEnded(**_stamp(), call_id=call_id, number=number, duration_ms=30_000)


def missed(call_id: str, number: str = NUMBER) -> CallMissed:
    return CallMissed(**_stamp(), call_id=call_id, number=number)


def offer(
    call_id: str = "call_1",
    *,
    to: str = NUMBER,
    from_: str = CALLER,
    source_ip: str = "10.0.0.5",
    srtp: bool = False,
    direction: str = "inbound",
    event_id: str | None = None,
) -> CallOffered:
    return CallOffered(
        event_id=event_id or f"offer-{call_id}",
        occurred_at=timestamp(T0),
        call_id=call_id,
        direction=direction,  # type: ignore[arg-type]
        to=to,
        from_=from_,
        source_ip=source_ip,
        srtp=srtp,
    )


def fold(*events) -> State:
    state = State()
    for event in events:
        evolve(state, event)
    return state


def line(*later_events, **policy) -> State:
    """A registered number with an agent, the given policy (if any), then later events."""
    setup = [registered(), assigned()] + ([policy_set(**policy)] if policy else [])
    return fold(*setup, *later_events)


def outcome(result: CallAccepted | CallRejected) -> tuple[str, int | None]:
    if isinstance(result, CallAccepted):
        return ("accepted", None)
    return (result.reason, result.sip_status)


# -- checks 1 and 2: the number and its agent -----------------------------------------


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        pytest.param([], ("unknown_number", 404), id="nothing registered"),
        pytest.param([registered(OTHER_NUMBER), assigned(number=OTHER_NUMBER)], ("unknown_number", 404), id="another number registered"),
        pytest.param([registered(), assigned(), unregistered()], ("unknown_number", 404), id="unregistered after use"),
        pytest.param([registered()], ("no_agent", 480), id="registered, never assigned"),
        pytest.param([registered(), assigned(), assigned(None)], ("no_agent", 480), id="agent unassigned again"),
        pytest.param([registered(), assigned()], ("accepted", None), id="registered and assigned"),
        pytest.param([registered(), unregistered(), registered(), assigned()], ("accepted", None), id="registered again"),
    ],
)
def test_number_must_be_registered_and_assigned_to_an_agent(events, expected):
    assert outcome(decide(fold(*events), offer(), now=T0)) == expected


def test_empty_policy_accepts_any_caller_from_any_address():
    state = line(policy_set())  # a policy event whose policy sets nothing
    result = decide(state, offer(from_="anonymous", source_ip="203.0.113.9"), now=T0)
    assert isinstance(result, CallAccepted)
    assert (result.account_id, result.agent_id, result.number) == (ACCOUNT, AGENT, NUMBER)


# -- checks 3 to 7: one failing (or passing) rule at a time ---------------------------

EVERY_COUNTRY_CODE = tuple(f"+{d}" for d in range(1, 10))  # every E.164 number starts with one


@pytest.mark.parametrize(
    ("policy", "offer_kwargs", "expected"),
    [
        # 3. source address
        pytest.param({"allowed_cidrs": ("10.0.0.0/8",)}, {"source_ip": "10.0.0.5"}, ("accepted", None), id="ipv4 inside cidr"),
        pytest.param({"allowed_cidrs": ("192.168.0.0/16",)}, {"source_ip": "10.0.0.5"}, ("source_ip_not_allowed", 403), id="ipv4 outside cidr"),
        pytest.param({"allowed_cidrs": ("192.168.0.0/16", "10.0.0.0/8")}, {"source_ip": "10.0.0.5"}, ("accepted", None), id="ipv4 inside second cidr"),
        pytest.param({"allowed_cidrs": ("10.0.0.5/32",)}, {"source_ip": "10.0.0.5"}, ("accepted", None), id="single host cidr"),
        pytest.param({"allowed_cidrs": ("10.0.0.5/32",)}, {"source_ip": "10.0.0.6"}, ("source_ip_not_allowed", 403), id="next host outside single host cidr"),
        pytest.param({"allowed_cidrs": ("2001:db8::/32",)}, {"source_ip": "2001:db8::1"}, ("accepted", None), id="ipv6 inside cidr"),
        pytest.param({"allowed_cidrs": ("2001:db8::/32",)}, {"source_ip": "2001:db9::1"}, ("source_ip_not_allowed", 403), id="ipv6 outside cidr"),
        pytest.param({"allowed_cidrs": ("2001:db8::/32",)}, {"source_ip": "10.0.0.5"}, ("source_ip_not_allowed", 403), id="ipv4 against ipv6-only list"),
        pytest.param({"allowed_cidrs": ("10.0.0.0/8",)}, {"source_ip": "2001:db8::1"}, ("source_ip_not_allowed", 403), id="ipv6 against ipv4-only list"),
        pytest.param({"allowed_cidrs": ("10.0.0.0/8",)}, {"source_ip": "::ffff:10.0.0.5"}, ("accepted", None), id="ipv4-mapped ipv6 inside ipv4 cidr"),
        pytest.param({"allowed_cidrs": ("10.0.0.0/8",)}, {"source_ip": "::ffff:11.0.0.5"}, ("source_ip_not_allowed", 403), id="ipv4-mapped ipv6 outside ipv4 cidr"),
        pytest.param({"allowed_cidrs": ("10.0.0.0/8",)}, {"source_ip": ""}, ("source_ip_not_allowed", 403), id="no source address"),
        pytest.param({"allowed_cidrs": ("10.0.0.0/8",)}, {"source_ip": "10.0.0.5:5060"}, ("source_ip_not_allowed", 403), id="address with port is not an address"),
        pytest.param({"allowed_cidrs": ("10.0.0.0/8",)}, {"source_ip": "not-an-ip"}, ("source_ip_not_allowed", 403), id="garbage address"),
        # 4. blocked prefixes
        pytest.param({"blocked_prefixes": ("+1415",)}, {"from_": "+14155550100"}, ("caller_blocked", 403), id="caller in blocked prefix"),
        pytest.param({"blocked_prefixes": ("+1415",)}, {"from_": "+14165550100"}, ("accepted", None), id="caller outside blocked prefix"),
        pytest.param({"blocked_prefixes": ("+44", "+1")}, {"from_": "+14155550100"}, ("caller_blocked", 403), id="caller in second blocked prefix"),
        pytest.param({"blocked_prefixes": ("+1415",)}, {"from_": "anonymous"}, ("accepted", None), id="anonymous matches no blocked prefix"),
        # 5. allowed prefixes
        pytest.param({"allowed_prefixes": ("+48",)}, {"from_": "+48600100200"}, ("accepted", None), id="caller in allowed prefix"),
        pytest.param({"allowed_prefixes": ("+48",)}, {"from_": "+14155550100"}, ("caller_not_allowed", 403), id="caller outside allowed prefix"),
        pytest.param({"allowed_prefixes": ("+4860",)}, {"from_": "+48"}, ("caller_not_allowed", 403), id="caller shorter than prefix"),
        pytest.param({"allowed_prefixes": EVERY_COUNTRY_CODE}, {"from_": "anonymous"}, ("caller_not_allowed", 403), id="anonymous never matches an allow-list"),
        # 6. media encryption
        pytest.param({"media_encryption": "required"}, {"srtp": False}, ("encryption_required", 488), id="srtp required, none offered"),
        pytest.param({"media_encryption": "required"}, {"srtp": True}, ("accepted", None), id="srtp required and offered"),
        pytest.param({"media_encryption": "allowed"}, {"srtp": False}, ("accepted", None), id="srtp allowed, none offered"),
        pytest.param({"media_encryption": "disabled"}, {"srtp": True}, ("accepted", None), id="srtp disabled, offered anyway"),
        # 7. hours (T0 is 12:00 UTC)
        pytest.param({"hours": Hours(start="09:00", end="17:00")}, {}, ("accepted", None), id="inside office hours"),
        pytest.param({"hours": Hours(start="13:00", end="17:00")}, {}, ("outside_hours", 480), id="before opening"),
        pytest.param({"hours": Hours(start="08:00", end="12:00")}, {}, ("outside_hours", 480), id="exactly at closing"),
        pytest.param({"hours": Hours(start="09:00", end="17:00", timezone="America/New_York")}, {}, ("outside_hours", 480), id="08:00 in New York"),
    ],
)
def test_each_policy_rule_refuses_with_its_reason_and_sip_status(policy, offer_kwargs, expected):
    assert outcome(decide(line(**policy), offer(**offer_kwargs), now=T0)) == expected


def test_outbound_call_is_checked_against_our_number_and_blocked_prefixes_apply_to_the_callee():
    state = line(blocked_prefixes=("+1415",))
    blocked = offer(direction="outbound", from_=NUMBER, to="+14155550100")
    ordinary = offer(direction="outbound", from_=NUMBER, to="+14165550100")
    assert outcome(decide(state, blocked, now=T0)) == ("destination_blocked", 403)
    assert outcome(decide(state, ordinary, now=T0)) == ("accepted", None)


@pytest.mark.parametrize(
    ("destination", "allowed", "expected"),
    [
        ("+19005550100", (), ("destination_high_risk", 403)),  # North American premium rate
        ("+882345678901", (), ("destination_high_risk", 403)),  # international networks
        ("+2521234567", (), ("destination_high_risk", 403)),  # an IRSF hot spot
        ("+19005550100", ("+1900",), ("accepted", None)),  # the account allowed the range
        ("+19005550100", ("+1900555",), ("accepted", None)),  # or a narrower part of it
        ("+19765550100", ("+1900",), ("destination_high_risk", 403)),  # allowing one range allows no other
        ("+14155550100", (), ("accepted", None)),
    ],
)
def test_high_risk_destinations_are_refused_unless_the_account_allows_them(destination, allowed, expected):
    state = line()
    evolve(
        state,
        AccountConfigured(
            event_id="ev_acct", occurred_at=timestamp(T0), account_id=ACCOUNT, allowed_high_risk_prefixes=allowed
        ),
    )
    result = decide(state, offer(direction="outbound", from_=NUMBER, to=destination), now=T0)
    assert outcome(result) == expected
    assert result.decision.checks[-1].name == "high_risk_destinations"


def test_inbound_calls_from_a_high_risk_range_are_not_refused_as_high_risk():
    assert outcome(decide(line(), offer(from_="+19005550100"), now=T0)) == ("accepted", None)


def test_outbound_call_from_an_unregistered_number_is_unknown_number():
    state = line()
    call = offer(direction="outbound", from_=OTHER_NUMBER, to=NUMBER)
    assert outcome(decide(state, call, now=T0)) == ("unknown_number", 404)


def test_policy_change_applies_to_the_next_offered_call():
    state = line()
    assert outcome(decide(state, offer("call_1"), now=T0)) == ("accepted", None)
    evolve(state, policy_set(version=2, blocked_prefixes=("+1",)))
    assert outcome(decide(state, offer("call_2"), now=T0)) == ("caller_blocked", 403)
    evolve(state, policy_set(version=3))
    assert outcome(decide(state, offer("call_3"), now=T0)) == ("accepted", None)


# -- the rules as plain functions -----------------------------------------------------


@pytest.mark.parametrize(
    ("source_ip", "cidrs", "expected"),
    [
        ("10.0.0.5", ("10.0.0.0/8",), True),
        ("10.255.255.255", ("10.0.0.0/8",), True),
        ("11.0.0.0", ("10.0.0.0/8",), False),
        ("::ffff:10.0.0.5", ("10.0.0.0/8",), True),
        ("::ffff:a00:5", ("10.0.0.0/8",), True),  # the same mapped address, written in hex
        ("2001:db8:ffff::1", ("2001:db8::/32",), True),
        ("2001:db8::1", ("10.0.0.0/8",), False),
        ("10.0.0.1", ("10.0.0.1/8",), True),  # host bits set in the cidr are tolerated
        ("10.0.0.5", (), False),
        ("", ("0.0.0.0/0",), False),
    ],
)
def test_ip_allowed_matches_ipv4_ipv6_and_ipv4_mapped_addresses(source_ip, cidrs, expected):
    assert ip_allowed(source_ip, cidrs) is expected


def test_ipv4_mapped_address_matches_a_cidr_written_in_ipv4_mapped_form():
    assert ip_allowed("::ffff:10.0.0.5", ("::ffff:10.0.0.0/104",))


@pytest.mark.parametrize(
    ("party", "prefixes", "expected"),
    [
        ("+14155550100", ("+1",), True),
        ("+14155550100", ("+1415",), True),
        ("+14155550100", ("+14155550100",), True),
        ("+14155550100", ("+1416",), False),
        ("+14155550100", ("+44", "+1415"), True),
        ("+14155550100", (), False),
        ("anonymous", ("+1", "+2", "+3", "+4", "+5", "+6", "+7", "+8", "+9"), False),
    ],
)
def test_matches_prefix_is_a_plain_starts_with_and_never_matches_anonymous(party, prefixes, expected):
    assert matches_prefix(party, prefixes) is expected


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("start", "end", "tz", "now", "expected"),
    [
        # start minute inclusive, end minute exclusive
        ("09:00", "17:00", "UTC", "2026-05-04T09:00:00", True),
        ("09:00", "17:00", "UTC", "2026-05-04T08:59:59.999", False),
        ("09:00", "17:00", "UTC", "2026-05-04T16:59:59.999", True),
        ("09:00", "17:00", "UTC", "2026-05-04T17:00:00", False),
        # end < start wraps midnight: 22:00 to 06:00
        ("22:00", "06:00", "UTC", "2026-05-04T22:00:00", True),
        ("22:00", "06:00", "UTC", "2026-05-04T21:59:00", False),
        ("22:00", "06:00", "UTC", "2026-05-04T23:59:59", True),
        ("22:00", "06:00", "UTC", "2026-05-05T00:00:00", True),
        ("22:00", "06:00", "UTC", "2026-05-05T05:59:00", True),
        ("22:00", "06:00", "UTC", "2026-05-05T06:00:00", False),
        ("22:00", "06:00", "UTC", "2026-05-05T12:00:00", False),
        # start == end: open all day
        ("00:00", "00:00", "UTC", "2026-05-04T03:17:00", True),
        # the local time is what counts: 09:00-17:00 in Warsaw is 07:00-15:00 UTC in summer (CEST)
        ("09:00", "17:00", "Europe/Warsaw", "2026-05-04T07:00:00", True),
        ("09:00", "17:00", "Europe/Warsaw", "2026-05-04T15:00:00", False),
        # ... and 08:00-16:00 UTC in winter (CET)
        ("09:00", "17:00", "Europe/Warsaw", "2026-03-28T07:00:00", False),  # 08:00 CET, the day before the change
        ("09:00", "17:00", "Europe/Warsaw", "2026-03-28T08:00:00", True),  # 09:00 CET
        # 2026-03-29: clocks go 02:00 CET -> 03:00 CEST at 01:00 UTC; that morning opens at 07:00 UTC
        ("09:00", "17:00", "Europe/Warsaw", "2026-03-29T06:59:00", False),  # 08:59 CEST
        ("09:00", "17:00", "Europe/Warsaw", "2026-03-29T07:00:00", True),  # 09:00 CEST
        ("09:00", "17:00", "Europe/Warsaw", "2026-03-29T14:59:00", True),  # 16:59 CEST
        ("09:00", "17:00", "Europe/Warsaw", "2026-03-29T15:00:00", False),  # 17:00 CEST
        # the skipped local hour [02:00, 03:00) never happens that night
        ("02:00", "03:00", "Europe/Warsaw", "2026-03-29T00:59:00", False),  # 01:59 CET
        ("02:00", "03:00", "Europe/Warsaw", "2026-03-29T01:00:00", False),  # 03:00 CEST
        # 2026-10-25: clocks go 03:00 CEST -> 02:00 CET at 01:00 UTC; the day opens at 08:00 UTC
        ("09:00", "17:00", "Europe/Warsaw", "2026-10-25T07:59:00", False),  # 08:59 CET
        ("09:00", "17:00", "Europe/Warsaw", "2026-10-25T08:00:00", True),  # 09:00 CET
        # the repeated local hour 02:00-03:00 is inside [02:00, 03:00) both times
        ("02:00", "03:00", "Europe/Warsaw", "2026-10-25T00:30:00", True),  # 02:30 CEST
        ("02:00", "03:00", "Europe/Warsaw", "2026-10-25T01:30:00", True),  # 02:30 CET
    ],
)
def test_within_hours_reads_local_time_start_inclusive_end_exclusive(start, end, tz, now, expected):
    assert within_hours(utc(now), start, end, tz) is expected


def test_outside_hours_decision_records_the_local_time_it_saw():
    state = line(hours=Hours(start="09:00", end="17:00", timezone="Europe/Warsaw"))
    result = decide(state, offer(), now=utc("2026-03-29T06:59:00"))
    assert outcome(result) == ("outside_hours", 480)
    assert result.decision.checks[-1].inputs == {"local_time": "08:59", "start": "09:00", "end": "17:00"}


# -- check 8: concurrency -------------------------------------------------------------


@pytest.mark.parametrize(
    ("cap", "events", "expected"),
    [
        pytest.param(2, [accepted("a")], ("accepted", None), id="one below the cap"),
        pytest.param(2, [accepted("a"), accepted("b")], ("busy", 486), id="exactly at the cap"),
        pytest.param(0, [], ("busy", 486), id="cap of zero"),
        pytest.param(2, [accepted("a"), accepted("b"), ended("a")], ("accepted", None), id="call.ended frees a slot"),
        pytest.param(2, [accepted("a"), accepted("b"), missed("b")], ("accepted", None), id="call.missed frees a slot"),
        pytest.param(2, [accepted("a"), accepted("b"), ended("zzz")], ("busy", 486), id="ending an unknown call frees nothing"),
        pytest.param(2, [accepted("a"), accepted("b"), ended("a", number=OTHER_NUMBER)], ("busy", 486), id="ending on another number frees nothing"),
        pytest.param(1, [accepted("a", number=OTHER_NUMBER)], ("accepted", None), id="another number's calls do not count"),
        pytest.param(1, [rejected("a")], ("accepted", None), id="a rejected call takes no slot"),
    ],
)
def test_busy_when_calls_in_progress_reach_max_concurrent_calls(cap, events, expected):
    state = fold(registered(), assigned(), registered(OTHER_NUMBER), assigned(number=OTHER_NUMBER), policy_set(max_concurrent_calls=cap), *events)
    assert outcome(decide(state, offer("new"), now=T0)) == expected


def test_decision_reports_active_calls_against_the_cap():
    state = line(accepted("a"), accepted("b"), max_concurrent_calls=2)
    check = decide(state, offer("new"), now=T0).decision.checks[-1]
    assert (check.name, check.passed, check.inputs) == ("concurrency", False, {"active": 2, "cap": 2})


# -- check 9: sliding windows ---------------------------------------------------------

S = timedelta(seconds=1)
MS = timedelta(milliseconds=1)


@pytest.mark.parametrize(
    ("policy", "admitted_ago", "expected"),
    [
        pytest.param({"max_calls_per_hour": 1}, [], ("accepted", None), id="hourly: nothing admitted"),
        pytest.param({"max_calls_per_hour": 1}, [3600 * S], ("accepted", None), id="hourly: exactly 3600 s ago no longer counts"),
        pytest.param({"max_calls_per_hour": 1}, [3600 * S - MS], ("hourly_limit", 503), id="hourly: 3599.999 s ago still counts"),
        pytest.param({"max_calls_per_hour": 2}, [3600 * S, 10 * S], ("accepted", None), id="hourly: one in, one just out"),
        pytest.param({"max_calls_per_hour": 2}, [3599 * S, 10 * S], ("hourly_limit", 503), id="hourly: exactly at the limit"),
        pytest.param({"max_calls_per_hour": 0}, [], ("hourly_limit", 503), id="hourly: limit of zero"),
        pytest.param({"max_calls_per_day": 1}, [86400 * S], ("accepted", None), id="daily: exactly 86400 s ago no longer counts"),
        pytest.param({"max_calls_per_day": 1}, [86400 * S - MS], ("daily_limit", 503), id="daily: 86399.999 s ago still counts"),
        pytest.param({"max_calls_per_day": 2}, [86399 * S, 1 * S], ("daily_limit", 503), id="daily: exactly at the limit"),
        pytest.param({"max_calls_per_hour": 5, "max_calls_per_day": 2}, [7200 * S, 3700 * S], ("daily_limit", 503), id="daily limit hit while the hour is clear"),
    ],
)
def test_hourly_and_daily_limits_count_admissions_in_a_sliding_window(policy, admitted_ago, expected):
    admissions = [accepted(f"old_{i}", when=T0 - ago) for i, ago in enumerate(admitted_ago)]
    state = line(*admissions, **policy)
    assert outcome(decide(state, offer("new"), now=T0)) == expected


def test_ended_calls_still_count_toward_the_hourly_window():
    state = line(accepted("a", when=T0 - 60 * S), ended("a"), max_calls_per_hour=1)
    assert outcome(decide(state, offer("new"), now=T0)) == ("hourly_limit", 503)


@given(
    ages_ms=st.lists(st.integers(min_value=0, max_value=2 * 86_400_000), max_size=40),
    span_s=st.sampled_from([3600, 86400]),
)
def test_admitted_within_counts_exactly_the_half_open_window(ages_ms, span_s):
    times = deque(sorted((T0 - timedelta(milliseconds=a), f"call_{i}") for i, a in enumerate(ages_ms)))
    span = timedelta(seconds=span_s)
    brute_force = sum(1 for t, _ in times if T0 - span < t <= T0)
    assert admitted_within(times, T0, span) == brute_force


# -- precedence -----------------------------------------------------------------------

ALL_FAIL = {
    "allowed_cidrs": ("192.168.0.0/16",),
    "blocked_prefixes": ("+1",),
    "allowed_prefixes": ("+48",),
    "media_encryption": "required",
    "hours": Hours(start="13:00", end="14:00"),
    "max_concurrent_calls": 0,
    "max_calls_per_hour": 0,
    "max_calls_per_day": 0,
}


def without(*names: str) -> dict:
    return {k: v for k, v in ALL_FAIL.items() if k not in names}


@pytest.mark.parametrize(
    ("events", "policy", "expected"),
    [
        pytest.param([registered()], ALL_FAIL, ("no_agent", 480), id="no agent before any policy rule"),
        pytest.param([registered(), assigned()], ALL_FAIL, ("source_ip_not_allowed", 403), id="blocked caller from a disallowed ip"),
        pytest.param([registered(), assigned()], without("allowed_cidrs"), ("caller_blocked", 403), id="blocked before not allowed"),
        pytest.param([registered(), assigned()], {"blocked_prefixes": ("+1415",), "allowed_prefixes": ("+1",)}, ("caller_blocked", 403), id="blocked wins over allowed"),
        pytest.param([registered(), assigned()], without("allowed_cidrs", "blocked_prefixes"), ("caller_not_allowed", 403), id="not allowed before encryption"),
        pytest.param([registered(), assigned()], without("allowed_cidrs", "blocked_prefixes", "allowed_prefixes"), ("encryption_required", 488), id="encryption before hours"),
        pytest.param([registered(), assigned()], without("allowed_cidrs", "blocked_prefixes", "allowed_prefixes", "media_encryption"), ("outside_hours", 480), id="hours before busy"),
        pytest.param([registered(), assigned()], {"max_concurrent_calls": 0, "max_calls_per_hour": 0, "max_calls_per_day": 0}, ("busy", 486), id="busy before the windows"),
        pytest.param([registered(), assigned()], {"max_calls_per_hour": 0, "max_calls_per_day": 0}, ("hourly_limit", 503), id="hourly before daily"),
    ],
)
def test_first_failing_check_in_spec_order_decides(events, policy, expected):
    state = fold(*events, policy_set(**policy))
    assert outcome(decide(state, offer(from_="+14155550100", source_ip="10.0.0.5"), now=T0)) == expected


# -- the decision explains itself ----------------------------------------------------


def checks_of(result) -> list[tuple[str, bool]]:
    return [(c.name, c.passed) for c in result.decision.checks]


@pytest.mark.parametrize(
    ("events", "offer_kwargs", "expected_version", "expected_checks"),
    [
        pytest.param([], {}, 0, [("registered", False)], id="unknown number"),
        pytest.param([registered()], {}, 0, [("registered", True), ("agent_assigned", False)], id="no agent"),
        pytest.param(
            [registered(), assigned(), policy_set(7, allowed_cidrs=("10.0.0.0/8",), blocked_prefixes=("+1",), media_encryption="required")],
            {"from_": "+48600100200", "srtp": False},
            7,
            [("registered", True), ("agent_assigned", True), ("source_ip", True), ("blocked_prefixes", True), ("media_encryption", False)],
            id="stops at the failing check",
        ),
        pytest.param(
            [registered(), assigned(), policy_set(3, allowed_cidrs=("10.0.0.0/8",), hours=Hours(start="09:00", end="17:00"), max_calls_per_day=5)],
            {},
            3,
            [("registered", True), ("agent_assigned", True), ("source_ip", True), ("hours", True), ("daily_window", True)],
            id="accepted: every configured check passed",
        ),
        pytest.param([registered(), assigned()], {}, 0, [("registered", True), ("agent_assigned", True)], id="accepted without a policy"),
    ],
)
def test_decision_records_policy_version_and_checks_up_to_the_failure(events, offer_kwargs, expected_version, expected_checks):
    result = decide(fold(*events), offer(**offer_kwargs), now=T0)
    assert result.decision.policy_version == expected_version
    assert checks_of(result) == expected_checks


def test_accepted_call_carries_the_system_dynamic_variables():
    result = decide(line(), offer("call_42", from_="+14155550100"), now=datetime(2026, 5, 4, 12, 0, 1, 250_000, tzinfo=UTC))
    assert isinstance(result, CallAccepted)
    assert result.dynamic_variables == {
        "system__caller_id": "+14155550100",
        "system__called_number": NUMBER,
        "system__call_sid": "call_42",
        "system__agent_id": AGENT,
        "system__time_utc": "2026-05-04T12:00:01.250Z",
    }


@pytest.mark.parametrize(
    ("events", "policy"),
    [
        pytest.param([registered(), assigned()], {}, id="accepted"),
        pytest.param([registered(), assigned()], {"blocked_prefixes": ("+1",)}, id="rejected"),
        pytest.param([], None, id="unknown number"),
    ],
)
def test_decision_event_id_is_derived_deterministically_from_the_offer(events, policy):
    def state() -> State:
        return fold(*events, *([policy_set(**policy)] if policy is not None else []))

    first = decide(state(), offer("call_1", event_id="offer-abc"), now=T0)
    again = decide(state(), offer("call_1", event_id="offer-abc"), now=T0)
    other = decide(state(), offer("call_1", event_id="offer-xyz"), now=T0)
    assert first.event_id == again.event_id
    assert first == again
    assert first.event_id != other.event_id
    assert first.event_id not in ("offer-abc", "offer-xyz")


def test_decision_is_stamped_with_now_and_names_the_call():
    now = datetime(2026, 5, 4, 12, 30, tzinfo=UTC)
    result = decide(line(blocked_prefixes=("+1",)), offer("call_7"), now=now)
    assert (result.call_id, result.number, result.occurred_at) == ("call_7", NUMBER, "2026-05-04T12:30:00.000Z")


# -- bugs found ----------------------------------------------------------------------


def test_folding_the_same_acceptance_twice_counts_one_admission():
    acceptance = accepted("a", when=T0 - 60 * S)
    state = line(acceptance, acceptance, max_calls_per_hour=2)
    assert outcome(decide(state, offer("new"), now=T0)) == ("accepted", None)


def test_redelivered_offer_after_its_acceptance_gives_the_same_decision():
    state = line(max_concurrent_calls=1)
    first = decide(state, offer("call_1"), now=T0)
    evolve(state, first)
    again = decide(state, offer("call_1"), now=T0)
    assert again == first


def test_malformed_cidr_in_policy_refuses_instead_of_raising():
    state = line(allowed_cidrs=("10.0.0.0/33",))
    assert outcome(decide(state, offer(), now=T0)) == ("source_ip_not_allowed", 403)


# -- invariant: never more admitted calls in progress than the cap ---------------------

operations = st.lists(
    st.one_of(
        st.just(("offer", 0)),
        st.tuples(st.sampled_from(["end", "miss"]), st.integers(min_value=0, max_value=25)),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(cap=st.integers(min_value=0, max_value=5), ops=operations)
def test_calls_in_progress_never_exceed_the_cap_and_match_a_brute_force_model(cap, ops):
    state = line(max_concurrent_calls=cap)
    active: set[str] = set()  # the model: call ids admitted and not yet ended or missed
    offered = 0
    for op, index in ops:
        if op == "offer":
            call_id = f"call_{offered}"
            offered += 1
            result = decide(state, offer(call_id), now=T0)
            evolve(state, result)
            expect_admitted = len(active) < cap
            assert isinstance(result, CallAccepted) is expect_admitted
            if expect_admitted:
                active.add(call_id)
        else:
            call_id = f"call_{index}"
            evolve(state, ended(call_id) if op == "end" else missed(call_id))
            active.discard(call_id)
        in_progress = set(state.lines[NUMBER].active)
        assert in_progress == active
        assert len(in_progress) <= cap


def test_an_unknown_timezone_in_opening_hours_refuses_instead_of_raising():
    state = line(hours=Hours(start="09:00", end="17:00", timezone="Europe/Atlantis"))
    result = decide(state, offer(), now=T0)
    assert outcome(result) == ("outside_hours", 480)
    assert "unknown timezone" in result.decision.checks[-1].inputs["error"]


# -- the core's fast timestamp formatting and parsing equal the wire's own ---------------


@given(
    st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.timezones()),
)
@settings(max_examples=300)
def test_the_cores_timestamps_are_the_wires_timestamps(when: datetime) -> None:
    from schemas import parse_timestamp
    from services.gatekeeper.core import _parse_timestamp, _timestamp

    text = timestamp(when)
    assert _timestamp(when) == text
    assert _parse_timestamp(text) == parse_timestamp(text)
    assert _parse_timestamp(text).tzinfo == parse_timestamp(text).tzinfo


def test_a_naive_now_is_refused_not_read_as_local_time() -> None:
    from services.gatekeeper.core import _timestamp

    with pytest.raises(ValueError, match="aware"):
        _timestamp(datetime(2026, 5, 4, 12, 0))
