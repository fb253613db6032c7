"""Admission and the call lifecycle, as pure functions. No I/O, no clock: `now` is
passed in, and derived event ids come from the source event's id.

    decide(state, offer, now)       checks 1-9 of SPEC section 4, in order; the first failure
                                    decides. An admission is provisional until `complete`.
    complete(provisional, hold, webhook, now)
                                    checks 10-12: the meter's credit hold (daily voice cap,
                                    credit; no answer -> billing_unavailable) and the pre-call
                                    webhook; gives the final call.accepted or call.rejected.
    withdraw(state, provisional)    gives back a provisional admission that could not be completed
    evolve(state, event)            folds any event in; a provisional admission folded in
                                    holds its slot, so concurrent offers never exceed a cap.
    due(state, now)                 lifecycle events that time makes due: call.missed after
                                    the ring timeout.

Every check evaluated is recorded in the decision with its inputs, so a decision explains
itself and replaying the same events rebuilds the same state.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from schemas import (
    HIGH_RISK_PREFIXES,
    SIP_STATUS,
    AccountConfigured,
    AnyEvent,
    CallAccepted,
    CallAnswered,
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
    decode,
    derived_id,
    encode,
    timestamp,
)

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
# Decisions remembered per call id, so a redelivered offer gets the same answer.
REMEMBERED_DECISIONS = 100_000
RING_TIMEOUT_S = 60
# A slot whose call.ended / call.missed never arrives is freed when its lease runs out:
# ring timeout + the call's max duration (or this default) + a grace period.
DEFAULT_MAX_CALL_S = 4 * 3600
LEASE_GRACE_S = 120



class Lease(msgspec.Struct, gc=False):
    """A slot in use. Not tracked by the garbage collector (it holds only datetimes):
    a gatekeeper keeps one per call in progress."""

    admitted_at: datetime
    expires_at: datetime


@dataclass
class Line:
    """What the gatekeeper knows of one registered number."""

    account_id: str
    agent_id: str | None = None
    policy: SecurityPolicy = field(default_factory=SecurityPolicy)
    policy_version: int = 0
    active: dict[str, Lease] = field(default_factory=dict)  # call_id -> its slot
    admitted: deque[tuple[datetime, str]] = field(default_factory=deque)  # (admitted at, call_id), last day


@dataclass
class State:
    lines: dict[str, Line] = field(default_factory=dict)  # by E.164 number
    accounts: dict[str, AccountConfigured] = field(default_factory=dict)
    # Final decisions (call.rejected, call.accepted with its hold) by call_id, encoded: bytes
    # are invisible to the garbage collector, and there are up to REMEMBERED_DECISIONS of them.
    decided: OrderedDict[str, bytes] = field(default_factory=OrderedDict)
    # Provisional admissions (decided, folded in, the meter's hold not answered yet) by call_id.
    pending: OrderedDict[str, CallAccepted] = field(default_factory=OrderedDict)
    ringing: dict[str, CallAccepted] = field(default_factory=dict)  # accepted (with its hold), not yet answered

    def decision(self, call_id: str) -> CallAccepted | CallRejected | None:
        """The decision taken for a call: its provisional admission or its final decision."""
        if (provisional := self.pending.get(call_id)) is not None:
            return provisional
        known = self.decided.get(call_id)
        return decode(known) if known is not None else None  # type: ignore[return-value]


# -- the meter's hold and the webhook, as values ------------------------------------


@dataclass(frozen=True)
class Held:
    hold_id: str
    max_duration_s: int | None


@dataclass(frozen=True)
class HoldRefused:
    reason: str  # daily_voice_cap | insufficient_credits


@dataclass(frozen=True)
class HoldUnanswered:
    """The meter did not answer in time: never admit on a guess."""


HoldOutcome = Held | HoldRefused | HoldUnanswered


@dataclass(frozen=True)
class WebhookVerdict:
    """What the pre-call webhook said, reduced to what admission needs."""

    proceed: bool
    reason: str = ""
    dynamic_variables: dict = field(default_factory=dict)
    conversation_config_override: dict = field(default_factory=dict)
    failed: bool = False  # timeout / error / unsafe URL (proceed tells whether we go on anyway)


# -- evolve -------------------------------------------------------------------------


def evolve(state: State, event: AnyEvent) -> State:
    """Fold one event into the state (in place, for speed; returns it for chaining)."""
    match event:  # call events first: they are nearly all of them
        case CallAccepted() | CallRejected():
            _fold_decision(state, event)
        case CallAnswered(call_id=call_id):
            state.ringing.pop(call_id, None)
        case CallEnded(number=number, call_id=call_id) | CallMissed(number=number, call_id=call_id):
            state.ringing.pop(call_id, None)
            if line := state.lines.get(number):
                line.active.pop(call_id, None)
        case NumberRegistered(number=number, account_id=account_id):
            state.lines.setdefault(number, Line(account_id=account_id))
        case NumberAssigned(number=number, agent_id=agent_id) if number in state.lines:
            state.lines[number].agent_id = agent_id
        case NumberPolicySet(number=number, policy=policy, policy_version=version) if number in state.lines:
            line = state.lines[number]
            line.policy, line.policy_version = policy, version
        case NumberUnregistered(number=number):
            state.lines.pop(number, None)
        case AccountConfigured(account_id=account_id):
            state.accounts[account_id] = event
    return state


def _fold_decision(state: State, decision: CallAccepted | CallRejected) -> None:
    """A decision counts once. A provisional admission (a call.accepted without its hold)
    folded in holds the slot; its final form replaces it (a refusal after the hold frees
    the slot, as if never admitted)."""
    call_id = decision.call_id
    if isinstance(decision, CallAccepted) and decision.hold_id is None:
        if call_id in state.decided:
            return  # decided for good already: a provisional form never replaces that
        earlier = state.pending.get(call_id)
        if earlier == decision:
            return
        state.pending[call_id] = decision
        if len(state.pending) > REMEMBERED_DECISIONS:  # never completed (a test, a crash mid-hold)
            state.pending.popitem(last=False)
    else:
        encoded = encode(decision)
        known = state.decided.get(call_id)
        if known == encoded:
            return
        earlier = state.pending.pop(call_id, None)
        if earlier is None and known is not None:
            earlier = decode(known)  # type: ignore[assignment]
            if earlier == decision:
                return
        state.decided[call_id] = encoded
        if len(state.decided) > REMEMBERED_DECISIONS:
            state.decided.popitem(last=False)
    line = state.lines.get(decision.number)
    if isinstance(decision, CallAccepted):
        if line is not None:
            lease = line.active.get(call_id)
            if lease is not None:
                lease.expires_at = lease.admitted_at + lease_length(decision)
            elif not isinstance(earlier, CallAccepted):
                admitted_at = _parse_timestamp(decision.occurred_at)
                line.active[call_id] = Lease(admitted_at, admitted_at + lease_length(decision))
                line.admitted.append((admitted_at, call_id))
        if decision.hold_id is not None:  # accepted for good: it rings (a provisional one does not yet)
            state.ringing[call_id] = decision
    elif isinstance(earlier, CallAccepted):
        state.ringing.pop(call_id, None)
        if line is not None and line.active.pop(call_id, None) is not None:
            _withdraw(line.admitted, call_id)


def withdraw(state: State, provisional: CallAccepted) -> None:
    """Give back what a provisional admission took (its slot, its place in the windows) when
    it can be neither completed nor refused (the hold request broke): the call was never
    admitted, and its offer is decided afresh when it comes again."""
    if state.pending.pop(provisional.call_id, None) is None:
        return
    line = state.lines.get(provisional.number)
    if line is not None and line.active.pop(provisional.call_id, None) is not None:
        _withdraw(line.admitted, provisional.call_id)


def _timestamp(now: datetime) -> str:
    """`schemas.timestamp(now)` (RFC 3339 UTC, milliseconds), formatted by `isoformat`:
    about half the cost of strftime, twice per admitted call."""
    if now.tzinfo is None:
        return timestamp(now)  # raises: a naive datetime would be read as local time
    return now.astimezone(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def _parse_timestamp(value: str) -> datetime:
    """The wire's RFC 3339 UTC timestamp (schemas.timestamp) as an aware datetime.
    `datetime.fromisoformat` reads it ~50x faster than `schemas.parse_timestamp` (strptime)."""
    return datetime.fromisoformat(value)


def _withdraw(admitted: deque[tuple[datetime, str]], call_id: str) -> None:
    """Take a call's admission out of the window. It is almost always among the newest,
    so search from the right end (deque deletion near an end is cheap)."""
    for index in range(len(admitted) - 1, -1, -1):
        if admitted[index][1] == call_id:
            del admitted[index]
            return


def lease_length(accepted: CallAccepted) -> timedelta:
    return _seconds(accepted.ring_timeout_s + (accepted.max_duration_s or DEFAULT_MAX_CALL_S) + LEASE_GRACE_S)


@functools.lru_cache(maxsize=1024)
def _seconds(seconds: int) -> timedelta:
    """timedelta(seconds=...), remembered: a few distinct lengths, twice per admitted call."""
    return timedelta(seconds=seconds)


# -- decide -------------------------------------------------------------------------


def decide(state: State, offer: CallOffered, *, now: datetime) -> CallAccepted | CallRejected:
    """Checks 1-9 for one offered call: a refusal, or a provisional admission to `complete`.
    The caller folds the result back with `evolve`. An offer decided before (a
    redelivery) gets the same decision again."""
    if (earlier := state.decision(offer.call_id)) is not None:
        return earlier
    number = offer.number
    line = state.lines.get(number)
    checks: list[Check] = []
    version = line.policy_version if line else 0

    checks.append(Check(name="registered", passed=line is not None, inputs={"number": number}))
    if line is None:
        return _refuse(offer.call_id, number, offer.event_id, "unknown_number", version, checks, now)
    checks.append(Check(name="agent_assigned", passed=line.agent_id is not None, inputs={"agent_id": line.agent_id}))
    if line.agent_id is None:
        return _refuse(offer.call_id, number, offer.event_id, "no_agent", version, checks, now)

    for name, reason, check in _policy_checks(state, line, offer, now):
        passed, inputs = check()
        checks.append(Check(name=name, passed=passed, inputs=inputs))
        if not passed:
            return _refuse(offer.call_id, number, offer.event_id, reason, version, checks, now)

    account = state.accounts.get(line.account_id)
    stamp = _timestamp(now)
    return CallAccepted(
        event_id=derived_id(offer.event_id, "decision"),
        occurred_at=stamp,
        call_id=offer.call_id,
        number=number,
        account_id=line.account_id,
        agent_id=line.agent_id,
        max_duration_s=account.per_call_max_s if account else None,
        rate_millicredits_per_minute=account.rate_millicredits_per_minute if account else None,
        text_price_millicredits=account.text_price_millicredits if account else None,
        ring_timeout_s=RING_TIMEOUT_S,
        auto_answer=True,
        dynamic_variables=system_variables(offer, line.agent_id, now, stamp),
        decision=Decision(policy_version=version, checks=tuple(checks)),
    )


def complete(
    provisional: CallAccepted, *, hold: HoldOutcome, webhook: WebhookVerdict | None = None, now: datetime
) -> CallAccepted | CallRejected:
    """Checks 10-12 on a provisional admission: the meter's hold, then the webhook."""
    checks = list(provisional.decision.checks)
    version = provisional.decision.policy_version

    def refuse(reason: str) -> CallRejected:
        return _refuse(provisional.call_id, provisional.number, None, reason, version, checks, now, provisional.event_id)

    match hold:
        case Held():
            checks.append(
                Check(name="credit_hold", passed=True, inputs={"hold_id": hold.hold_id, "max_duration_s": hold.max_duration_s})
            )
        case HoldRefused(reason=reason):
            checks.append(Check(name="credit_hold", passed=False, inputs={"meter": reason}))
            return refuse(reason)
        case HoldUnanswered():
            checks.append(Check(name="credit_hold", passed=False, inputs={"meter": "no answer in time"}))
            return refuse("billing_unavailable")
    variables = dict(provisional.dynamic_variables)
    overrides: dict = {}
    if webhook is not None:
        checks.append(
            Check(
                name="pre_call_webhook",
                passed=webhook.proceed,
                inputs={"failed": webhook.failed, "reason": webhook.reason or None},
            )
        )
        if not webhook.proceed:
            return refuse("webhook_rejected")
        # The webhook may add variables; it never overrides the system__ ones.
        variables = {**webhook.dynamic_variables, **variables}
        overrides = webhook.conversation_config_override
    return msgspec.structs.replace(
        provisional,
        hold_id=hold.hold_id,
        max_duration_s=hold.max_duration_s,
        dynamic_variables=variables,
        conversation_config_override=overrides,
        decision=Decision(policy_version=version, checks=tuple(checks)),
    )


