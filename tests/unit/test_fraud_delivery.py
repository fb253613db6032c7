"""Fraud alert delivery, the pure parts: the e-mail as rendered, the backoff delays, what a
webhook status means, and the retry loop with its counters and log line (attempts here are
plain async functions; the real SMTP and HTTP exchanges are in tests/test_fraud_delivery.py)."""

from __future__ import annotations

import asyncio
import re
from email import message_from_bytes, policy

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from schemas import AlertEvidence, FraudAlert, Tally
from services.fraud.delivery import (
    DeliveryError,
    DeliveryMetrics,
    RetryPolicy,
    backoff_delay,
    deliver,
    duration_text,
    message_id,
    render_email,
    webhook_failure,
)

SENDER, TO = "callplane <fraud@callplane.test>", "ops@example.com"


def alert(**overrides: object) -> FraudAlert:
    fields: dict[str, object] = {
        "event_id": "offer-31/call_spike",
        "occurred_at": "2025-06-01T12:09:30.000Z",
        "number": "+48123456789",
        "account_id": "acct_42",
        "rule": "call_spike",
        "count": 31,
        "threshold": 30,
        "window_s": 600,
        "first_at": "2025-06-01T12:00:00.000Z",
        "last_at": "2025-06-01T12:09:30.000Z",
        "evidence": AlertEvidence(
            first_call_id="call_1",
            last_call_id="call_31",
            top_source_ips=(Tally(value="203.0.113.7", count=25), Tally(value="198.51.100.22", count=6)),
            top_caller_prefixes=(Tally(value="+4479", count=20), Tally(value="+1415", count=11)),
        ),
    }
    return FraudAlert(**{**fields, **overrides})


def body_of(a: FraudAlert) -> str:
    return render_email(a, sender=SENDER, to=TO).get_content()


# -- render_email -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "subject"),
    [
        ({}, "[callplane] call_spike on +48123456789: 31 calls in 10 min (threshold 30)"),
        ({"window_s": 90, "count": 5, "threshold": 4}, "[callplane] call_spike on +48123456789: 5 calls in 90 s (threshold 4)"),
        ({"rule": "account_spike", "window_s": 3600}, "[callplane] account_spike on +48123456789: 31 calls in 1 h (threshold 30)"),
        ({"rule": "bad\r\nBcc: evil@example.com"}, "[callplane] bad Bcc: evil@example.com on +48123456789: 31 calls in 10 min (threshold 30)"),
    ],
)
def test_the_subject_says_rule_number_count_window_and_threshold(overrides: dict, subject: str) -> None:
    message = render_email(alert(**overrides), sender=SENDER, to=TO)
    assert message["Subject"] == subject
    assert message["Bcc"] is None  # a rule with a line break cannot add a header


def test_the_body_holds_everything_an_operator_needs() -> None:
    body = body_of(alert(summary="31 calls to +48123456789 within 10 min (threshold 30)"))
    for expected in [
        "Fraud alert: call_spike on +48123456789",
        "31 calls to +48123456789 within 10 min (threshold 30)",
        "Rule:        call_spike",
        "Number:      +48123456789",
        "Account:     acct_42",
        "Count:       31 calls in 10 min (threshold 30)",
        "Window:      600 s",
        "First call:  2025-06-01T12:00:00.000Z  call_1",
        "Last call:   2025-06-01T12:09:30.000Z  call_31",
        "Top source IPs (calls):\n  203.0.113.7    25\n  198.51.100.22  6\n",
        "Top remote-party prefixes (calls; the caller, or the destination of an outbound call):\n  +4479  20\n  +1415  11\n",
        "Alert id:    offer-31/call_spike",
    ]:
        assert expected in body, expected
    assert "Detector:" not in body  # a call spike has no detector specifics


def test_detector_specifics_are_shown_when_the_alert_has_them() -> None:
    evidence = AlertEvidence(
        source_ip="203.0.113.9",
        user_agent="friendly-scanner",
        distinct_numbers=42,
        destination_prefix="+882",
        baseline_per_minute=1.25,
        z_score=7.5,
    )
    body = body_of(alert(rule="scanner_sweep", evidence=evidence))
    assert "one source offering calls to many numbers" in body
    for expected in [
        "Source IP:          203.0.113.9",
        "User agent:         friendly-scanner",
        "Distinct numbers:   42",
        "Destination prefix: +882",
        "Baseline:           1.25 calls/min",
        "Z-score:            7.50",
    ]:
        assert expected in body, expected
    assert "Top source IPs" not in body  # no tallies given, no empty section
    assert "First call:  2025-06-01T12:00:00.000Z  -" in body
    assert " numbers in " in body and " calls in " not in body  # a sweep counts numbers, not calls


def test_an_alert_without_an_account_says_so() -> None:
    assert "Account:     -" in body_of(alert(account_id=None))


