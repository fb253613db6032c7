"""Credit holds as two-phase transfers: reserve the first minute, extend ahead of use,
cut off when the account cannot pay, and never let concurrent calls overdraw."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.meter.core import (
    EXTEND_AHEAD_S,
    AccountLimits,
    CutOff,
    Extend,
    HoldGrant,
    HoldRefusal,
    RunningCall,
    covered_s,
    decide_hold,
    rate_call,
    supervise,
)

RATE = 30_000  # millicredits per minute: ElevenLabs voice, 30 credits/min


@pytest.mark.parametrize(
    ("balance", "open_holds", "caps", "expected"),
    [
        (90_000, 0, {}, HoldGrant(30_000, 180)),  # three minutes of credit
        (30_000, 0, {}, HoldGrant(30_000, 60)),  # exactly the first minute
        (29_999, 0, {}, HoldRefusal("insufficient_credits")),
        (90_000, 60_001, {}, HoldRefusal("insufficient_credits")),  # other calls' holds count
        (90_000, 60_000, {}, HoldGrant(30_000, 60)),
        (10**9, 0, {"per_call_max_s": 600}, HoldGrant(30_000, 600)),
        (10**9, 0, {"daily_voice_cap_s": 3600, "voice_s_today": 3500}, HoldGrant(30_000, 100)),
        (10**9, 0, {"daily_voice_cap_s": 3600, "voice_s_today": 3600}, HoldRefusal("daily_voice_cap")),
        (0, 0, {"daily_voice_cap_s": 10, "voice_s_today": 20}, HoldRefusal("daily_voice_cap")),  # cap checked first
    ],
)
def test_a_hold_reserves_the_first_minute_and_tells_how_long_the_call_may_run(balance, open_holds, caps, expected):
    got = decide_hold(rate_millicredits_per_minute=RATE, balance_millicredits=balance, open_holds_millicredits=open_holds, **caps)
    assert got == expected


def call(call_id: str, answered_at: float, held: int = 30_000, account: str = "a") -> RunningCall:
    return RunningCall(call_id, account, answered_at, held)


def limits(available: int, **caps) -> dict[str, AccountLimits]:  # noqa: ANN003
    return {"a": AccountLimits(RATE, available, **caps)}


@pytest.mark.parametrize(
    ("elapsed", "available", "caps", "expected"),
    [
        (10, 0, {}, []),  # the first minute is covered
        (60 - EXTEND_AHEAD_S, 30_000, {}, [Extend("c1", 30_000)]),  # extend ahead of use
        (60 - EXTEND_AHEAD_S, 29_999, {}, []),  # cannot extend yet, not run dry yet
        (60, 29_999, {}, [CutOff("c1", "credit_exhausted")]),
        (300, 10**9, {"per_call_max_s": 300}, [CutOff("c1", "per_call_cap")]),
        (50, 10**9, {"daily_voice_cap_s": 100, "voice_s_today": 60}, [CutOff("c1", "daily_cap")]),
    ],
)
def test_supervision_extends_ahead_cuts_off_at_caps_and_when_credit_runs_out(elapsed, available, caps, expected):
    assert supervise([call("c1", 1000.0)], limits(available, **caps), 1000.0 + elapsed) == expected


def test_concurrent_calls_of_one_account_share_what_is_available():
    running = [call("c1", 0.0), call("c2", 0.0), call("c3", 0.0)]
    actions = supervise(running, limits(60_000), 50.0)  # room for two extensions, not three
    assert actions == [Extend("c1", 30_000), Extend("c2", 30_000)]
    assert supervise(running, limits(0), 60.0) == [CutOff(c, "credit_exhausted") for c in ("c1", "c2", "c3")]


# -- stateful model: random interleavings never overdraw ---------------------------------

TICK_MAX_S = 5  # the meter supervises every second; the model allows some slack
# A call cut off runs on until the next supervision round: at most one tick of talk past
# its hold. That is the only way a charge can pass what was reserved.
OVERRUN_MAX = -(-RATE * TICK_MAX_S // 60)

ops = st.lists(
    st.one_of(
        st.tuples(st.just("offer"), st.integers(0, 0)),
        st.tuples(st.just("tick"), st.integers(1, TICK_MAX_S)),  # seconds pass, supervision runs
        st.tuples(st.just("end"), st.integers(0, 20)),
        st.tuples(st.just("reject"), st.integers(0, 20)),  # a hold released unused
        st.tuples(st.just("topup"), st.integers(1, 100_000)),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(start=st.integers(0, 200_000), script=ops)
def test_available_never_goes_negative_and_every_hold_resolves_once(start, script):
    balance, now, overrun = start, 0.0, 0
    holds: dict[str, int] = {}  # open holds: call_id -> reserved
    running: dict[str, float] = {}  # answered calls: call_id -> answered at
    resolved: list[str] = []
    for n, (op, arg) in enumerate(script):
        if op == "offer":
            grant = decide_hold(
                rate_millicredits_per_minute=RATE, balance_millicredits=balance, open_holds_millicredits=sum(holds.values())
            )
            if isinstance(grant, HoldGrant):
                holds[f"c{n}"] = grant.amount_millicredits
                running[f"c{n}"] = now
        elif op == "tick":
            now += arg
            calls = [RunningCall(c, "a", t, holds[c]) for c, t in running.items()]
            for action in supervise(calls, limits(balance - sum(holds.values())), now):
                if isinstance(action, Extend):
                    holds[action.call_id] += action.amount_millicredits
                else:  # the edge obeys the cut-off at once
                    charge = rate_call(duration_ms=int((now - running[action.call_id]) * 1000), silent_ms=0,
                                       rate_millicredits_per_minute=RATE).total_millicredits
                    held = holds.pop(action.call_id)
                    assert charge - held <= OVERRUN_MAX
                    balance -= charge
                    overrun += max(0, charge - held)
                    running.pop(action.call_id)
                    resolved.append(action.call_id)
        elif op in ("end", "reject") and running:
            call_id = sorted(running)[arg % len(running)]
            elapsed_ms = 0 if op == "reject" else int((now - running[call_id]) * 1000)
            held = holds.pop(call_id)
            charge = rate_call(duration_ms=elapsed_ms, silent_ms=0, rate_millicredits_per_minute=RATE).total_millicredits
            assert charge <= held, "a call that was not cut off never outruns its hold"
            balance -= charge
            running.pop(call_id)
            resolved.append(call_id)
        elif op == "topup":
            balance += arg
        assert balance - sum(holds.values()) >= -overrun, "available went negative beyond cut-off overruns"
        assert overrun <= OVERRUN_MAX * len(resolved)
        assert len(resolved) == len(set(resolved)), "a hold resolved twice"
    assert all(covered_s(h, RATE) >= 60 for h in holds.values())
