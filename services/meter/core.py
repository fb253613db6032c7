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