def test_headers_are_derived_from_the_alert_only() -> None:
    message = render_email(alert(), sender=SENDER, to="ops@example.com, sec@example.com")
    assert message["From"] == SENDER
    assert message["To"] == "ops@example.com, sec@example.com"
    assert message["Message-ID"] == "<offer-31/call_spike@callplane>"
    assert message["Date"] == "Sun, 01 Jun 2025 12:09:30 +0000"  # the alert's time, not the clock
    assert message["Auto-Submitted"] == "auto-generated"
    assert message["X-Callplane-Alert-Id"] == "offer-31/call_spike"
    assert message.get_content_type() == "text/plain"
    again = render_email(alert(), sender=SENDER, to="ops@example.com, sec@example.com")
    assert again.as_bytes() == message.as_bytes()  # pure: a redelivery renders the same message


def test_the_rendered_message_survives_a_round_trip() -> None:
    raw = render_email(alert(), sender=SENDER, to=TO).as_bytes(policy=policy.SMTP)
    parsed = message_from_bytes(raw, policy=policy.default)
    assert parsed["Message-ID"] == "<offer-31/call_spike@callplane>"
    assert "203.0.113.7" in parsed.get_content()


@pytest.mark.parametrize(
    ("event_id", "expected"),
    [
        ("offer-31/call_spike", "<offer-31/call_spike@callplane>"),
        ("evt_01HZX.3", "<evt_01HZX.3@callplane>"),
    ],
)
def test_message_id_is_the_event_id_when_it_can_be(event_id: str, expected: str) -> None:
    assert message_id(event_id) == expected


@pytest.mark.parametrize("event_id", ["has space", "a@b", "<x>", ".lead", "trail.", "a..b", "é", "x" * 201])
def test_message_id_is_a_hash_when_the_event_id_cannot_be_one(event_id: str) -> None:
    shown = message_id(event_id)
    assert re.fullmatch(r"<sha256\.[0-9a-f]{40}@callplane>", shown)
    assert shown == message_id(event_id) != message_id(event_id + "x")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(1, "1 s"), (59, "59 s"), (60, "1 min"), (90, "90 s"), (600, "10 min"), (3600, "1 h"), (5400, "90 min"), (86400, "24 h")],
)
def test_duration_text(seconds: int, text: str) -> None:
    assert duration_text(seconds) == text


# -- backoff ----------------------------------------------------------------------------

DEFAULT = RetryPolicy()


@pytest.mark.parametrize(
    ("retry", "draw", "delay"),
    [
        (1, 0.0, 4.0),
        (2, 0.0, 8.0),
        (3, 0.0, 16.0),
        (4, 0.0, 30.0),  # 32 capped
        (9, 0.0, 30.0),
        (1, 0.5, 3.0),
        (4, 0.999999, 15.00003),
    ],
)
def test_backoff_delay_table(retry: int, draw: float, delay: float) -> None:
    assert backoff_delay(retry, DEFAULT, draw) == pytest.approx(delay)


def test_the_default_policy_spends_about_a_minute_on_five_attempts() -> None:
    longest = sum(backoff_delay(r, DEFAULT, 0.0) for r in range(1, DEFAULT.attempts))
    shortest = sum(backoff_delay(r, DEFAULT, 0.999999) for r in range(1, DEFAULT.attempts))
    assert DEFAULT.attempts == 5
    assert longest == 58.0 and shortest == pytest.approx(29.0, abs=0.01)


@pytest.mark.parametrize(
    ("retry_after", "delay"), [(None, 4.0), (0.0, 4.0), (10.0, 10.0), (3600.0, 30.0)]
)
def test_retry_after_lengthens_the_wait_up_to_the_longest_delay(retry_after: float | None, delay: float) -> None:
    assert backoff_delay(1, DEFAULT, 0.0, retry_after) == delay


@given(
    retry=st.integers(min_value=1, max_value=30),
    draw=st.floats(min_value=0, max_value=1, exclude_max=True),
    first=st.floats(min_value=0.01, max_value=10),
    factor=st.floats(min_value=1, max_value=4),
    cap=st.floats(min_value=0.01, max_value=120),
    jitter=st.floats(min_value=0, max_value=1),
)
def test_a_delay_lies_within_its_jitter_band_and_never_exceeds_the_cap(
    retry: int, draw: float, first: float, factor: float, cap: float, jitter: float
) -> None:
    policy = RetryPolicy(first_delay_s=first, factor=factor, max_delay_s=cap, jitter=jitter)
    nominal = min(cap, first * factor ** (retry - 1))
    delay = backoff_delay(retry, policy, draw)
    assert nominal * (1 - jitter) - 1e-9 <= delay <= nominal + 1e-9 <= cap + 1e-9
    # with the same draw, a later retry never waits less
    assert backoff_delay(retry + 1, policy, draw) >= delay - 1e-9


# -- what a webhook status means --------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_2xx_is_delivered(status: int) -> None:
    assert webhook_failure(status) is None


