"""Spike detection, as pure functions: "more than X calls within Y minutes" per number,
over an exact sliding window on event time, with hysteresis: one alert per episode,
and no new alert until the count has fallen back to the threshold or below."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from schemas import (
    AnyEvent,
    CallOffered,
    FraudAlert,
    FraudAlertPolicy,
    NumberPolicySet,
    NumberRegistered,
    NumberUnregistered,
    derived_id,
    parse_timestamp,
    timestamp,
)

RULE_SPIKE = "call_spike"


@dataclass
class Watch:
    account_id: str
    policy: FraudAlertPolicy | None = None
    offers: deque[datetime] = field(default_factory=deque)  # offer times inside the window
    in_episode: bool = False


@dataclass
class State:
    watches: dict[str, Watch] = field(default_factory=dict)  # by number


def evolve(state: State, event: AnyEvent) -> State:
    match event:
        case NumberRegistered(number=n, account_id=a):
            state.watches.setdefault(n, Watch(account_id=a))
        case NumberPolicySet(number=n, policy=p) if n in state.watches:
            state.watches[n].policy = p.fraud_alert
        case NumberUnregistered(number=n):
            state.watches.pop(n, None)
    return state


def observe(state: State, offer: CallOffered) -> FraudAlert | None:
    """Count one offered call (admitted or not: an attack is traffic) and maybe alert."""
    watch = state.watches.get(offer.number)
    if watch is None or watch.policy is None:
        return None
    at = parse_timestamp(offer.occurred_at)
    window = timedelta(minutes=watch.policy.window_minutes)
    watch.offers.append(at)
    while watch.offers and watch.offers[0] <= at - window:
        watch.offers.popleft()
    count, threshold = len(watch.offers), watch.policy.calls
    if count <= threshold:
        watch.in_episode = False
        return None
    if watch.in_episode:
        return None
    watch.in_episode = True
    return FraudAlert(
        event_id=derived_id(offer.event_id, RULE_SPIKE),
        occurred_at=timestamp(at),
        number=offer.number,
        account_id=watch.account_id,
        rule=RULE_SPIKE,
        count=count,
        threshold=threshold,
        window_s=int(window.total_seconds()),
        first_at=timestamp(watch.offers[0]),
        last_at=timestamp(at),
    )
