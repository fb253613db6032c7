"""Fraud detection as pure functions over events: no I/O, no clock (time is each event's
occurred_at), alert ids derived from the crossing offer's id, so replaying the same events
into a fresh State gives the same state and the same alerts.

    state = State()
    evolve(state, event)                     number.* events: the directory and policies
    alerts = observe(state, offer, detectors)   every call.offered, admitted or not
    horizon(detectors, state)                how far before the last processed offer a replay
                                             must start to rebuild every window

Detectors, each with its own `rule` in fraud.alert, each switched by `Detectors`:

    call_spike        more than X offers within Y minutes to one number (its fraud_alert policy)

Windows: exact sliding windows on event time, (newest - span, newest]: an offer exactly one
span older than the newest offer of its window no longer counts. Each window keeps its own
clock (the newest offer it has seen), so one offer with a skewed clock cannot blind others.

Hysteresis: one alert per episode. An alert fires when an offer makes the count exceed the
threshold while the window is not in an episode; the episode lasts while the count observed
at each offer (that offer included) stays above the threshold, and ends when an offer
observes the count at or below it, or finds the window empty (for a threshold of 0).

Late offers (older than the newest offer of their window): counted in time order if still
inside the window (the window is evaluated at its newest offer, never moved back), ignored
by that window otherwise.

A window only ever needs its newest threshold + 1 offers to decide "more than threshold",
so it keeps no more than that: memory is bounded by thresholds, not by attack traffic.
The count at a crossing is exactly threshold + 1 (one offer raises it by one), and the
evidence covers exactly the offers in the window. (Right after a policy change lowered a
threshold below the traffic, the count is that of the offers kept under the old threshold,
plus one: a lower bound, still above the new threshold.)
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated

import msgspec
from msgspec import Meta

from schemas import (
    HIGH_RISK_PREFIXES,
    AlertEvidence,
    AnyEvent,
    CallOffered,
    FraudAlert,
    FraudAlertPolicy,
    NumberPolicySet,
    NumberRegistered,
    NumberUnregistered,
    Tally,
    derived_id,
    timestamp,
)

RULE_SPIKE = "call_spike"
RULE_SCANNER = "scanner_sweep"
RULE_ACCOUNT = "account_spike"
RULE_IRSF = "irsf_destination"
RULE_BASELINE = "baseline_jump"

TOP = 5  # tallies per evidence list
MINUTE_MS = 60_000
# Offers remembered by call id, so a redelivered call.offered is not counted twice.
REMEMBERED_CALLS = 100_000

# Case-insensitive substrings of the User-Agent of well-known SIP scanners and war diallers.
SCANNER_USER_AGENTS: tuple[str, ...] = (
    "friendly-scanner", "sipvicious", "sipcli", "sip-scan", "sipsak", "sundayddr",
    "vaxsipuseragent", "iwar", "sipptk", "smap", "pplsip", "sip-cli", "masscan",
)  # fmt: skip

# -- configuration -----------------------------------------------------------------

PositiveInt = Annotated[int, Meta(gt=0)]
NonNegativeInt = Annotated[int, Meta(ge=0)]


class CallSpike(msgspec.Struct, frozen=True, kw_only=True):
    enabled: bool = True  # threshold and window come from each number's fraud_alert policy


class ScannerSweep(msgspec.Struct, frozen=True, kw_only=True):
    enabled: bool = True
    distinct_numbers: PositiveInt = 10  # alert when one source IP reaches this many numbers ...
    window_s: PositiveInt = 60  # ... within this many seconds
    user_agents: tuple[str, ...] = SCANNER_USER_AGENTS  # or any offer from a scanner (substring)


class AccountSpike(msgspec.Struct, frozen=True, kw_only=True):
    enabled: bool = True
    calls: NonNegativeInt = 500  # alert on more than this many offers across an account's numbers ...
    window_minutes: PositiveInt = 5  # ... within this many minutes


class IrsfDestination(msgspec.Struct, frozen=True, kw_only=True):
    enabled: bool = True
    calls: NonNegativeInt = 0  # alert on more than this many outbound offers to high-risk ranges ...
    window_minutes: PositiveInt = 60  # ... within this many minutes, per account
    prefixes: tuple[str, ...] = HIGH_RISK_PREFIXES  # destination ranges that count


class BaselineJump(msgspec.Struct, frozen=True, kw_only=True):
    enabled: bool = True
    z_score: Annotated[float, Meta(gt=0)] = 4.0  # alert when this minute's count is this many deviations up ...
    min_calls: PositiveInt = 10  # ... and at least this many calls in the minute ...
    warmup_minutes: NonNegativeInt = 15  # ... once the detector has watched this many minutes
    alpha: Annotated[float, Meta(gt=0, le=1)] = 0.1  # EWMA weight of the newest minute


class Detectors(msgspec.Struct, frozen=True, kw_only=True):
    """Which detectors run and how; the service maps its environment onto this once."""

    call_spike: CallSpike = CallSpike()
    scanner_sweep: ScannerSweep = ScannerSweep()
    account_spike: AccountSpike = AccountSpike()
    irsf_destination: IrsfDestination = IrsfDestination()
    baseline_jump: BaselineJump = BaselineJump()


DEFAULT_DETECTORS = Detectors()

# -- state -------------------------------------------------------------------------

# One offer as the windows keep it: (time in ms since the epoch, call id, source IP,
# remote-party prefix, our number). Shared by every window the offer lands in.
Entry = tuple[int, str, str, str, str]


@dataclass(slots=True)
class Window:
    """The newest offers of one sliding window, oldest first, and its episode flag."""

    entries: deque[Entry] = field(default_factory=deque)
    newest: int = -(2**62)  # ms of the newest offer seen: the window's own clock
    in_episode: bool = False
    threshold: int = 0  # the threshold of the last offer: how many offers are kept


@dataclass(slots=True)
class NumberInfo:
    account_id: str
    policy: FraudAlertPolicy | None = None
    spike: Window = field(default_factory=Window)


@dataclass
class State:
    numbers: dict[str, NumberInfo] = field(default_factory=dict)  # the directory, by number
    seen: OrderedDict[str, None] = field(default_factory=OrderedDict)  # recent call ids
    newest: int = -(2**62)  # ms of the newest offer seen by any window


def evolve(state: State, event: AnyEvent) -> State:
    match event:
        case NumberRegistered(number=n, account_id=a):
            info = state.numbers.get(n)
            if info is None or info.account_id != a:
                state.numbers[n] = NumberInfo(account_id=a)
        case NumberPolicySet(number=n, policy=p) if n in state.numbers:
            state.numbers[n].policy = p.fraud_alert
        case NumberUnregistered(number=n):
            state.numbers.pop(n, None)
    return state


# -- observe -----------------------------------------------------------------------


def observe(state: State, offer: CallOffered, detectors: Detectors = DEFAULT_DETECTORS) -> list[FraudAlert]:
    """Count one offered call (admitted or not: an attack is traffic); the alerts it raises."""
    if offer.call_id in state.seen:
        return []  # a redelivery: already counted
    state.seen[offer.call_id] = None
    if len(state.seen) > REMEMBERED_CALLS:
        state.seen.popitem(last=False)
    at = to_ms(offer.occurred_at)
    if at > state.newest:
        state.newest = at
    number = offer.number
    entry: Entry = (at, offer.call_id, offer.source_ip, remote_prefix(offer), number)
    info = state.numbers.get(number)
    alerts: list[FraudAlert] = []
    if info is not None:
        if detectors.call_spike.enabled and info.policy is not None:
            alert = _call_spike(info, entry, offer)
            if alert is not None:
                alerts.append(alert)
    return alerts


def _call_spike(info: NumberInfo, entry: Entry, offer: CallOffered) -> FraudAlert | None:
    policy = info.policy
    assert policy is not None
    span, threshold = policy.window_minutes * MINUTE_MS, policy.calls
    if not slide(info.spike, entry, span, threshold):
        return None
    entries = info.spike.entries
    count = len(entries)
    return _alert(
        offer,
        RULE_SPIKE,
        info.account_id,
        entries,
        count=count,
        threshold=threshold,
        span=span,
        summary=f"{count} calls to {offer.number} within {_span(span)} (threshold {threshold})",
    )


def slide(window: Window, entry: Entry, span: int, threshold: int) -> bool:
    """Add one offer to a window of `span` ms; True when it starts an episode (alert)."""
    at = entry[0]
    if at <= window.newest - span:
        return False  # too late: already outside the window, which never moves back
    if at > window.newest:
        window.newest = at
    entries = window.entries
    edge = window.newest - span
    while entries and entries[0][0] <= edge:
        entries.popleft()
    if not entries:
        window.in_episode = False  # the window emptied: whatever episode there was is over
    keep = max(threshold, window.threshold)  # a lowered threshold trims after this offer
    while len(entries) > keep:
        entries.popleft()  # with this offer, the newest threshold + 1 decide "more than threshold"
    window.threshold = threshold
    if not entries or at >= entries[-1][0]:
        entries.append(entry)
    else:  # late but inside: insert in time order (after offers of the same ms)
        i = len(entries)
        while i > 0 and entries[i - 1][0] > at:
            i -= 1
        entries.insert(i, entry)
    above = len(entries) > threshold
    crossed = above and not window.in_episode
    window.in_episode = above
    return crossed


# -- evidence ----------------------------------------------------------------------


def _alert(
    offer: CallOffered,
    rule: str,
    account_id: str | None,
    entries: Iterable[Entry],
    *,
    count: int,
    threshold: int,
    span: int,
    summary: str,
    **evidence: object,
) -> FraudAlert:
    entries = list(entries)
    return FraudAlert(
        event_id=derived_id(offer.event_id, rule),
        occurred_at=offer.occurred_at,
        number=offer.number,
        account_id=account_id,
        rule=rule,
        count=count,
        threshold=threshold,
        window_s=max(1, span // 1000),
        first_at=from_ms(entries[0][0]),
        last_at=from_ms(entries[-1][0]),
        summary=clean(summary),
        evidence=AlertEvidence(
            first_call_id=entries[0][1],
            last_call_id=entries[-1][1],
            top_source_ips=top(e[2] for e in entries if e[2]),
            top_caller_prefixes=top(e[3] for e in entries),
            **evidence,  # type: ignore[arg-type]
        ),
    )


def top(values: Iterable[str], n: int = TOP) -> tuple[Tally, ...]:
    """The n most frequent values, ties broken by the value itself (deterministic)."""
    ranked = sorted(Counter(values).items(), key=lambda vc: (-vc[1], vc[0]))
    return tuple(Tally(value=v, count=c) for v, c in ranked[:n])


def remote_prefix(offer: CallOffered) -> str:
    """The other party's prefix, '+' and 4 digits ('+4420'): the caller of an inbound call,
    the called destination of an outbound one; 'anonymous' as is."""
    other = offer.from_ if offer.direction == "inbound" else offer.to
    return other if other == "anonymous" else other[:5]


def clean(text: str, limit: int = 300) -> str:
    """One printable line (summaries end up in e-mail subjects; user agents are attacker text)."""
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _span(ms: int) -> str:
    return f"{ms // MINUTE_MS} min" if ms % MINUTE_MS == 0 else f"{ms // 1000} s"


# -- time --------------------------------------------------------------------------

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def to_ms(occurred_at: str) -> int:
    """An event's wire timestamp as integer ms since the epoch (exact, no float)."""
    return (datetime.fromisoformat(occurred_at) - _EPOCH) // _MS


def from_ms(ms: int) -> str:
    return timestamp(_EPOCH + timedelta(milliseconds=ms))


# -- replay ------------------------------------------------------------------------


def horizon(detectors: Detectors, state: State) -> timedelta:
    """How far before the last processed offer a replay must start so that every window
    (and baseline) in use is rebuilt; alerts raised by replayed offers were sent already."""
    spans = [0]
    if detectors.call_spike.enabled:
        spans += [i.policy.window_minutes * MINUTE_MS for i in state.numbers.values() if i.policy is not None]
    return timedelta(milliseconds=max(spans))
