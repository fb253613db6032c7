"""Rating as pure functions (SPEC section 5): worked examples, then properties."""

from __future__ import annotations

from fractions import Fraction
from math import floor

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.meter.core import Charge, rate_call, round_half_up_div

ELEVENLABS_VOICE = 30_000  # millicredits per minute: 30 credits/min


@pytest.mark.parametrize(
    ("duration_ms", "silent_ms", "rate", "responses", "text_price", "expected"),
    [
        # 45 s -> first minute in full: 60 s; 30,000 * 60 / 60 = 30,000
        pytest.param(45_000, 0, ELEVENLABS_VOICE, 0, 0, Charge(60, 30_000, 0), id="45 s call charges the first minute"),
        # exactly 60 s: 30,000 * 60 / 60 = 30,000
        pytest.param(60_000, 0, ELEVENLABS_VOICE, 0, 0, Charge(60, 30_000, 0), id="exactly one minute"),
        # 61 s: 30,000 * 61 / 60 = 30,500
        pytest.param(61_000, 0, ELEVENLABS_VOICE, 0, 0, Charge(61, 30_500, 0), id="61 s call is per second after the first minute"),
        # 60.001 s -> ceil to 61 s: 30,500
        pytest.param(60_001, 0, ELEVENLABS_VOICE, 0, 0, Charge(61, 30_500, 0), id="a fraction of a second rounds up"),
        # 1 ms answered call: billable 1 s -> still the first minute: 30,000
        pytest.param(1, 0, ELEVENLABS_VOICE, 0, 0, Charge(60, 30_000, 0), id="a 1 ms answered call pays the first minute"),
        # 3 min with 40 s silence: 180 - 40 = 140 s; 30,000 * 140 / 60 = 70,000
        pytest.param(180_000, 40_000, ELEVENLABS_VOICE, 0, 0, Charge(140, 70_000, 0), id="silence is not charged"),
        # 2 min: 60,000 voice; 7 responses * 400 = 2,800 text; total 62,800
        pytest.param(120_000, 0, ELEVENLABS_VOICE, 7, 400, Charge(120, 60_000, 2_800), id="agent responses on top of voice"),
        # 1,001 * 61 / 60 = 61,061 / 60 = 1,017.68 -> 1,018
        pytest.param(61_000, 0, 1_001, 0, 0, Charge(61, 1_018, 0), id="uneven rate rounds to nearest"),
        # 1,001 * 65 / 60 = 65,065 / 60 = 1,084.42 -> 1,084
        pytest.param(65_000, 0, 1_001, 0, 0, Charge(65, 1_084, 0), id="uneven rate rounds down below .5"),
        # 30,030 * 61 / 60 = 1,831,830 / 60 = 30,530.5 -> 30,531 (half up)
        pytest.param(61_000, 0, 30_030, 0, 0, Charge(61, 30_531, 0), id="exactly .5 rounds up"),
        # 1 * 90 / 60 = 1.5 -> 2
        pytest.param(90_000, 0, 1, 0, 0, Charge(90, 2, 0), id="exactly .5 at a tiny rate rounds up"),
        # never answered: duration 0 -> 0, whatever the responses
        pytest.param(0, 0, ELEVENLABS_VOICE, 3, 400, Charge(0, 0, 0), id="never answered costs nothing"),
        # silence 90 s > duration 30 s: billable max(0, -60 s) = 0 -> first minute 30,000
        pytest.param(30_000, 90_000, ELEVENLABS_VOICE, 0, 0, Charge(60, 30_000, 0), id="silence beyond duration clamps to zero billable"),
        # 100 s all silent: billable 0 -> first minute 30,000
        pytest.param(100_000, 100_000, ELEVENLABS_VOICE, 0, 0, Charge(60, 30_000, 0), id="an all-silent call pays the first minute"),
        # 125.5 s with 4.2 s silence: 121,300 ms -> ceil 122 s; 30,000 * 122 / 60 = 61,000
        pytest.param(125_500, 4_200, ELEVENLABS_VOICE, 0, 0, Charge(122, 61_000, 0), id="ceil applies after silence is removed"),
        # rate 0: voice free, text still 2 * 250 = 500
        pytest.param(61_000, 0, 0, 2, 250, Charge(61, 0, 500), id="free voice still charges text"),
    ],
)
def test_rate_call_worked_examples(duration_ms, silent_ms, rate, responses, text_price, expected):
    charge = rate_call(
        duration_ms=duration_ms,
        silent_ms=silent_ms,
        rate_millicredits_per_minute=rate,
        responses=responses,
        text_price_millicredits=text_price,
    )
    assert charge == expected