@pytest.mark.parametrize(
    ("status", "transient"),
    [
        (301, False),
        (307, False),
        (400, False),
        (401, False),
        (403, False),
        (404, False),
        (410, False),
        (422, False),
        (408, True),
        (429, True),
        (500, True),
        (502, True),
        (503, True),
        (504, True),
    ],
)
def test_which_statuses_are_worth_retrying(status: int, transient: bool) -> None:
    failure = webhook_failure(status)
    assert failure is not None and failure.transient is transient
    assert f"HTTP {status}" in failure.reason


@pytest.mark.parametrize(
    ("header", "seconds"), [("120", 120.0), (" 5 ", 5.0), ("Wed, 21 Oct 2026 07:28:00 GMT", None), ("-1", None), (None, None)]
)
def test_retry_after_in_seconds_is_kept(header: str | None, seconds: float | None) -> None:
    failure = webhook_failure(503, header)
    assert failure is not None and failure.retry_after_s == seconds


# -- the retry loop ---------------------------------------------------------------------


class Script:
    """An attempt that plays a list of outcomes: None succeeds, an exception is raised."""

    def __init__(self, *outcomes: BaseException | None) -> None:
        self.outcomes = list(outcomes)
        self.calls = 0

    async def __call__(self) -> None:
        outcome = self.outcomes[self.calls]
        self.calls += 1
        if outcome is not None:
            raise outcome


def transient(reason: str = "answered HTTP 503", retry_after_s: float | None = None) -> DeliveryError:
    return DeliveryError(reason, transient=True, retry_after_s=retry_after_s)


async def run(script: Script, policy: RetryPolicy = DEFAULT, channel: str = "webhook"):
    metrics, slept = DeliveryMetrics(), []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    with capture_logs() as logs:
        result = await deliver(channel, "alert-1", script, policy=policy, metrics=metrics, sleep=sleep, draw=lambda: 0.0)
    return result, metrics.snapshot()[channel], slept, logs


async def test_transient_failures_are_retried_with_backoff_until_delivered() -> None:
    result, counts, slept, logs = await run(Script(transient(), transient(), None))
    assert result.delivered and result.attempts == 3 and result.error is None
    assert slept == [4.0, 8.0]
    assert counts == {"delivered": 1, "retried": 2, "failed": 0}
    assert [entry["event"] for entry in logs] == ["alert_delivered"]


async def test_a_permanent_failure_is_not_retried() -> None:
    result, counts, slept, logs = await run(Script(DeliveryError("answered HTTP 400", transient=False)))
    assert not result.delivered and result.attempts == 1 and slept == []
    assert counts == {"delivered": 0, "retried": 0, "failed": 1}
    [line] = logs
    assert line == {
        "event": "alert_delivery_failed",
        "log_level": "warning",
        "alert_id": "alert-1",
        "channel": "webhook",
        "reason": "answered HTTP 400",
        "transient": False,
        "attempts": 1,
    }


async def test_attempts_are_bounded() -> None:
    result, counts, slept, logs = await run(Script(*[transient()] * 5), channel="email")
    assert not result.delivered and result.attempts == 5 and result.error.transient
    assert slept == [4.0, 8.0, 16.0, 30.0]
    assert counts == {"delivered": 0, "retried": 4, "failed": 1}
    assert [entry["event"] for entry in logs] == ["alert_delivery_failed"]


async def test_retry_after_is_honoured() -> None:
    _result, _counts, slept, _logs = await run(Script(transient(retry_after_s=20), None))
    assert slept == [20.0]


async def test_each_attempt_has_its_own_deadline() -> None:
    calls = 0

    async def hangs_once() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(60)

    policy = RetryPolicy(attempt_timeout_s=0.05, first_delay_s=0.01)
    metrics = DeliveryMetrics()
    result = await asyncio.wait_for(deliver("email", "alert-1", hangs_once, policy=policy, metrics=metrics), 2)
    assert result.delivered and result.attempts == 2
    assert metrics.snapshot()["email"] == {"delivered": 1, "retried": 1, "failed": 0}


async def test_an_unexpected_error_is_a_counted_failure_not_a_crash() -> None:
    result, counts, _slept, logs = await run(Script(KeyError("https://hooks.example.com/?token=t0ps3cret")))
    assert not result.delivered and result.error.reason == "unexpected KeyError"
    assert counts["failed"] == 1
    assert "t0ps3cret" not in str(logs)


async def test_cancellation_is_passed_on() -> None:
    task = asyncio.create_task(
        deliver("webhook", "alert-1", lambda: asyncio.sleep(60), policy=DEFAULT, metrics=DeliveryMetrics())
    )
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_metrics_start_at_zero_for_every_channel_and_outcome() -> None:
    zero = {"delivered": 0, "retried": 0, "failed": 0}
    assert DeliveryMetrics().snapshot() == {"email": zero, "webhook": zero}
