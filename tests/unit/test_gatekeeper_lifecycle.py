"""Checks 10-12 (the meter's hold, the pre-call webhook), leases, and ring timeouts:
the pure core of the gatekeeper after a provisional admission."""

from __future__ import annotations

from datetime import timedelta

import pytest

from services.gatekeeper.core import (
    LEASE_GRACE_S,
    RING_TIMEOUT_S,
    Held,
    HoldRefused,
    HoldUnanswered,
    WebhookVerdict,
    answered,
    complete,
    decide,
    due,
    evolve,
    withdraw,
)
from schemas import CallRejected
from tests.unit.test_gatekeeper_core import T0, ended, line, offer, outcome


def admit(state, call_id="call_1", *, hold=Held("hold_1", 300), webhook=None, now=T0):  # noqa: ANN001
    provisional = decide(state, offer(call_id), now=now)
    evolve(state, provisional)
    if isinstance(provisional, CallRejected):
        return provisional
    final = complete(provisional, hold=hold, webhook=webhook, now=now)
    evolve(state, final)
    return final


@pytest.mark.parametrize(
    ("hold", "expected"),
    [
        (Held("hold_1", 300), ("accepted", None)),
        (HoldRefused("insufficient_credits"), ("insufficient_credits", 402)),
        (HoldRefused("daily_voice_cap"), ("daily_voice_cap", 480)),
        (HoldUnanswered(), ("billing_unavailable", 503)),
    ],
)
def test_the_meters_answer_to_the_hold_decides_checks_10_and_11(hold, expected):
    final = admit(line(), hold=hold)
    assert outcome(final) == expected
    assert final.decision.checks[-1].name == "credit_hold"


def test_an_accepted_call_carries_the_hold_and_the_meters_max_duration():
    final = admit(line(), hold=Held("hold_9", 185))
    assert (final.hold_id, final.max_duration_s) == ("hold_9", 185)


def test_a_refusal_after_the_hold_frees_the_slot_as_if_never_admitted():
    state = line(max_concurrent_calls=1, max_calls_per_hour=1)
    assert outcome(admit(state, "call_1", hold=HoldRefused("insufficient_credits"))) == ("insufficient_credits", 402)
    assert outcome(admit(state, "call_2")) == ("accepted", None)  # neither the slot nor the window counted it


def test_a_provisional_admission_holds_its_slot_while_the_meter_answers():
    state = line(max_concurrent_calls=1)
    evolve(state, decide(state, offer("call_1"), now=T0))  # waiting for the hold
    assert outcome(decide(state, offer("call_2"), now=T0)) == ("busy", 486)


@pytest.mark.parametrize(
    ("verdict", "expected"),
    [
        (WebhookVerdict(proceed=True, dynamic_variables={"tier": "gold"}), ("accepted", None)),
        (WebhookVerdict(proceed=False, reason="blocked by CRM"), ("webhook_rejected", 603)),
        (WebhookVerdict(proceed=True, failed=True, reason="timeout"), ("accepted", None)),  # fail open
        (WebhookVerdict(proceed=False, failed=True, reason="timeout"), ("webhook_rejected", 603)),  # fail closed
    ],
)
def test_the_pre_call_webhook_is_check_12(verdict, expected):
    final = admit(line(), webhook=verdict)
    assert outcome(final) == expected
    assert final.decision.checks[-1].name == "pre_call_webhook"


def test_webhook_variables_join_the_system_variables_but_never_replace_them():
    verdict = WebhookVerdict(proceed=True, dynamic_variables={"tier": "gold", "system__agent_id": "evil"})
    final = admit(line(), webhook=verdict)
    assert final.dynamic_variables["tier"] == "gold"
    assert final.dynamic_variables["system__agent_id"] == "agent_1"


def test_a_call_not_answered_within_the_ring_timeout_is_missed_once():
    state = line(max_concurrent_calls=1)
    final = admit(state)
    assert due(state, T0 + timedelta(seconds=RING_TIMEOUT_S - 1)) == []
    [missed] = due(state, T0 + timedelta(seconds=RING_TIMEOUT_S))
    assert (missed.call_id, missed.event_id) == ("call_1", f"{final.event_id}/missed")
    evolve(state, missed)
    assert due(state, T0 + timedelta(hours=1)) == []
    assert outcome(admit(state, "call_2")) == ("accepted", None)  # the slot was freed