def due(state: State, now: datetime) -> list[CallMissed]:
    """Calls that rang past their ring timeout without an answer: call.missed is due."""
    missed = []
    for accepted in state.ringing.values():
        if _parse_timestamp(accepted.occurred_at) + timedelta(seconds=accepted.ring_timeout_s) <= now:
            missed.append(
                CallMissed(
                    event_id=derived_id(accepted.event_id, "missed"),
                    occurred_at=_timestamp(now),
                    call_id=accepted.call_id,
                    number=accepted.number,
                )
            )
    return missed


def answered(accepted: CallAccepted, *, now: datetime) -> CallAnswered:
    """call.answered for a call the agent picks up (at once when auto_answer)."""
    return CallAnswered(
        event_id=derived_id(accepted.event_id, "answered"),
        occurred_at=_timestamp(now),
        call_id=accepted.call_id,
        number=accepted.number,
    )


def _refuse(call_id, number, source_id, reason, version, checks, now, event_id=None) -> CallRejected:  # noqa: ANN001
    return CallRejected(
        event_id=event_id or derived_id(source_id, "decision"),
        occurred_at=_timestamp(now),
        call_id=call_id,
        number=number,
        reason=reason,
        sip_status=SIP_STATUS[reason],
        decision=Decision(policy_version=version, checks=tuple(checks)),
    )


