"""call_spike as pure functions: "more than X calls within Y minutes" per number, with hysteresis,
and the evidence every alert carries."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas import (
    CallOffered,
    FraudAlert,
    FraudAlertPolicy,
    NumberPolicySet,
    NumberRegistered,
    NumberUnregistered,
    SecurityPolicy,
    timestamp,
)
from services.fraud.core import (
    AccountSpike,
    BaselineJump,
    Detectors,
    IrsfDestination,
    ScannerSweep,
    State,
    evolve,
    horizon,
)
from services.fraud.core import observe as observe_all

# Only the rule under test, so other detectors' defaults cannot interfere.
ONLY_SPIKE = Detectors(
    scanner_sweep=ScannerSweep(enabled=False),
    account_spike=AccountSpike(enabled=False),
    irsf_destination=IrsfDestination(enabled=False),
    baseline_jump=BaselineJump(enabled=False),
)


def observe(state: State, offer: CallOffered) -> FraudAlert | None:
    alerts = observe_all(state, offer, ONLY_SPIKE)
    assert len(alerts) <= 1
    return alerts[0] if alerts else None

NUMBER = "+48123456789"
ACCOUNT = "acct_1"
T0 = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)
CALLS, WINDOW_MIN = 3, 10  # alert on more than 3 offers within 10 minutes

_ids = itertools.count(1)


def _stamp() -> dict:
    return {"event_id": f"ev-{next(_ids)}", "occurred_at": timestamp(T0)}


def registered(number: str = NUMBER) -> NumberRegistered:
    return NumberRegistered(**_stamp(), number=number, number_id="pn_1", account_id=ACCOUNT, provider="twilio")


def policy_set(fraud_alert: FraudAlertPolicy | None, version: int = 1, number: str = NUMBER, **policy) -> NumberPolicySet:
    return NumberPolicySet(
        **_stamp(), number=number, policy=SecurityPolicy(fraud_alert=fraud_alert, **policy), policy_version=version
    )


def spike_policy(calls: int = CALLS, window_minutes: int = WINDOW_MIN) -> FraudAlertPolicy:
    return FraudAlertPolicy(calls=calls, window_minutes=window_minutes, email="ops@example.com")


def offered(at: datetime, call_id: str | None = None, number: str = NUMBER, event_id: str | None = None) -> CallOffered:
    call_id = call_id or f"call_{next(_ids)}"
    return CallOffered(
        event_id=event_id or f"offer-{call_id}",
        occurred_at=timestamp(at),
        call_id=call_id,
        to=number,
        from_="+14155550100",
    )


def watched(*events) -> State:
    state = State()
    for event in (registered(), *events):
        evolve(state, event)
    return state


def watched_with_spike_policy(calls: int = CALLS, window_minutes: int = WINDOW_MIN) -> State:
    return watched(policy_set(spike_policy(calls, window_minutes)))


def feed(state: State, offsets: list[timedelta]) -> list[FraudAlert | None]:
    return [observe(state, offered(T0 + offset)) for offset in offsets]


M = timedelta(minutes=1)
S = timedelta(seconds=1)
MS = timedelta(milliseconds=1)


@pytest.mark.parametrize(
    ("offsets", "alerting"),
    [
        pytest.param([0 * M, 1 * M, 2 * M], [], id="exactly X offers do not alert"),
        pytest.param([0 * M, 1 * M, 2 * M, 3 * M], [3], id="X+1 offers alert once"),
        pytest.param([0 * S, 0 * S, 0 * S, 0 * S], [3], id="X+1 offers at the same instant alert"),
        pytest.param([0 * M, 1 * M, 2 * M, 3 * M, 4 * M, 5 * M], [3], id="further offers in the episode do not alert again"),
        pytest.param([0 * M, 2 * M, 4 * M, 6 * M, 8 * M] + [n * 2 * M for n in range(5, 30)], [3], id="steady traffic above the threshold alerts once"),
        pytest.param([0 * M, 1 * M, 2 * M, 10 * M], [], id="offer exactly Y minutes older than the newest no longer counts"),
        pytest.param([0 * M, 1 * M, 2 * M, 10 * M - MS], [3], id="offer Y minutes minus 1 ms older still counts"),
        pytest.param([0 * M, 4 * M, 8 * M, 12 * M, 16 * M, 20 * M], [], id="spaced-out traffic never alerts"),
        pytest.param(
            [0 * M, 1 * M, 2 * M, 3 * M, 30 * M, 31 * M, 32 * M, 33 * M],
            [3, 7],
            id="a new burst after the count fell back alerts again",
        ),
        pytest.param(
            # after the alert at 3 min, at 11.5 min the window (1.5, 11.5] holds 2, 3, 11.5: exactly X, re-armed
            [0 * M, 1 * M, 2 * M, 3 * M, 11 * M + 30 * S, 11 * M + 36 * S],
            [3, 5],
            id="falling back to exactly X re-arms",
        ),
        pytest.param(
            # at 10.5 min the window (0.5, 10.5] holds 1, 2, 3, 10.5: still X+1, same episode
            [0 * M, 1 * M, 2 * M, 3 * M, 10 * M + 30 * S, 10 * M + 40 * S],
            [3],
            id="a partial fall that stays above X does not re-arm",
        ),
    ],
)
def test_more_than_x_offers_within_y_minutes_alert_once_per_episode(offsets, alerting):
    alerts = feed(watched_with_spike_policy(), offsets)
    assert [i for i, alert in enumerate(alerts) if alert is not None] == alerting


def test_alert_names_count_threshold_window_and_first_and_last_offer():
    state = watched_with_spike_policy()
    alerts = feed(state, [0 * M, 1 * M, 2 * M, 3 * M + 500 * MS])
    alert = alerts[-1]
    assert isinstance(alert, FraudAlert)
    assert (alert.number, alert.account_id, alert.rule) == (NUMBER, ACCOUNT, "call_spike")
    assert (alert.count, alert.threshold, alert.window_s) == (CALLS + 1, CALLS, WINDOW_MIN * 60)
    assert alert.first_at == timestamp(T0)
    assert alert.last_at == timestamp(T0 + 3 * M + 500 * MS)
    assert alert.occurred_at == alert.last_at


def test_first_at_is_the_oldest_offer_still_in_the_window():
    state = watched_with_spike_policy()
    alerts = feed(state, [0 * M, 9 * M, 10 * M, 11 * M, 12 * M])  # at 12 min the 0-min offer has left
    assert [a is not None for a in alerts] == [False, False, False, False, True]
    assert alerts[-1].first_at == timestamp(T0 + 9 * M)
    assert alerts[-1].count == 4


@pytest.mark.parametrize(
    "events",
    [
        pytest.param([], id="registered, no policy"),
        pytest.param([policy_set(None, max_concurrent_calls=2)], id="a policy without fraud_alert"),
        pytest.param([policy_set(spike_policy()), policy_set(None, version=2)], id="fraud_alert removed"),
        pytest.param([policy_set(spike_policy()), NumberUnregistered(**_stamp(), number=NUMBER)], id="number unregistered"),
    ],
)
def test_numbers_without_a_fraud_alert_policy_never_alert(events):
    state = watched(*events)
    assert feed(state, [n * S for n in range(50)]) == [None] * 50


def test_unregistered_numbers_never_alert():
    state = watched_with_spike_policy()
    other = "+48987654321"
    assert [observe(state, offered(T0 + n * S, number=other)) for n in range(10)] == [None] * 10


def test_offers_to_one_number_do_not_count_toward_another():
    state = State()
    for event in (registered(), registered("+48987654321"), policy_set(spike_policy()), policy_set(spike_policy(), number="+48987654321")):
        evolve(state, event)
    alerts = [observe(state, offered(T0 + n * S, number=NUMBER if n % 2 else "+48987654321")) for n in range(6)]
    assert alerts == [None] * 6  # three offers each: at the threshold, not above it


def test_policy_change_applies_a_new_threshold_to_later_offers():
    state = watched_with_spike_policy(calls=10)
    assert feed(state, [0 * S, 1 * S, 2 * S]) == [None] * 3
    evolve(state, policy_set(spike_policy(calls=2), version=2))
    alert = feed(state, [3 * S])[0]
    assert alert is not None and (alert.count, alert.threshold) == (4, 2)


def test_alert_event_id_is_derived_deterministically_from_the_offer():
    def alert_for(event_id: str) -> FraudAlert | None:
        state = watched_with_spike_policy()
        feed(state, [0 * M, 1 * M, 2 * M])
        return observe(state, offered(T0 + 3 * M, call_id="call_x", event_id=event_id))

    first, again, other = alert_for("offer-abc"), alert_for("offer-abc"), alert_for("offer-xyz")
    assert first is not None and again is not None and other is not None
    assert first.event_id == again.event_id
    assert first.event_id != other.event_id
    assert first.event_id != "offer-abc"


@given(
    gaps_ms=st.lists(st.integers(min_value=0, max_value=5 * 60_000), min_size=1, max_size=60),
    calls=st.integers(min_value=1, max_value=5),
    window_minutes=st.integers(min_value=1, max_value=5),
)
def test_alerts_exactly_when_the_window_count_crosses_the_threshold(gaps_ms, calls, window_minutes):
    times = list(itertools.accumulate(timedelta(milliseconds=g) for g in gaps_ms))
    window = timedelta(minutes=window_minutes)
    state = watched_with_spike_policy(calls, window_minutes)
    previous_count = 0
    for i, offset in enumerate(times):
        alert = observe(state, offered(T0 + offset))
        in_window = [t for t in times[: i + 1] if offset - window < t <= offset]  # brute force
        crossed = len(in_window) > calls and previous_count <= calls
        assert (alert is not None) is crossed
        if alert is not None:
            assert alert.count == len(in_window)
            assert alert.first_at == timestamp(T0 + in_window[0])
        previous_count = len(in_window)


# -- evidence ------------------------------------------------------------------------


def offer_from(at: datetime, caller: str, ip: str, call_id: str) -> CallOffered:
    return CallOffered(
        event_id=f"offer-{call_id}", occurred_at=timestamp(at), call_id=call_id, to=NUMBER, from_=caller, source_ip=ip
    )


def test_alert_evidence_names_first_and_last_call_top_sources_and_caller_prefixes():
    state = watched(policy_set(spike_policy(calls=6)))
    calls = [
        ("+442071234567", "203.0.113.9"),
        ("+442079999999", "198.51.100.7"),
        ("anonymous", "198.51.100.7"),
        ("+14155550100", "203.0.113.9"),
        ("+442070000000", "192.0.2.1"),
        ("anonymous", "198.51.100.7"),
        ("+33123456789", ""),  # no source IP: not a tally
    ]
    alerts = [observe(state, offer_from(T0 + n * S, caller, ip, f"c{n}")) for n, (caller, ip) in enumerate(calls)]
    alert = alerts[-1]
    assert alerts[:-1] == [None] * 6 and alert is not None
    ev = alert.evidence
    assert (ev.first_call_id, ev.last_call_id) == ("c0", "c6")
    assert [(t.value, t.count) for t in ev.top_source_ips] == [("198.51.100.7", 3), ("203.0.113.9", 2), ("192.0.2.1", 1)]
    assert [(t.value, t.count) for t in ev.top_caller_prefixes] == [
        ("+4420", 3),
        ("anonymous", 2),
        ("+1415", 1),  # ties ordered by value
        ("+3312", 1),
    ]
    assert alert.summary == f"7 calls to {NUMBER} within 10 min (threshold 6)"


def test_evidence_keeps_the_top_five_with_ties_broken_by_value():
    state = watched(policy_set(spike_policy(calls=6)))
    ips = ["10.0.0.7", "10.0.0.3", "10.0.0.9", "10.0.0.1", "10.0.0.5", "10.0.0.2", "10.0.0.8"]
    alerts = [observe(state, offer_from(T0 + n * S, "anonymous", ip, f"c{n}")) for n, ip in enumerate(ips)]
    assert [t.value for t in alerts[-1].evidence.top_source_ips] == sorted(ips)[:5]


def test_outbound_offers_count_for_the_calling_number_and_tally_the_destination():
    state = watched_with_spike_policy(calls=1)
    out = [
        CallOffered(
            event_id=f"o{n}", occurred_at=timestamp(T0 + n * S), call_id=f"o{n}", direction="outbound",
            to="+33612345678", from_=NUMBER,
        )
        for n in range(2)
    ]  # fmt: skip
    alerts = [observe(state, o) for o in out]
    assert alerts[0] is None and alerts[1] is not None
    assert alerts[1].number == NUMBER
    assert [(t.value, t.count) for t in alerts[1].evidence.top_caller_prefixes] == [("+3361", 2)]


# -- late and repeated offers ------------------------------------------------------------


@pytest.mark.parametrize(
    ("offsets", "alerting"),
    [
        pytest.param([5 * M, 6 * M, 7 * M, 1 * M], [3], id="a late offer still inside the window counts"),
        pytest.param([11 * M, 12 * M, 13 * M, 3 * M], [], id="a late offer exactly one window older is ignored"),
        pytest.param([11 * M, 12 * M, 13 * M, 3 * M + MS], [3], id="a late offer 1 ms inside counts"),
        pytest.param([11 * M, 12 * M, 13 * M, 1 * M, 13 * M], [4], id="an ignored late offer leaves the count as it was"),
    ],
)
def test_late_offers_count_only_inside_the_window_of_the_newest_offer(offsets, alerting):
    alerts = feed(watched_with_spike_policy(), offsets)
    assert [i for i, alert in enumerate(alerts) if alert is not None] == alerting


def test_a_late_crossing_alert_spans_the_window_in_time_order():
    state = watched_with_spike_policy()
    alerts = feed(state, [5 * M, 6 * M, 7 * M, 1 * M])
    assert alerts[-1].first_at == timestamp(T0 + 1 * M)
    assert alerts[-1].last_at == timestamp(T0 + 7 * M)


def test_a_redelivered_offer_is_not_counted_twice():
    state = watched_with_spike_policy()
    offers = [offered(T0 + n * S, call_id=f"c{n}") for n in range(3)]
    assert [observe(state, o) for o in offers + offers] == [None] * 6
    assert observe(state, offered(T0 + 4 * S, call_id="c3")) is not None


# -- replay from the horizon ---------------------------------------------------------------


def test_a_replay_from_the_horizon_keeps_an_episode_decided_before_it():
    """Offers to the number at 0 and 1.5 min (X = 1, Y = 2 min: an alert at 1.5), then another
    number's offer at 2.5 min is the last processed before a restart. The episode at 1.5 was
    decided over (-0.5, 1.5], so a replay must reach 2 windows back, not 1: else the offer at
    3 min, still in that episode, would alert a second time."""
    other = "+48987654321"

    def events():
        state = State()
        for event in (registered(), registered(other), policy_set(spike_policy(calls=1, window_minutes=2))):
            evolve(state, event)
        return state

    offers = [offered(T0, "a1"), offered(T0 + 90 * S, "a2"), offered(T0 + 150 * S, "b1", number=other)]
    live = events()
    assert [len(observe_all(live, o, ONLY_SPIKE)) for o in offers] == [0, 1, 0]
    replayed = events()
    since = T0 + 150 * S - horizon(ONLY_SPIKE, replayed)
    assert since <= T0 - 90 * S  # two windows
    for o in offers:
        if datetime.fromisoformat(o.occurred_at) >= since:
            observe_all(replayed, o, ONLY_SPIKE)
    later = offered(T0 + 180 * S, "a3")
    assert observe_all(live, later, ONLY_SPIKE) == observe_all(replayed, later, ONLY_SPIKE) == []