def test_an_answered_call_never_becomes_missed():
    state = line()
    final = admit(state)
    evolve(state, answered(final, now=T0))
    assert due(state, T0 + timedelta(hours=1)) == []


def test_a_slot_whose_end_event_was_lost_is_freed_when_its_lease_runs_out():
    state = line(max_concurrent_calls=1)
    admit(state, hold=Held("hold_1", 300))
    evolve(state, answered(state.decision("call_1"), now=T0))
    lease_end = T0 + timedelta(seconds=RING_TIMEOUT_S + 300 + LEASE_GRACE_S)
    assert outcome(admit(state, "call_2", now=lease_end - timedelta(seconds=1))) == ("busy", 486)
    later = admit(state, "call_3", now=lease_end)
    assert outcome(later) == ("accepted", None)
    assert later.decision.checks[-2].inputs["leases_expired"] == 1


def test_replaying_the_published_events_rebuilds_the_same_counts():
    live = line(max_concurrent_calls=2)
    published = []
    for call_id in ("a", "b", "c"):
        published.append(admit(live, call_id))
    published.append(ended("a"))
    evolve(live, published[-1])
    replayed = line(*published, max_concurrent_calls=2)
    assert outcome(decide(replayed, offer("d"), now=T0)) == outcome(decide(live, offer("d"), now=T0)) == ("accepted", None)
    assert replayed.lines["+48123456789"].active.keys() == live.lines["+48123456789"].active.keys() == {"b"}


# -- model check: concurrency and sliding windows against a brute-force model ----------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

steps = st.lists(
    st.one_of(
        st.tuples(st.just("offer"), st.integers(0, 0)),
        st.tuples(st.just("end"), st.integers(0, 30)),
        st.tuples(st.just("wait"), st.integers(1, 2400)),  # seconds
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(cap=st.integers(1, 4), hourly=st.integers(1, 6), ops=steps)
def test_admissions_match_a_brute_force_model_of_slots_and_the_hourly_window(cap, hourly, ops):
    state = line(max_concurrent_calls=cap, max_calls_per_hour=hourly)
    now = T0
    active: list[str] = []  # the model: admitted and not ended
    admitted_at: list = []  # the model: every admission time
    for n, (op, arg) in enumerate(ops):
        if op == "wait":
            now += timedelta(seconds=arg)
        elif op == "end" and active:
            call_id = active.pop(arg % len(active))
            evolve(state, ended(call_id))
        elif op == "offer":
            in_window = sum(1 for t in admitted_at if now - timedelta(hours=1) < t <= now)
            expected = "busy" if len(active) >= cap else "hourly_limit" if in_window >= hourly else "accepted"
            result = admit(state, f"call_{n}", hold=Held(f"hold_{n}", 10**7), now=now)  # leases outlast the run
            assert outcome(result)[0] == expected
            if expected == "accepted":
                active.append(f"call_{n}")
                admitted_at.append(now)


def test_a_provisional_admission_does_not_ring_until_its_hold_makes_it_final():
    state = line()
    provisional = decide(state, offer("call_1"), now=T0)
    evolve(state, provisional)
    assert "call_1" not in state.ringing  # an AnswerCall now would answer a call not accepted
    assert due(state, T0 + timedelta(seconds=RING_TIMEOUT_S + 1)) == []
    evolve(state, complete(provisional, hold=Held("hold_1", 300), now=T0))
    assert [m.call_id for m in due(state, T0 + timedelta(seconds=RING_TIMEOUT_S))] == ["call_1"]


def test_a_provisional_admission_withdrawn_gives_back_its_slot_and_window_place():
    state = line(max_concurrent_calls=1, max_calls_per_hour=1)
    provisional = decide(state, offer("call_1"), now=T0)
    evolve(state, provisional)  # waiting for the hold, which then breaks
    assert outcome(decide(state, offer("call_2"), now=T0)) == ("busy", 486)
    withdraw(state, provisional)
    withdraw(state, provisional)  # once: a second withdrawal changes nothing
    assert outcome(admit(state, "call_2")) == ("accepted", None)  # neither the slot nor the window counted it
    assert outcome(decide(state, offer("call_3"), now=T0)) == ("busy", 486)
