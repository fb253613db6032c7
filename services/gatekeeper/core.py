"""Admission, as pure functions: `decide` turns an offered call into call.accepted or
call.rejected; `evolve` folds events into the gatekeeper's state. No I/O, no clock:
`now` is passed in, and derived event ids come from the source event's id.

Checks run in SPEC section 4's order and the first failure decides. Every check
evaluated is recorded in the decision, with its inputs, so a decision explains itself.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from schemas import (
    SIP_STATUS,
    AnyEvent,
    CallAccepted,
    CallEnded,
    CallMissed,
    CallOffered,
    CallRejected,
    Check,
    Decision,
    NumberAssigned,
    NumberPolicySet,
    NumberRegistered,
    NumberUnregistered,
    SecurityPolicy,
    derived_id,
    parse_timestamp,
    timestamp,
)

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
# Decisions remembered per call id, so a redelivered offer gets the same answer.
REMEMBERED_DECISIONS = 100_000


@dataclass
class Line:
    """What the gatekeeper knows of one registered number."""

    account_id: str
    agent_id: str | None = None
    policy: SecurityPolicy = field(default_factory=SecurityPolicy)
    policy_version: int = 0
    active: dict[str, datetime] = field(default_factory=dict)  # call_id -> admitted at
    admitted: deque[datetime] = field(default_factory=deque)  # admission times, last day


@dataclass
class State:
    lines: dict[str, Line] = field(default_factory=dict)  # by E.164 number
    decided: OrderedDict[str, CallAccepted | CallRejected] = field(default_factory=OrderedDict)  # by call_id


# -- evolve -------------------------------------------------------------------------


def evolve(state: State, event: AnyEvent) -> State:
    """Fold one event into the state (in place, for speed; returns it for chaining)."""
    match event:
        case NumberRegistered(number=number, account_id=account_id):
            state.lines.setdefault(number, Line(account_id=account_id))
        case NumberAssigned(number=number, agent_id=agent_id) if number in state.lines:
            state.lines[number].agent_id = agent_id
        case NumberPolicySet(number=number, policy=policy, policy_version=version) if number in state.lines:
            line = state.lines[number]
            line.policy, line.policy_version = policy, version
        case NumberUnregistered(number=number):
            state.lines.pop(number, None)
        case CallAccepted(call_id=call_id) | CallRejected(call_id=call_id) if call_id in state.decided:
            pass  # already folded: a decision counts once
        case CallAccepted(number=number, call_id=call_id) | CallRejected(number=number, call_id=call_id):
            _remember(state, event)
            if isinstance(event, CallAccepted) and (line := state.lines.get(number)):
                admitted_at = parse_timestamp(event.occurred_at)
                line.active[call_id] = admitted_at
                line.admitted.append(admitted_at)
        case CallEnded(number=number, call_id=call_id) | CallMissed(number=number, call_id=call_id):
            if line := state.lines.get(number):
                line.active.pop(call_id, None)
    return state


def _remember(state: State, decision: CallAccepted | CallRejected) -> None:
    state.decided[decision.call_id] = decision
    if len(state.decided) > REMEMBERED_DECISIONS:
        state.decided.popitem(last=False)


# -- decide -------------------------------------------------------------------------


def decide(state: State, offer: CallOffered, *, now: datetime) -> CallAccepted | CallRejected:
    """Admit or refuse one offered call. The caller folds the result back with `evolve`.

    An offer decided before (a redelivery) gets the same decision again."""
    if (earlier := state.decided.get(offer.call_id)) is not None:
        return earlier
    number = offer.number
    line = state.lines.get(number)
    checks: list[Check] = []

    def refuse(reason: str) -> CallRejected:
        version = line.policy_version if line else 0
        return CallRejected(
            event_id=derived_id(offer.event_id, "decision"),
            occurred_at=timestamp(now),
            call_id=offer.call_id,
            number=number,
            reason=reason,  # type: ignore[arg-type]
            sip_status=SIP_STATUS[reason],
            decision=Decision(policy_version=version, checks=tuple(checks)),
        )

    checks.append(Check(name="registered", passed=line is not None, inputs={"number": number}))
    if line is None:
        return refuse("unknown_number")
    checks.append(Check(name="agent_assigned", passed=line.agent_id is not None, inputs={"agent_id": line.agent_id}))
    if line.agent_id is None:
        return refuse("no_agent")

    for name, reason, check in _policy_checks(line, offer, now):
        passed, inputs = check()
        checks.append(Check(name=name, passed=passed, inputs=inputs))
        if not passed:
            return refuse(reason)

    return CallAccepted(
        event_id=derived_id(offer.event_id, "decision"),
        occurred_at=timestamp(now),
        call_id=offer.call_id,
        number=number,
        account_id=line.account_id,
        agent_id=line.agent_id,
        dynamic_variables=system_variables(offer, line.agent_id, now),
        decision=Decision(policy_version=line.policy_version, checks=tuple(checks)),
    )


CheckFn = Callable[[], tuple[bool, dict]]


def _policy_checks(line: Line, offer: CallOffered, now: datetime) -> list[tuple[str, str, CheckFn]]:
    """Checks 3-9 of SPEC section 4, in order; only those the policy sets are run."""
    policy = line.policy
    remote = offer.from_ if offer.direction == "inbound" else offer.to
    checks: list[tuple[str, str, CheckFn]] = []
    if policy.allowed_cidrs:
        checks.append(
            (
                "source_ip",
                "source_ip_not_allowed",
                lambda: (ip_allowed(offer.source_ip, policy.allowed_cidrs), {"source_ip": offer.source_ip}),
            )
        )
    if policy.blocked_prefixes:
        checks.append(
            (
                "blocked_prefixes",
                "caller_blocked",
                lambda: (not matches_prefix(remote, policy.blocked_prefixes), {"caller": remote}),
            )
        )
    if policy.allowed_prefixes:
        checks.append(
            (
                "allowed_prefixes",
                "caller_not_allowed",
                lambda: (matches_prefix(remote, policy.allowed_prefixes), {"caller": remote}),
            )
        )
    if policy.media_encryption == "required":
        checks.append(("media_encryption", "encryption_required", lambda: (offer.srtp, {"srtp": offer.srtp})))
    if policy.hours is not None:
        hours = policy.hours
        checks.append(
            (
                "hours",
                "outside_hours",
                lambda: _hours_check(now, hours.start, hours.end, hours.timezone),
            )
        )
    if policy.max_concurrent_calls is not None:
        cap = policy.max_concurrent_calls
        checks.append(("concurrency", "busy", lambda: (len(line.active) < cap, {"active": len(line.active), "cap": cap})))
    for name, reason, limit, span in (
        ("hourly_window", "hourly_limit", policy.max_calls_per_hour, HOUR),
        ("daily_window", "daily_limit", policy.max_calls_per_day, DAY),
    ):
        if limit is not None:
            checks.append((name, reason, _window_check(line, now, span, limit)))
    return checks


def _hours_check(now: datetime, start: str, end: str, tz: str) -> tuple[bool, dict]:
    try:
        local = now.astimezone(ZoneInfo(tz)).strftime("%H:%M")
    except (ZoneInfoNotFoundError, ValueError):
        return False, {"timezone": tz, "error": "unknown timezone: refused rather than guessed"}
    return within_hours(now, start, end, tz), {"local_time": local, "start": start, "end": end}


def _window_check(line: Line, now: datetime, span: timedelta, limit: int) -> CheckFn:
    def check() -> tuple[bool, dict]:
        count = admitted_within(line.admitted, now, span)
        return count < limit, {"admitted_in_window": count, "limit": limit, "window_s": int(span.total_seconds())}

    return check


# -- the rules, each a small pure function ------------------------------------------


def ip_allowed(source_ip: str, cidrs: tuple[str, ...]) -> bool:
    """True if the address is inside any CIDR. An IPv4-mapped IPv6 address matches in
    either form; a malformed CIDR matches nothing (the provisioner refuses those)."""
    try:
        address = ipaddress.ip_address(source_ip)
    except ValueError:
        return False
    forms = [address]
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        forms.append(address.ipv4_mapped)
    for cidr in cidrs:
        try:
            network = ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            continue
        if any(form in network for form in forms if form.version == network.version):
            return True
    return False


def matches_prefix(party: str, prefixes: tuple[str, ...]) -> bool:
    """'anonymous' never matches; an E.164 number matches a '+digits' prefix it starts with."""
    return party.startswith("+") and any(party.startswith(p) for p in prefixes)


def within_hours(now: datetime, start: str, end: str, tz: str) -> bool:
    """Is local time in [start, end)? end < start wraps midnight; start == end is all day."""
    local = now.astimezone(ZoneInfo(tz)).time().replace(second=0, microsecond=0)
    opens, closes = time.fromisoformat(start), time.fromisoformat(end)
    if opens == closes:
        return True
    if opens < closes:
        return opens <= local < closes
    return local >= opens or local < closes


def admitted_within(admitted: deque[datetime], now: datetime, span: timedelta) -> int:
    """Admissions in the sliding window (now - span, now]. Drops entries older than a day."""
    while admitted and admitted[0] <= now - DAY:
        admitted.popleft()
    horizon = now - span
    return sum(1 for t in admitted if t > horizon)


def system_variables(offer: CallOffered, agent_id: str, now: datetime) -> dict[str, str]:
    return {
        "system__caller_id": offer.from_,
        "system__called_number": offer.to,
        "system__call_sid": offer.call_id,
        "system__agent_id": agent_id,
        "system__time_utc": timestamp(now),
    }