CheckFn = Callable[[], tuple[bool, dict]]


def _policy_checks(state: State, line: Line, offer: CallOffered, now: datetime) -> list[tuple[str, str, CheckFn]]:
    """Checks 3-9 of SPEC section 4, in order; only those the policy sets are run.
    Outbound calls are checked on their destination instead of their caller."""
    policy = line.policy
    checks: list[tuple[str, str, CheckFn]] = []
    if offer.direction == "inbound":
        caller = offer.from_
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
                    lambda: (not matches_prefix(caller, policy.blocked_prefixes), {"caller": caller}),
                )
            )
        if policy.allowed_prefixes:
            checks.append(
                (
                    "allowed_prefixes",
                    "caller_not_allowed",
                    lambda: (matches_prefix(caller, policy.allowed_prefixes), {"caller": caller}),
                )
            )
    else:
        destination = offer.to
        account = state.accounts.get(line.account_id)
        allowed = account.allowed_high_risk_prefixes if account else ()
        if policy.blocked_prefixes:
            checks.append(
                (
                    "blocked_destinations",
                    "destination_blocked",
                    lambda: (not matches_prefix(destination, policy.blocked_prefixes), {"destination": destination}),
                )
            )
        checks.append(
            (
                "high_risk_destinations",
                "destination_high_risk",
                lambda: (
                    not high_risk(destination, allowed),
                    {"destination": destination, "allowed_by_account": ",".join(allowed) or None},
                ),
            )
        )
    if policy.media_encryption == "required":
        checks.append(("media_encryption", "encryption_required", lambda: (offer.srtp, {"srtp": offer.srtp})))
    if policy.hours is not None:
        hours = policy.hours
        checks.append(("hours", "outside_hours", lambda: _hours_check(now, hours.start, hours.end, hours.timezone)))
    if policy.max_concurrent_calls is not None:
        cap = policy.max_concurrent_calls
        checks.append(("concurrency", "busy", lambda: _concurrency_check(line, now, cap)))
    for name, reason, limit, span in (
        ("hourly_window", "hourly_limit", policy.max_calls_per_hour, HOUR),
        ("daily_window", "daily_limit", policy.max_calls_per_day, DAY),
    ):
        if limit is not None:
            checks.append((name, reason, _window_check(line, now, span, limit)))
    return checks


