"""Spike detection as pure functions: "more than X calls within Y minutes", with hysteresis."""

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
from services.fraud.core import State, evolve, observe

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
