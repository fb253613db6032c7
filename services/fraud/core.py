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
    scanner_sweep     one source IP offering calls to many different numbers within seconds,
                      or any offer whose User-Agent is a known SIP scanner's; per source IP
    account_spike     more than N offers within W minutes across all of an account's numbers
    irsf_destination  more than N outbound offers within W minutes to high-risk (premium,
                      revenue-share) destination ranges, per account (N = 0: the first alerts)
    baseline_jump     this minute's offers to a number far above its own baseline: an EWMA of
                      calls per minute and its EWMA variance, z-score threshold, warm-up

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

Memory: windows keyed by something outside the directory (source IPs, accounts, high-risk
callers) are dropped once idle for two spans of the newest event time seen; that is exact
for offers at most one span late. Per-number state lives as long as the number is registered.

A window only ever needs its newest threshold + 1 offers to decide "more than threshold",
so it keeps no more than that: memory is bounded by thresholds, not by attack traffic.
The count at a crossing is exactly threshold + 1 (one offer raises it by one), and the
evidence covers exactly the offers in the window. (Right after a policy change lowered a
threshold below the traffic, the count is that of the offers kept under the old threshold,
plus one: a lower bound, still above the new threshold.)

scanner_sweep counts distinct numbers, so its window keeps, per source IP, only the latest
offer to each number called within it: memory is bounded by the distinct numbers in the
window, not by the traffic (one IP hammering 50 numbers holds 50 entries). A late offer to
a number called later already changes nothing. Its count and evidence cover those latest
offers, one per number: count = distinct numbers (for a known scanner's user agent too),
first call = the oldest of them, tallies count numbers, not calls.
"""

from __future__ import annotations

import functools
import math
import re
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
# baseline_jump keeps this minute's newest offers for the evidence, no more.
MINUTE_EVIDENCE = 32
# The baseline a replay rebuilds differs from the live one by at most this weight of history.
BASELINE_REPLAY_TOLERANCE = 0.01
NEVER = -(2**62)

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
    newest: int = NEVER  # ms of the newest offer seen: the window's own clock
    in_episode: bool = False
    threshold: int = 0  # the threshold of the last offer: how many offers are kept


@dataclass(slots=True)
class Sweep:
    """One source IP within the scanner window: the latest offer to each number it called,
    oldest first (a number called again moves to its new place), so it holds one entry per
    distinct number in the window, however many offers the IP sends."""

    latest: OrderedDict[str, Entry] = field(default_factory=OrderedDict)  # by number, in time order
    newest: int = NEVER
    scanner_at: int = NEVER  # ms of the newest offer with a scanner's user agent
    user_agent: str = ""  # that user agent
    in_episode: bool = False


@dataclass(slots=True)
class Baseline:
    """One number's calls per minute: the current minute and the EWMA of those before."""

    minute: int  # the current minute (ms // 60,000)
    count: int = 0  # offers in the current minute
    mean: float = 0.0  # EWMA of completed minutes (zeros since the detector started)
    var: float = 0.0  # EWMA variance
    jumped: bool = False  # the current minute is a jump
    in_episode: bool = False
    first: Entry | None = None  # the current minute's first offer
    recent: deque[Entry] = field(default_factory=lambda: deque(maxlen=MINUTE_EVIDENCE))


@dataclass(slots=True)
class NumberInfo:
    account_id: str
    policy: FraudAlertPolicy | None = None
    spike: Window = field(default_factory=Window)
    baseline: Baseline | None = None


@dataclass
class State:
    numbers: dict[str, NumberInfo] = field(default_factory=dict)  # the directory, by number
    seen: OrderedDict[str, None] = field(default_factory=OrderedDict)  # recent call ids
    newest: int = NEVER  # ms of the newest offer seen by any window
    origin: int | None = None  # ms of the first offer seen: baselines are zero before it
    # Least recently touched first, so idle keys are pruned from the front.
    sweeps: OrderedDict[str, Sweep] = field(default_factory=OrderedDict)  # by source IP
    accounts: OrderedDict[str, Window] = field(default_factory=OrderedDict)  # by account id
    irsf: OrderedDict[str, Window] = field(default_factory=OrderedDict)  # by account id (or number)


def evolve(state: State, event: AnyEvent) -> State:
    match event:
        case NumberRegistered(number=n, account_id=a):
            info = state.numbers.get(n)
            if info is None or info.account_id != a:
                state.numbers[n] = NumberInfo(account_id=a)
        case NumberPolicySet(number=n, policy=p) if n in state.numbers:
            state.numbers[n].policy = p.fraud_alert
        case NumberUnregistered(number=n):
            state.numbers.pop(n, None)  # its windows and baseline go with it
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
    if state.origin is None:
        state.origin = at
    number = offer.number
    entry: Entry = (at, offer.call_id, offer.source_ip, remote_prefix(offer), number)
    info = state.numbers.get(number)
    account_id = None if info is None else info.account_id
    alerts: list[FraudAlert | None] = []
    if info is not None and info.policy is not None and detectors.call_spike.enabled:
        alerts.append(_call_spike(info, entry, offer))
    if detectors.scanner_sweep.enabled and offer.source_ip:
        alerts.append(_scanner_sweep(state, detectors.scanner_sweep, entry, offer, account_id))
    if account_id is not None and detectors.account_spike.enabled:
        alerts.append(_account_spike(state, detectors.account_spike, entry, offer, account_id))
    if offer.direction == "outbound" and detectors.irsf_destination.enabled:
        alerts.append(_irsf_destination(state, detectors.irsf_destination, entry, offer, account_id))
    if info is not None and detectors.baseline_jump.enabled:
        alerts.append(_baseline_jump(state, detectors.baseline_jump, info, entry, offer))
    return [a for a in alerts if a is not None]


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


def _scanner_sweep(
    state: State, config: ScannerSweep, entry: Entry, offer: CallOffered, account_id: str | None
) -> FraudAlert | None:
    span, ip = config.window_s * 1000, offer.source_ip
    _prune(state.sweeps, state.newest - 2 * span)
    sweep = _touch(state.sweeps, ip, Sweep)
    at, number = entry[0], entry[4]
    if at <= sweep.newest - span:
        return None  # too late for this window, which never moves back
    in_order = at >= sweep.newest
    if in_order:
        sweep.newest = at
    latest, edge = sweep.latest, sweep.newest - span
    while latest and next(iter(latest.values()))[0] <= edge:
        latest.popitem(last=False)  # numbers not called within the window any more
    if not latest:
        sweep.in_episode = False  # the window emptied: whatever episode there was is over
    if in_order:
        latest[number] = entry
        latest.move_to_end(number)
    else:
        _refresh_late(latest, number, entry)
    if offer.user_agent and at > sweep.scanner_at and _is_scanner(config.user_agents, offer.user_agent):
        sweep.scanner_at, sweep.user_agent = at, clean(offer.user_agent, 200)
    distinct = len(latest)
    by_sweep = distinct >= config.distinct_numbers
    by_agent = sweep.scanner_at > edge
    crossed = (by_sweep or by_agent) and not sweep.in_episode
    sweep.in_episode = by_sweep or by_agent
    if not crossed:
        return None
    if by_sweep:
        threshold = config.distinct_numbers - 1
        summary = f"source {ip} offered calls to {distinct} numbers within {_span(span)} (threshold {threshold})"
    else:
        threshold = 0
        numbers = "1 number" if distinct == 1 else f"{distinct} numbers"
        summary = f"known SIP scanner '{sweep.user_agent}' from {ip}: calls to {numbers} within {_span(span)}"
    return _alert(
        offer,
        RULE_SCANNER,
        account_id,
        latest.values(),
        count=distinct,
        threshold=threshold,
        span=span,
        summary=summary,
        source_ip=ip,
        user_agent=sweep.user_agent if by_agent else "",
        distinct_numbers=distinct,
    )


def _refresh_late(latest: OrderedDict[str, Entry], number: str, entry: Entry) -> None:
    """Record a late offer (older than the window's newest) as its number's latest, in time
    order after the entries of its own ms, unless the number was called later already."""
    at = entry[0]
    known = latest.get(number)
    if known is not None:
        if known[0] > at:
            return
        del latest[number]
    after: list[tuple[str, Entry]] = []
    while latest and next(reversed(latest.values()))[0] > at:
        after.append(latest.popitem())
    latest[number] = entry
    for key, newer in reversed(after):
        latest[key] = newer


def _account_spike(
    state: State, config: AccountSpike, entry: Entry, offer: CallOffered, account_id: str
) -> FraudAlert | None:
    span, threshold = config.window_minutes * MINUTE_MS, config.calls
    _prune(state.accounts, state.newest - 2 * span)
    window = _touch(state.accounts, account_id, Window)
    if not slide(window, entry, span, threshold):
        return None
    entries = window.entries
    count, distinct = len(entries), len({e[4] for e in entries})
    return _alert(
        offer,
        RULE_ACCOUNT,
        account_id,
        entries,
        count=count,
        threshold=threshold,
        span=span,
        summary=f"{count} calls to {distinct} numbers of account {account_id} within {_span(span)} (threshold {threshold})",
        distinct_numbers=distinct,
    )


def _irsf_destination(
    state: State, config: IrsfDestination, entry: Entry, offer: CallOffered, account_id: str | None
) -> FraudAlert | None:
    prefix = _high_risk(config.prefixes, offer.to)
    if prefix is None:
        return None
    span, threshold = config.window_minutes * MINUTE_MS, config.calls
    _prune(state.irsf, state.newest - 2 * span)
    window = _touch(state.irsf, account_id or offer.number, Window)
    if not slide(window, entry, span, threshold):
        return None
    entries, count = window.entries, len(window.entries)
    who = f"account {account_id}" if account_id else offer.number
    return _alert(
        offer,
        RULE_IRSF,
        account_id,
        entries,
        count=count,
        threshold=threshold,
        span=span,
        summary=(
            f"{count} outbound calls from {who} to high-risk destinations within {_span(span)}"
            f" (threshold {threshold}), latest {offer.to} in {prefix}"
        ),
        destination_prefix=prefix,
    )


def _baseline_jump(
    state: State, config: BaselineJump, info: NumberInfo, entry: Entry, offer: CallOffered
) -> FraudAlert | None:
    at = entry[0]
    minute = at // MINUTE_MS
    b = info.baseline
    if b is None:
        b = info.baseline = Baseline(minute=minute)  # zero calls a minute since the origin
    if minute < b.minute:
        return None  # late: its minute is already folded into the baseline
    if minute > b.minute:
        _close_minutes(b, minute, config.alpha)
    b.count += 1
    if b.first is None:
        b.first = entry
    b.recent.append(entry)
    assert state.origin is not None
    if b.jumped or b.count < config.min_calls or minute - state.origin // MINUTE_MS < config.warmup_minutes:
        return None
    sd = max(math.sqrt(b.var), 1.0)  # at least one call a minute: a flat baseline is not a zero deviation
    z = (b.count - b.mean) / sd
    if z < config.z_score:
        return None
    b.jumped = True
    if b.in_episode:
        return None  # the jump goes on from the minute before
    b.in_episode = True
    threshold = max(config.min_calls, math.ceil(b.mean + config.z_score * sd)) - 1
    recent = list(b.recent) if len(b.recent) == b.count else [b.first, *b.recent]
    return _alert(
        offer,
        RULE_BASELINE,
        info.account_id,
        sorted(recent, key=lambda e: e[0]),
        count=b.count,
        threshold=threshold,
        span=MINUTE_MS,
        summary=(
            f"{b.count} calls to {offer.number} within 1 min against a baseline of {b.mean:.1f}/min"
            f" (z {z:.1f}, threshold z {config.z_score:g})"
        ),
        baseline_per_minute=round(b.mean, 3),
        z_score=round(z, 2),
    )


def _close_minutes(b: Baseline, minute: int, alpha: float) -> None:
    """Fold the current minute and the empty minutes up to `minute` into the EWMA."""
    gap = minute - b.minute - 1  # minutes without a call in between
    b.in_episode = b.jumped and gap == 0  # an episode lasts while every minute jumps
    diff = b.count - b.mean
    incr = alpha * diff
    b.mean += incr
    b.var = (1 - alpha) * (b.var + diff * incr)
    if gap:
        # `gap` zero minutes folded one by one give, with f = (1 - alpha) ** gap:
        # mean' = f * mean, var' = f * (var + mean^2 * (1 - f))
        f = (1 - alpha) ** gap
        b.var = f * (b.var + b.mean * b.mean * (1 - f))
        b.mean *= f
    b.minute, b.count, b.jumped, b.first = minute, 0, False, None
    b.recent.clear()


def slide(window: Window, entry: Entry, span: int, threshold: int) -> bool:
    """Add one offer to a window of `span` ms; True when it starts an episode (alert)."""
    if not _enter(window, entry, span):
        return False
    entries = window.entries
    above = len(entries) > threshold
    keep = max(threshold, window.threshold) + 1  # a lowered threshold trims from the next offer on
    while len(entries) > keep:
        entries.popleft()  # the newest threshold + 1 decide "more than threshold"
    window.threshold = threshold
    crossed = above and not window.in_episode
    window.in_episode = above
    return crossed


def _enter(window: Window, entry: Entry, span: int) -> bool:
    """Move the window's clock up to the offer, drop the offers that fell out of the span,
    and insert the offer in time order. False, and nothing changed, when the offer is too
    late: already outside the window, which never moves back."""
    at = entry[0]
    if at <= window.newest - span:
        return False
    if at > window.newest:
        window.newest = at
    entries = window.entries
    edge = window.newest - span
    while entries and entries[0][0] <= edge:
        entries.popleft()
    if not entries:
        window.in_episode = False  # the window emptied: whatever episode there was is over
    _insert(entries, entry)
    return True


def _insert(entries: deque[Entry], entry: Entry) -> None:
    """Append in time order; a late offer goes after the offers of its own ms."""
    at = entry[0]
    if not entries or at >= entries[-1][0]:
        entries.append(entry)
        return
    i = len(entries)
    while i > 0 and entries[i - 1][0] > at:
        i -= 1
    entries.insert(i, entry)


def _touch(windows: OrderedDict, key: str, new: type):  # type: ignore[type-arg]
    window = windows.get(key)
    if window is None:
        window = windows[key] = new()
    else:
        windows.move_to_end(key)
    return window


def _prune(windows: OrderedDict, idle_before: int) -> None:  # type: ignore[type-arg]
    """Drop least recently touched windows whose newest offer is at or before `idle_before`."""
    while windows:
        key, window = next(iter(windows.items()))
        if window.newest > idle_before:
            return
        del windows[key]


@functools.lru_cache(maxsize=16)
def _scanner_pattern(user_agents: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join(re.escape(u) for u in user_agents if u) or r"(?!)", re.IGNORECASE)


def _is_scanner(user_agents: tuple[str, ...], user_agent: str) -> bool:
    return _scanner_pattern(user_agents).search(user_agent) is not None


@functools.lru_cache(maxsize=16)
def _prefix_index(prefixes: tuple[str, ...]) -> tuple[frozenset[str], tuple[int, ...]]:
    """The prefixes as a set, and their lengths, longest first."""
    return frozenset(prefixes), tuple(sorted({len(p) for p in prefixes}, reverse=True))


def _high_risk(prefixes: tuple[str, ...], destination: str) -> str | None:
    """The longest high-risk prefix `destination` starts with, if any."""
    members, lengths = _prefix_index(prefixes)
    for length in lengths:
        if destination[:length] in members:
            return destination[:length]
    return None


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
    """How far before the last processed offer a replay must start so that every window,
    episode and baseline in use is rebuilt; alerts raised by replayed offers were sent already.

    Two spans per window: the next offer's window reaches one span back, and whether the
    window is in an episode was decided at the offer before it, whose window reaches one
    span further. (An offer later than the last processed one by more than a span may
    still see a different state.) The baseline is rebuilt to within
    BASELINE_REPLAY_TOLERANCE of its weight."""
    windows = [0]
    if detectors.call_spike.enabled:
        windows += [i.policy.window_minutes * MINUTE_MS for i in state.numbers.values() if i.policy is not None]
    if detectors.scanner_sweep.enabled:
        windows.append(detectors.scanner_sweep.window_s * 1000)
    if detectors.account_spike.enabled:
        windows.append(detectors.account_spike.window_minutes * MINUTE_MS)
    if detectors.irsf_destination.enabled:
        windows.append(detectors.irsf_destination.window_minutes * MINUTE_MS)
    memory = baseline_memory(detectors.baseline_jump) * MINUTE_MS if detectors.baseline_jump.enabled else 0
    return timedelta(milliseconds=max(2 * max(windows), memory))


def baseline_memory(config: BaselineJump) -> int:
    """Minutes of history a replay needs for baseline_jump: the warm-up, and enough minutes
    that the history before them weighs at most BASELINE_REPLAY_TOLERANCE in the EWMA
    (a replay starts the baseline at zero), plus the current minute."""
    if config.alpha >= 1:
        fading = 1
    else:
        fading = math.ceil(math.log(BASELINE_REPLAY_TOLERANCE) / math.log(1 - config.alpha))
    return max(config.warmup_minutes, fading) + 1