def test_total_is_voice_plus_text():
    charge = rate_call(duration_ms=120_000, silent_ms=0, rate_millicredits_per_minute=30_000, responses=7, text_price_millicredits=400)
    assert charge.total_millicredits == 62_800


@pytest.mark.parametrize(
    ("numerator", "denominator", "expected"),
    [
        (0, 60, 0),
        (29, 60, 0),  # 0.483 -> 0
        (30, 60, 1),  # 0.5 -> 1
        (31, 60, 1),
        (89, 60, 1),  # 1.483 -> 1
        (90, 60, 2),  # 1.5 -> 2
        (61_061, 60, 1_018),  # 1,017.68 -> 1,018
        (1_831_830, 60, 30_531),  # 30,530.5 -> 30,531
        (60 * 10**28 + 30, 60, 10**28 + 1),  # 10**28 + 0.5 -> 10**28 + 1: no float error with big integers
        (7, 2, 4),  # 3.5 -> 4
        (5, 2, 3),  # 2.5 -> 3, not banker's 2
    ],
)
def test_round_half_up_div(numerator, denominator, expected):
    assert round_half_up_div(numerator, denominator) == expected


@given(numerator=st.integers(min_value=0, max_value=10**24), denominator=st.integers(min_value=1, max_value=10**6))
def test_round_half_up_div_equals_exact_rational_rounding(numerator, denominator):
    assert round_half_up_div(numerator, denominator) == floor(Fraction(numerator, denominator) + Fraction(1, 2))


# -- properties ----------------------------------------------------------------------

durations = st.integers(min_value=0, max_value=6 * 3_600_000)
silences = st.integers(min_value=0, max_value=6 * 3_600_000)
rates = st.integers(min_value=0, max_value=1_000_000)


def voice(duration_ms: int, silent_ms: int, rate: int) -> int:
    return rate_call(duration_ms=duration_ms, silent_ms=silent_ms, rate_millicredits_per_minute=rate).voice_millicredits


@given(a=durations, b=durations, silent_ms=silences, rate=rates)
def test_charge_is_monotonic_in_duration(a, b, silent_ms, rate):
    shorter, longer = sorted((a, b))
    assert voice(shorter, silent_ms, rate) <= voice(longer, silent_ms, rate)


@given(duration_ms=st.integers(min_value=1, max_value=6 * 3_600_000), silent_ms=silences, rate=rates)
def test_answered_call_never_costs_less_than_the_first_minute(duration_ms, silent_ms, rate):
    charge = rate_call(duration_ms=duration_ms, silent_ms=silent_ms, rate_millicredits_per_minute=rate)
    assert charge.charged_s >= 60
    assert charge.voice_millicredits >= rate  # the first minute's price is exactly the per-minute rate


@given(duration_ms=durations, silent_ms=silences, extra_silence=silences, rate=rates)
def test_adding_silence_never_increases_the_charge(duration_ms, silent_ms, extra_silence, rate):
    assert voice(duration_ms, silent_ms + extra_silence, rate) <= voice(duration_ms, silent_ms, rate)


@given(duration_ms=durations, silent_ms=silences, rate=rates)
def test_silence_is_never_charged(duration_ms, silent_ms, rate):
    if duration_ms - silent_ms > 0:
        assert voice(duration_ms, silent_ms, rate) == voice(duration_ms - silent_ms, 0, rate)


@given(duration_ms=durations, silent_ms=silences, rate=rates, responses=st.integers(0, 500), price=st.integers(0, 10_000))
def test_rate_call_matches_the_spec_formula(duration_ms, silent_ms, rate, responses, price):
    charge = rate_call(
        duration_ms=duration_ms,
        silent_ms=silent_ms,
        rate_millicredits_per_minute=rate,
        responses=responses,
        text_price_millicredits=price,
    )
    if duration_ms == 0:
        assert charge == Charge(0, 0, 0)
        return
    billable_s = -(-max(0, duration_ms - silent_ms) // 1000)
    charged_s = max(60, billable_s)
    exact = Fraction(rate * charged_s, 60)
    assert charge.charged_s == charged_s
    assert charge.voice_millicredits == floor(exact + Fraction(1, 2))
    assert abs(charge.voice_millicredits - exact) <= Fraction(1, 2)
    assert charge.text_millicredits == responses * price
