"""Rating, as pure functions (SPEC section 5). Money is integer millicredits.

    billable_s = ceil(max(0, duration_ms - silent_ms) / 1000)
    charged_s  = max(60, billable_s)           the first minute is always charged in full
    voice      = round_half_up(R * charged_s / 60)
    text       = responses * text_price         on top of the voice fee
A call never answered (duration 0) costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

FIRST_MINUTE_S = 60


@dataclass(frozen=True)
class Charge:
    charged_s: int
    voice_millicredits: int
    text_millicredits: int

    @property
    def total_millicredits(self) -> int:
        return self.voice_millicredits + self.text_millicredits


NO_CHARGE = Charge(0, 0, 0)


def rate_call(
    *,
    duration_ms: int,
    silent_ms: int,
    rate_millicredits_per_minute: int,
    responses: int = 0,
    text_price_millicredits: int = 0,
) -> Charge:
    if duration_ms <= 0:
        return NO_CHARGE
    billable_s = -(-max(0, duration_ms - silent_ms) // 1000)  # ceil without floats
    charged_s = max(FIRST_MINUTE_S, billable_s)
    return Charge(
        charged_s=charged_s,
        voice_millicredits=round_half_up_div(rate_millicredits_per_minute * charged_s, 60),
        text_millicredits=responses * text_price_millicredits,
    )


def round_half_up_div(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded half up, in integers (no float error)."""
    return (2 * numerator + denominator) // (2 * denominator)


@dataclass(frozen=True)
class HoldGrant:
    amount_millicredits: int  # the first minute's price, reserved
    max_duration_s: int | None  # what caps and the available balance allow (None: no cap)


@dataclass(frozen=True)
class HoldRefusal:
    reason: str  # daily_voice_cap | insufficient_credits


def decide_hold(
    *,
    rate_millicredits_per_minute: int,
    balance_millicredits: int,
    open_holds_millicredits: int,
    per_call_max_s: int | None = None,
    daily_voice_cap_s: int | None = None,
    voice_s_today: int = 0,
) -> HoldGrant | HoldRefusal:
    """Reserve the first minute of a call, like a pending two-phase transfer: only if the
    available balance (balance minus open holds) covers it, and the daily cap is not spent."""
    if daily_voice_cap_s is not None and voice_s_today >= daily_voice_cap_s:
        return HoldRefusal("daily_voice_cap")
    first_minute = round_half_up_div(rate_millicredits_per_minute * FIRST_MINUTE_S, 60)
    available = balance_millicredits - open_holds_millicredits
    if available < first_minute:
        return HoldRefusal("insufficient_credits")
    limits = [per_call_max_s]
    if daily_voice_cap_s is not None:
        limits.append(daily_voice_cap_s - voice_s_today)
    if rate_millicredits_per_minute > 0:
        limits.append(available * 60 // rate_millicredits_per_minute)  # seconds the balance pays for
    bounded = [limit for limit in limits if limit is not None]
    return HoldGrant(first_minute, min(bounded) if bounded else None)


# -- calls in progress: extend holds ahead of use, or cut the call off ----------------

EXTENSION_S = 60  # a hold grows by a minute's price at a time
EXTEND_AHEAD_S = 15  # ... this long before what it covers runs out


@dataclass(frozen=True)
class RunningCall:
    call_id: str
    account_id: str
    answered_at_s: float  # seconds since the epoch
    held_millicredits: int  # what its hold reserves now


@dataclass(frozen=True)
class AccountLimits:
    rate_millicredits_per_minute: int
    available_millicredits: int  # balance minus every open hold
    per_call_max_s: int | None = None
    daily_voice_cap_s: int | None = None
    voice_s_today: int = 0  # charged today before these calls


@dataclass(frozen=True)
class Extend:
    call_id: str
    amount_millicredits: int


@dataclass(frozen=True)
class CutOff:
    call_id: str
    reason: str  # credit_exhausted | per_call_cap | daily_cap


def covered_s(held_millicredits: int, rate_millicredits_per_minute: int) -> int:
    """Seconds of talk a hold pays for."""
    if rate_millicredits_per_minute <= 0:
        return 2**62
    return held_millicredits * 60 // rate_millicredits_per_minute


def supervise(calls: list[RunningCall], limits: dict[str, AccountLimits], now_s: float) -> list[Extend | CutOff]:
    """For each call in progress: cut it off at a cap, or extend its hold before it runs
    dry, or cut it off if the account cannot cover the extension. Extensions are granted
    in order, each one spending the account's available balance: concurrent calls of one
    account never reserve more than it has."""
    available = {account_id: lim.available_millicredits for account_id, lim in limits.items()}
    used_today = {account_id: lim.voice_s_today for account_id, lim in limits.items()}
    actions: list[Extend | CutOff] = []
    for call in sorted(calls, key=lambda c: (c.answered_at_s, c.call_id)):
        lim = limits.get(call.account_id)
        if lim is None:
            continue
        elapsed = max(0.0, now_s - call.answered_at_s)
        used_today[call.account_id] += int(elapsed)
        if lim.per_call_max_s is not None and elapsed >= lim.per_call_max_s:
            actions.append(CutOff(call.call_id, "per_call_cap"))
            continue
        if lim.daily_voice_cap_s is not None and used_today[call.account_id] >= lim.daily_voice_cap_s:
            actions.append(CutOff(call.call_id, "daily_cap"))
            continue
        covered = covered_s(call.held_millicredits, lim.rate_millicredits_per_minute)
        if elapsed + EXTEND_AHEAD_S < covered:
            continue
        step = round_half_up_div(lim.rate_millicredits_per_minute * EXTENSION_S, 60)
        if available[call.account_id] >= step:
            available[call.account_id] -= step
            actions.append(Extend(call.call_id, step))
        elif elapsed >= covered:
            actions.append(CutOff(call.call_id, "credit_exhausted"))
    return actions