def _concurrency_check(line: Line, now: datetime, cap: int) -> tuple[bool, dict]:
    expired = [call_id for call_id, lease in line.active.items() if lease.expires_at <= now]
    for call_id in expired:  # their end event was lost: the lease frees the slot
        del line.active[call_id]
    inputs = {"active": len(line.active), "cap": cap}
    if expired:
        inputs["leases_expired"] = len(expired)
    return len(line.active) < cap, inputs


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


def high_risk(destination: str, allowed: tuple[str, ...] = ()) -> bool:
    """In a high-risk range, and no prefix the account allowed covers it."""
    return matches_prefix(destination, HIGH_RISK_PREFIXES) and not matches_prefix(destination, allowed)


def within_hours(now: datetime, start: str, end: str, tz: str) -> bool:
    """Is local time in [start, end)? end < start wraps midnight; start == end is all day."""
    local = now.astimezone(ZoneInfo(tz)).time().replace(second=0, microsecond=0)
    opens, closes = time.fromisoformat(start), time.fromisoformat(end)
    if opens == closes:
        return True
    if opens < closes:
        return opens <= local < closes
    return local >= opens or local < closes


def admitted_within(admitted: deque[tuple[datetime, str]], now: datetime, span: timedelta) -> int:
    """Admissions in the sliding window (now - span, now]. Drops entries older than a day."""
    while admitted and admitted[0][0] <= now - DAY:
        admitted.popleft()
    horizon = now - span
    return sum(1 for at, _ in admitted if at > horizon)


def system_variables(offer: CallOffered, agent_id: str, now: datetime, stamp: str | None = None) -> dict[str, str]:
    """SPEC section 6's system variables (`stamp`: `now` formatted already, if it was)."""
    return {
        "system__caller_id": offer.from_,
        "system__called_number": offer.to,
        "system__call_sid": offer.call_id,
        "system__agent_id": agent_id,
        "system__time_utc": stamp or _timestamp(now),
    }
