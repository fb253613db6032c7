"""The detectors beyond call_spike, as pure functions: scanner_sweep, account_spike,
irsf_destination and baseline_jump; boundaries, hysteresis, off switches, idle pruning."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from schemas import CallOffered, FraudAlert, NumberRegistered, NumberUnregistered, timestamp
from services.fraud.core import (
    AccountSpike,
    BaselineJump,
    CallSpike,
    Detectors,
    IrsfDestination,
    ScannerSweep,
    State,
    baseline_memory,
    evolve,
    horizon,
    observe,
)

T0 = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)
M = timedelta(minutes=1)
S = timedelta(seconds=1)
MS = timedelta(milliseconds=1)
OFF = Detectors(
    call_spike=CallSpike(enabled=False),
    scanner_sweep=ScannerSweep(enabled=False),
    account_spike=AccountSpike(enabled=False),
    irsf_destination=IrsfDestination(enabled=False),
    baseline_jump=BaselineJump(enabled=False),
)
_ids = itertools.count(1)


def only(**configs) -> Detectors:
    """Every detector off but the ones given."""
    return Detectors(**{name: getattr(OFF, name) for name in Detectors.__struct_fields__} | configs)


def number(n: int) -> str:
    return f"+4812345{n:04d}"


def directory(accounts: dict[str, list[int]]) -> State:
    state = State()
    for account, numbers in accounts.items():
        for n in numbers:
            evolve(
                state,
                NumberRegistered(
                    event_id=f"reg-{n}", occurred_at=timestamp(T0), number=number(n), number_id=f"pn_{n}",
                    account_id=account, provider="sip_trunk",
                ),
            )  # fmt: skip
    return state


def offer(at: timedelta, to: str = number(1), *, ip: str = "", ua: str = "", caller: str = "+442071234567",
          outbound: bool = False) -> CallOffered:  # fmt: skip
    call_id = f"call_{next(_ids)}"
    if outbound:
        to, caller = caller, to
    return CallOffered(
        event_id=f"offer-{call_id}", occurred_at=timestamp(T0 + at), call_id=call_id, to=to, from_=caller,
        direction="outbound" if outbound else "inbound", source_ip=ip, user_agent=ua,
    )  # fmt: skip


def run(state: State, detectors: Detectors, offers: list[CallOffered]) -> list[list[FraudAlert]]:
    return [observe(state, o, detectors) for o in offers]


def alerting(results: list[list[FraudAlert]]) -> list[int]:
    return [i for i, alerts in enumerate(results) if alerts]


# -- scanner_sweep ---------------------------------------------------------------------

SWEEP = only(scanner_sweep=ScannerSweep(distinct_numbers=10, window_s=60, user_agents=("friendly-scanner", "sipvicious")))
IP = "203.0.113.66"


@pytest.mark.parametrize(
    ("offers", "alerting_at"),
    [
        pytest.param([(n * S, n) for n in range(9)], [], id="9 distinct numbers in a minute: no alert"),
        pytest.param([(n * S, n) for n in range(10)], [9], id="10 distinct numbers: alert"),
        pytest.param([(n * S, n % 3) for n in range(30)], [], id="many offers to 3 numbers: no alert"),
        pytest.param([(n * S, n) for n in range(40)], [9], id="the sweep goes on: one alert"),
        pytest.param([(0 * S, 0)] + [(50 * S + n * S, n + 1) for n in range(8)] + [(60 * S, 9)], [], id="60 s old offer has left"),
        pytest.param([(0 * S, 0)] + [(50 * S + n * S, n + 1) for n in range(8)] + [(60 * S - MS, 9)], [9], id="60 s - 1 ms still in"),
        pytest.param(
            [(n * S, n) for n in range(10)] + [(200 * S + n * S, n) for n in range(10)],
            [9, 19],
            id="a sweep after the window emptied alerts again",
        ),
        pytest.param(
            [(n * S, n) for n in range(10)] + [(65 * S + n * S, 0) for n in range(5)] + [(70 * S + n * S, n) for n in range(10)],
            [9, 24],
            id="falling below the distinct threshold re-arms",
        ),
    ],
)
def test_scanner_sweep_one_ip_many_numbers(offers, alerting_at):
    results = run(State(), SWEEP, [offer(at, number(n), ip=IP) for at, n in offers])
    assert alerting(results) == alerting_at


def test_scanner_sweep_counts_per_source_ip():
    offers = [offer(n * S, number(n), ip=f"198.51.100.{n % 2}") for n in range(18)]
    assert alerting(run(State(), SWEEP, offers)) == []  # 9 numbers each


def test_scanner_sweep_alert_names_the_address_and_the_numbers():
    state = directory({"acct_a": [9]})
    results = run(state, SWEEP, [offer(n * S, number(n), ip=IP, caller="+100") for n in range(10)])
    alert = results[-1][0]
    assert (alert.rule, alert.number, alert.account_id) == ("scanner_sweep", number(9), "acct_a")
    assert (alert.count, alert.threshold, alert.window_s) == (10, 9, 60)
    assert (alert.evidence.source_ip, alert.evidence.distinct_numbers, alert.evidence.user_agent) == (IP, 10, "")
    assert [(t.value, t.count) for t in alert.evidence.top_source_ips] == [(IP, 10)]
    assert alert.summary == f"source {IP} offered calls to 10 numbers within 1 min (threshold 9)"


@pytest.mark.parametrize("ua", ["friendly-scanner", "SIPVicious 0.3.4", "x Friendly-Scanner/1.0"])
def test_a_known_scanner_user_agent_alerts_on_its_first_offer(ua):
    results = run(State(), SWEEP, [offer(0 * S, ip=IP, ua=ua), offer(1 * S, ip=IP, ua=ua)])
    assert alerting(results) == [0]
    alert = results[0][0]
    assert (alert.rule, alert.count, alert.threshold, alert.evidence.user_agent) == ("scanner_sweep", 1, 0, ua)


def test_scanner_user_agent_episode_ends_a_window_after_its_last_offer():
    offers = [offer(0 * S, ip=IP, ua="sipvicious"), offer(30 * S, ip=IP), offer(59 * S, ip=IP, ua="sipvicious"),
              offer(119 * S, ip=IP), offer(120 * S, ip=IP, ua="sipvicious")]  # fmt: skip
    assert alerting(run(State(), SWEEP, offers)) == [0, 4]


def test_ordinary_user_agents_and_unknown_addresses_do_not_alert():
    offers = [offer(n * S, ip=IP, ua="Twilio Gateway") for n in range(5)] + [offer(n * S, number(n), ua="sipvicious") for n in range(20)]
    assert alerting(run(State(), SWEEP, offers)) == []  # no source IP: nothing to key a sweep on


def test_idle_scanner_addresses_are_dropped():
    state = State()
    run(state, SWEEP, [offer(n * MS, number(1), ip=f"10.0.{n // 250}.{n % 250}") for n in range(1000)])
    assert len(state.sweeps) == 1000
    run(state, SWEEP, [offer(121 * S, ip="192.0.2.1")])  # two windows later
    assert list(state.sweeps) == ["192.0.2.1"]


def test_one_address_hammering_keeps_one_entry_per_number_it_called():
    """5,000 offers a second from one IP to 50 numbers for four 1 s windows: the sweep holds
    the latest offer per number (50), not the 5,000 offers in its window."""
    state, detectors = State(), only(scanner_sweep=ScannerSweep(distinct_numbers=10, window_s=1))
    sizes, alerts = set(), []
    for i in range(20_000):
        alerts += observe(state, offer(i * MS / 5, number(i % 50), ip=IP), detectors)
        sizes.add(len(state.sweeps[IP].latest))
    assert max(sizes) == 50 and len(state.sweeps) == 1
    sweep = state.sweeps[IP]
    assert list(sweep.latest) == [number(n) for n in range(50)]  # oldest first
    assert [e[0] for e in sweep.latest.values()] == sorted(e[0] for e in sweep.latest.values())
    (alert,) = alerts  # one episode, however long
    assert (alert.count, alert.evidence.distinct_numbers, alert.number) == (10, 10, number(9))


def test_a_late_offer_refreshes_its_number_in_time_order_unless_called_since():
    sweep = only(scanner_sweep=ScannerSweep(distinct_numbers=10, window_s=60))
    state = State()
    run(state, sweep, [offer(at * S, number(n), ip=IP) for at, n in [(0, 0), (10, 1), (20, 2), (30, 1)]])
    run(state, sweep, [offer(15 * S, number(0), ip=IP), offer(5 * S, number(2), ip=IP)])  # late
    latest = state.sweeps[IP].latest
    assert [(n, e[0] - latest[number(0)][0]) for n, e in latest.items()] == [
        (number(0), 0), (number(2), 5_000), (number(1), 15_000)
    ]  # fmt: skip
    run(state, sweep, [offer(76 * S, number(3), ip=IP)])  # 0 (at 15 s) has left, 2 (at 20 s) not
    assert list(latest) == [number(2), number(1), number(3)]


# -- account_spike -------------------------------------------------------------------

ACCOUNT = only(account_spike=AccountSpike(calls=4, window_minutes=5))


@pytest.mark.parametrize(
    ("offers", "alerting_at"),
    [
        pytest.param([(n * M, n % 3) for n in range(4)], [], id="exactly N across the numbers: no alert"),
        pytest.param([(n * M, n % 3) for n in range(5)], [4], id="N+1 across three numbers: alert"),
        pytest.param([(n * S, n % 3) for n in range(50)], [4], id="sustained: one alert"),
        pytest.param([(n * M, 0) for n in range(4)] + [(5 * M, 1)], [], id="offer exactly W older has left"),
        pytest.param([(n * M, 0) for n in range(4)] + [(5 * M - MS, 1)], [4], id="W - 1 ms still counts"),
        pytest.param([(n * S, 0) for n in range(5)] + [(5 * M + 3 * S, 1)] + [(6 * M + n * S, 2) for n in range(4)], [4, 9], id="re-arms at N"),
        pytest.param([(n * S, 9 if n % 2 else 0) for n in range(8)], [], id="another account's numbers do not count"),
        pytest.param([(n * S, 99) for n in range(10)], [], id="unregistered numbers do not count"),
    ],
)
def test_account_spike_across_an_accounts_numbers(offers, alerting_at):
    state = directory({"acct_a": [0, 1, 2], "acct_b": [9]})
    assert alerting(run(state, ACCOUNT, [offer(at, number(n)) for at, n in offers])) == alerting_at


def test_account_spike_alert_names_the_account_and_its_numbers():
    state = directory({"acct_a": [0, 1, 2]})
    alert = run(state, ACCOUNT, [offer(n * S, number(n % 3)) for n in range(5)])[-1][0]
    assert (alert.rule, alert.account_id, alert.number, alert.count, alert.threshold) == ("account_spike", "acct_a", number(1), 5, 4)
    assert alert.evidence.distinct_numbers == 3
    assert alert.summary == "5 calls to 3 numbers of account acct_a within 5 min (threshold 4)"


def test_unregistering_a_number_takes_it_out_of_its_account():
    state = directory({"acct_a": [0, 1]})
    run(state, ACCOUNT, [offer(n * S, number(0)) for n in range(3)])
    evolve(state, NumberUnregistered(event_id="unreg", occurred_at=timestamp(T0), number=number(1)))
    assert alerting(run(state, ACCOUNT, [offer(10 * S + n * S, number(1)) for n in range(5)])) == []


# -- irsf_destination ----------------------------------------------------------------

IRSF = only(irsf_destination=IrsfDestination())


@pytest.mark.parametrize(
    ("destinations", "alerting_at"),
    [
        pytest.param(["+33612345678", "+14155550100"], [], id="ordinary destinations"),
        pytest.param(["+33612345678", "+881612345678"], [1], id="the first high-risk offer alerts"),
        pytest.param(["+4490123456", "+881612345678", "+53512345678"], [0], id="one alert per episode"),
        pytest.param(["+19005550100"], [0], id="North American premium rate"),
        pytest.param(["+19175550100"], [], id="a +1 number outside the premium ranges"),
    ],
)
def test_irsf_outbound_to_high_risk_ranges(destinations, alerting_at):
    state = directory({"acct_a": [1]})
    offers = [offer(n * S, number(1), caller=d, outbound=True) for n, d in enumerate(destinations)]
    assert alerting(run(state, IRSF, offers)) == alerting_at


def test_inbound_calls_from_high_risk_ranges_are_not_irsf():
    state = directory({"acct_a": [1]})
    assert alerting(run(state, IRSF, [offer(0 * S, number(1), caller="+881612345678")])) == []


@pytest.mark.parametrize(
    ("offsets", "alerting_at"),
    [
        pytest.param([0 * M, 59 * M, 118 * M], [0], id="each within the hour of the last: one episode"),
        pytest.param([0 * M, 60 * M], [0, 1], id="an hour later exactly: a new episode"),
        pytest.param([0 * M, 60 * M - MS], [0], id="an hour less 1 ms: the same episode"),
    ],
)
def test_irsf_episode_lasts_while_the_window_holds_high_risk_offers(offsets, alerting_at):
    state = directory({"acct_a": [1]})
    offers = [offer(at, number(1), caller="+8816123456", outbound=True) for at in offsets]
    assert alerting(run(state, IRSF, offers)) == alerting_at


def test_irsf_threshold_and_alert_evidence():
    state = directory({"acct_a": [1, 2]})
    detectors = only(irsf_destination=IrsfDestination(calls=2, window_minutes=10))
    offers = [offer(n * M, number(1 + n % 2), caller=f"+4490{n}23456", outbound=True) for n in range(3)]
    results = run(state, detectors, offers)
    assert alerting(results) == [2]
    alert = results[2][0]
    assert (alert.rule, alert.account_id, alert.count, alert.threshold, alert.window_s) == ("irsf_destination", "acct_a", 3, 2, 600)
    assert alert.evidence.destination_prefix == "+4490"
    assert [(t.value, t.count) for t in alert.evidence.top_caller_prefixes] == [("+4490", 3)]  # the destinations


def test_irsf_prefixes_are_configurable():
    state = directory({"acct_a": [1]})
    detectors = only(irsf_destination=IrsfDestination(prefixes=("+3361",)))
    offers = [offer(0 * S, number(1), caller="+881612345678", outbound=True), offer(1 * S, number(1), caller="+33612345678", outbound=True)]
    results = run(state, detectors, offers)
    assert alerting(results) == [1] and results[1][0].evidence.destination_prefix == "+3361"


# -- baseline_jump ---------------------------------------------------------------------

BASELINE = only(baseline_jump=BaselineJump(z_score=4.0, min_calls=10, warmup_minutes=5, alpha=0.1))


def per_minute(counts: list[int], n: int = 1, start: int = 0) -> list[CallOffered]:
    """counts[i] offers to number(n) spread over minute start + i."""
    return [offer((start + i) * M + k * (M / max(c, 1)), number(n)) for i, c in enumerate(counts) for k in range(c)]


def minutes_alerting(results: list[list[FraudAlert]], offers: list[CallOffered]) -> list[int]:
    return [int((datetime.fromisoformat(offers[i].occurred_at) - T0) / M) for i in alerting(results)]


@pytest.mark.parametrize(
    ("counts", "minutes"),
    [
        pytest.param([2] * 10 + [12], [10], id="a jump from 2/min to 12/min alerts"),
        pytest.param([2] * 10 + [9], [], id="below min_calls: no alert"),
        pytest.param([12] * 10 + [14], [], id="busy number, small rise: no alert"),
        pytest.param([0] * 3 + [30], [], id="inside the warm-up: no alert"),
        pytest.param([2] * 10 + [30] * 3, [10], id="a sustained jump: one alert"),
        pytest.param([2] * 10 + [30, 2, 2, 60], [10, 13], id="a new jump after a quiet minute alerts again"),
        pytest.param([2] * 10 + [30, 2, 2, 30], [10], id="the baseline learnt the first jump's variance"),
        pytest.param([2] * 10 + [30, 0, 0, 60], [10, 13], id="empty minutes end the episode too"),
    ],
)
def test_baseline_jump_per_minute(counts, minutes):
    state = directory({"acct_a": [1]})
    offers = per_minute(counts)
    assert minutes_alerting(run(state, BASELINE, offers), offers) == minutes


def test_baseline_decays_over_minutes_without_calls():
    state = directory({"acct_a": [1]})
    busy_then_silent = per_minute([40] * 30)  # a baseline of ~40/min
    run(state, BASELINE, busy_then_silent)
    baseline = state.numbers[number(1)].baseline
    assert baseline is not None and baseline.mean == pytest.approx(40, abs=2)
    later = per_minute([25], start=30 + 60)  # an hour of silence: the baseline has decayed
    results = run(state, BASELINE, later)
    assert alerting(results) != []
    assert results[alerting(results)[0]][0].evidence.baseline_per_minute < 0.1


def test_empty_minutes_fold_like_zero_counts_one_by_one():
    dense, sparse = directory({"a": [1]}), directory({"a": [1]})
    config = only(baseline_jump=BaselineJump(warmup_minutes=0, alpha=0.3))
    run(dense, config, per_minute([5, 7, 0, 0, 0, 0, 3]))  # the empty minutes get offers in neither
    run(sparse, config, per_minute([5, 7, 0, 0, 0, 0, 3]))
    b = dense.numbers[number(1)].baseline
    mean, var = 0.0, 0.0  # by hand: fold 5, 7, 0, 0, 0, 0 one minute at a time
    for count in [5, 7, 0, 0, 0, 0]:
        diff = count - mean
        mean += 0.3 * diff
        var = 0.7 * (var + diff * 0.3 * diff)
    assert (b.mean, b.var) == (pytest.approx(mean), pytest.approx(var))


def test_baseline_alert_carries_its_baseline_and_z_score():
    state = directory({"acct_a": [1]})
    offers = per_minute([2] * 10 + [12])
    alert = [a for alerts in run(state, BASELINE, offers) for a in alerts][0]
    assert (alert.rule, alert.account_id, alert.count, alert.window_s) == ("baseline_jump", "acct_a", 10, 60)
    # the baseline starts at zero (the detector saw no calls before minute 0) and learns 2/min
    assert alert.evidence.baseline_per_minute == pytest.approx(2 * (1 - 0.9**10), abs=0.001)
    assert alert.evidence.z_score is not None and alert.evidence.z_score >= 4
    assert alert.count > alert.threshold
    assert alert.first_at == timestamp(T0 + 10 * M)


def test_baseline_only_for_registered_numbers():
    state = State()
    offers = per_minute([0] * 10 + [50], n=7)
    assert alerting(run(state, BASELINE, offers)) == []


# -- switches, horizon ---------------------------------------------------------------


def test_every_detector_can_be_switched_off():
    state = directory({"acct_a": [0, 1, 2]})
    offers = [offer(n * S, number(n % 50), ip=IP, ua="sipvicious") for n in range(600)]
    offers += [offer(601 * S, number(1), caller="+881612345678", outbound=True)]
    assert [a for alerts in run(state, OFF, offers) for a in alerts] == []


def test_defaults_run_every_detector():
    state = directory({"acct_a": [0, 1, 2]})
    offers = [offer(n * S / 10, number(n % 3), ip=IP, ua="sipvicious") for n in range(600)]
    offers += [offer(61 * S, number(1), caller="+881612345678", outbound=True)]
    rules = {a.rule for alerts in run(state, Detectors(), offers) for a in alerts}
    assert rules == {"scanner_sweep", "account_spike", "irsf_destination"}


def test_horizon_is_twice_the_longest_window_in_use_or_the_baseline_memory():
    state = directory({"acct_a": [1]})
    assert horizon(OFF, state) == timedelta(0)
    assert horizon(only(irsf_destination=IrsfDestination(window_minutes=90)), state) == timedelta(minutes=180)
    assert horizon(only(scanner_sweep=ScannerSweep(window_s=45)), state) == timedelta(seconds=90)
    baseline = BaselineJump(warmup_minutes=15, alpha=0.1)
    assert baseline_memory(baseline) == 45  # 0.9^44 < 1% of the weight left before the replay
    assert horizon(only(baseline_jump=baseline), state) == timedelta(minutes=45)
    assert horizon(Detectors(baseline_jump=baseline), state) == timedelta(minutes=120)  # irsf's hour, twice
