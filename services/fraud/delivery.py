"""Fraud alert delivery: an e-mail over SMTP and a signed webhook POST, each attempt under its
own deadline, transient failures retried with backoff and jitter, every outcome counted.

    message = render_email(alert, sender=smtp.sender, to="ops@example.com")   # pure
    await send_email(smtp, message)                                            # or DeliveryError
    await post_alert_webhook(client, url, secret, alert, now=now)              # or DeliveryError
    result = await deliver("email", alert.event_id, lambda: send_email(smtp, message),
                           policy=RetryPolicy(), metrics=metrics)              # never raises

`AlertDelivery` puts those together for the service: `email(alert, to)` and
`webhook(alert, url)`, each with the settings, the retry policy and the shared counters. The
service calls them from one durable consumer per channel (services/fraud/app.py), so a dead
mailbox or webhook never holds up detection, the other channel or other alerts.

Failures are one exception, DeliveryError(reason, transient). Its reason never holds the SMTP
password, the webhook secret or the webhook URL (URLs often carry tokens).
  e-mail:  transient: no answer in time, cannot connect, the connection drops, a 4xx reply;
           permanent: a 5xx reply (bad credentials 535, recipient refused 550 ...), the server
           cannot do what the settings require (STARTTLS, AUTH).
  webhook: delivered: 2xx. Permanent: 4xx other than 408 and 429, a 3xx (redirects are not
           followed), an unsafe URL (callplane.webhooks: SSRF, DNS pinned), a bad secret.
           Transient: 5xx, 408, 429 (Retry-After in seconds is honoured, up to the longest
           delay), no answer in time, DNS or connection errors.

Idempotency: the alert's event_id is the webhook-id of every attempt and the e-mail's
Message-ID, so a receiver can drop a redelivery (a retry, or a restart that sends again).
"""

from __future__ import annotations

import asyncio
import email.policy
import hashlib
import random
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, getaddresses, parseaddr
from typing import Literal, TypeAlias

import aiosmtplib
import httpx
import msgspec
import structlog

from callplane.webhooks import (
    Resolver,
    UnsafeWebhookUrl,
    checked_addresses,
    error_text,
    pinned,
    signed_headers,
    system_resolve,
)
from schemas import FraudAlert, Tally, encode, parse_timestamp

log = structlog.get_logger()

Channel: TypeAlias = Literal["email", "webhook"]
CHANNELS: tuple[Channel, ...] = ("email", "webhook")
OUTCOMES = ("delivered", "retried", "failed")
MAX_REASON_CHARS = 200

# One line for a human per rule, under the alert's title.
RULE_TEXT = {
    "call_spike": "more calls to this number than its fraud_alert policy allows",
    "scanner_sweep": "one source offering calls to many numbers, or a known SIP scanner",
    "account_spike": "more calls to all of the account's numbers together than allowed",
    "irsf_destination": "calls to a high-risk premium / revenue-share destination",
    "baseline_jump": "a sudden jump against the number's own baseline",
}


class DeliveryError(Exception):
    """One delivery attempt failed. `transient`: worth retrying; `retry_after_s`: the
    receiver asked to wait this long (429/503 Retry-After)."""

    def __init__(self, reason: str, *, transient: bool, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient
        self.retry_after_s = retry_after_s


def _scrub(reason: str, *secrets: str | None) -> str:
    for secret in secrets:
        if secret:
            reason = reason.replace(secret, "<redacted>")
    return reason[:MAX_REASON_CHARS]


# -- e-mail -----------------------------------------------------------------------------


class SmtpSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Where and how alert e-mail is sent."""

    host: str
    port: int = 587  # 587 submission with STARTTLS, 465 implicit TLS, 25 relay
    starttls: bool = True  # upgrade before AUTH and refuse a server that cannot (ignored with tls)
    tls: bool = False  # implicit TLS from the first byte (port 465)
    username: str | None = None  # AUTH user; None: no AUTH
    password: str | None = None  # never logged, never in a DeliveryError
    sender: str = "callplane <fraud@localhost>"  # the From header and envelope sender
    timeout_s: float = 10.0  # the whole exchange (connect, TLS, AUTH, message)
    ca_file: str | None = None  # PEM CAs to trust instead of the system's (a private relay)

    def __repr__(self) -> str:
        return (
            f"SmtpSettings(host={self.host!r}, port={self.port}, starttls={self.starttls}, tls={self.tls},"
            f" username={self.username!r}, password=<redacted>, sender={self.sender!r})"
        )


def duration_text(seconds: int) -> str:
    """600 -> "10 min", 7200 -> "2 h", 90 -> "90 s"."""
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds // 60} min"
    return f"{seconds} s"


_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = re.compile(rf"{_ATEXT}(\.{_ATEXT})*")


def message_id(event_id: str) -> str:
    """The Message-ID of an alert's e-mail: the same for every send of one alert. The event id
    itself when it is a valid id-left (ids like "offer-1/call_spike" are), else its hash."""
    left = event_id if _DOT_ATOM.fullmatch(event_id) and len(event_id) <= 200 else None
    if left is None:
        left = "sha256." + hashlib.sha256(event_id.encode()).hexdigest()[:40]
    return f"<{left}@callplane>"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _tallies(title: str, tallies: tuple[Tally, ...]) -> list[str]:
    if not tallies:
        return []
    width = max(len(t.value) for t in tallies)
    return ["", f"{title}:", *(f"  {_one_line(t.value):<{width}}  {t.count}" for t in tallies)]


def email_subject(alert: FraudAlert) -> str:
    window = duration_text(alert.window_s)
    return _one_line(
        f"[callplane] {alert.rule} on {alert.number}: {alert.count} calls in {window} (threshold {alert.threshold})"
    )


def email_body(alert: FraudAlert) -> str:
    evidence = alert.evidence
    # A scanner sweep counts the distinct numbers a source called, the other rules calls.
    unit = "numbers" if alert.rule == "scanner_sweep" else "calls"
    lines = [f"Fraud alert: {alert.rule} on {alert.number}"]
    if about := RULE_TEXT.get(alert.rule):
        lines.append(f"({about})")
    if alert.summary:
        lines += ["", _one_line(alert.summary)]
    lines += [
        "",
        f"Rule:        {alert.rule}",
        f"Number:      {alert.number}",
        f"Account:     {alert.account_id or '-'}",
        f"Count:       {alert.count} {unit} in {duration_text(alert.window_s)} (threshold {alert.threshold})",
        f"Window:      {alert.window_s} s",
        f"First call:  {alert.first_at}  {evidence.first_call_id or '-'}",
        f"Last call:   {alert.last_at}  {evidence.last_call_id or '-'}",
    ]
    lines += _tallies(f"Top source IPs ({unit})", evidence.top_source_ips)
    # top_caller_prefixes tallies the other party (core.remote_prefix): for outbound, the destination.
    remote = f"Top remote-party prefixes ({unit}; the caller, or the destination of an outbound call)"
    lines += _tallies(remote, evidence.top_caller_prefixes)
    specifics = [
        ("Source IP", evidence.source_ip),
        ("User agent", _one_line(evidence.user_agent)),
        ("Distinct numbers", evidence.distinct_numbers or ""),
        ("Destination prefix", evidence.destination_prefix),
        ("Baseline", "" if evidence.baseline_per_minute is None else f"{evidence.baseline_per_minute:.2f} calls/min"),
        ("Z-score", "" if evidence.z_score is None else f"{evidence.z_score:.2f}"),
    ]
    if shown := [(name, value) for name, value in specifics if value != ""]:
        lines += ["", "Detector:"] + [f"  {name + ':':<20}{value}" for name, value in shown]
    lines += [
        "",
        f"Alert id:    {alert.event_id}",
        f"Raised at:   {alert.occurred_at}",
        "",
        "This alert is also on the ALERTS stream (fraud.alert.*); recent ones:",
        f"  callplane alerts list --number {alert.number}",
    ]
    return "\n".join(lines) + "\n"


def render_email(alert: FraudAlert, *, sender: str, to: str) -> EmailMessage:
    """The alert as a plain-text e-mail (pure: the Date is the alert's time, the Message-ID
    derives from its event_id). `to` may list several addresses, comma-separated."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = email_subject(alert)
    message["Date"] = format_datetime(parse_timestamp(alert.occurred_at))
    message["Message-ID"] = message_id(alert.event_id)
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies to this
    message["X-Callplane-Alert-Id"] = _one_line(alert.event_id)
    message["X-Callplane-Rule"] = _one_line(alert.rule)
    message.set_content(email_body(alert))
    return message


# Headers are not folded below the RFC 5322 limit of 998: Python folds a subject like ours
# ("[callplane] ... +48...: ... (threshold 30)") before its first word, which some readers
# show with a leading space.
WIRE_POLICY = email.policy.SMTP.clone(max_line_length=998)


def _tls_context(settings: SmtpSettings) -> ssl.SSLContext | None:
    return ssl.create_default_context(cafile=settings.ca_file) if settings.ca_file else None


def _smtp_failure(error: BaseException, settings: SmtpSettings) -> DeliveryError:
    def fail(reason: str, transient: bool) -> DeliveryError:
        return DeliveryError(_scrub(reason, settings.password), transient=transient)

    match error:
        case TimeoutError():
            return fail(f"no answer from the SMTP server within {settings.timeout_s:g} s", True)
        case aiosmtplib.SMTPRecipientsRefused(recipients=refused):
            codes = sorted({r.code for r in refused})
            detail = "; ".join(f"{r.code} {_one_line(r.message)}" for r in refused)
            return fail(f"the SMTP server refused every recipient ({detail})", all(400 <= c < 500 for c in codes))
        case aiosmtplib.SMTPResponseException(code=code, message=text):
            kind = "refused the login" if isinstance(error, aiosmtplib.SMTPAuthenticationError) else "answered"
            return fail(f"the SMTP server {kind}: {code} {_one_line(text)}", 400 <= code < 500)
        case aiosmtplib.SMTPServerDisconnected() | aiosmtplib.SMTPConnectError() | OSError():  # connect, TLS
            return fail(f"the SMTP exchange failed ({error_text(error)})", True)
        case aiosmtplib.SMTPException():  # the server cannot do what the settings require (STARTTLS, AUTH)
            return fail(f"the SMTP server cannot do what the settings require ({error_text(error)})", False)
    return fail(f"the SMTP exchange failed ({type(error).__name__})", False)


async def send_email(settings: SmtpSettings, message: EmailMessage) -> None:
    """Send one message; raise DeliveryError (see the module docstring) if it was not accepted.
    aiosmtplib, not smtplib in a thread: the deadline cancels the exchange itself, and no
    worker thread (shared with getaddrinfo) is held by a server that stopped answering."""
    try:
        async with asyncio.timeout(settings.timeout_s):
            await aiosmtplib.send(
                message.as_bytes(policy=WIRE_POLICY),
                sender=parseaddr(message["From"] or settings.sender)[1],
                recipients=[address for _name, address in getaddresses(message.get_all("To", []))],
                hostname=settings.host,
                port=settings.port,
                username=settings.username,
                password=settings.password,
                use_tls=settings.tls,
                start_tls=False if settings.tls else settings.starttls,
                tls_context=_tls_context(settings),
                timeout=settings.timeout_s,
            )
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as error:
        raise _smtp_failure(error, settings) from None


# -- webhook ----------------------------------------------------------------------------

TRANSIENT_STATUSES = frozenset({408, 429})


def _retry_after(value: str | None) -> float | None:
    """Retry-After in delay-seconds (an HTTP-date is ignored: the backoff applies)."""
    if value is None or not value.strip().isdigit():
        return None
    return float(value.strip())


def webhook_failure(status: int, retry_after: str | None = None) -> DeliveryError | None:
    """What a webhook's HTTP status means: None for delivered, else the failure."""
    if 200 <= status < 300:
        return None
    if 300 <= status < 400:
        return DeliveryError(f"answered HTTP {status}; redirects are not followed", transient=False)
    transient = status >= 500 or status in TRANSIENT_STATUSES
    return DeliveryError(f"answered HTTP {status}", transient=transient, retry_after_s=_retry_after(retry_after))


async def _post(
    client: httpx.AsyncClient,
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    allow_private: bool,
    timeout_s: float,
    resolve: Resolver,
) -> None:
    try:
        host, addresses = await checked_addresses(url, allow_private=allow_private, resolve=resolve)
    except UnsafeWebhookUrl as error:
        raise DeliveryError(f"unsafe webhook URL: {error.reason}", transient=False) from None
    except OSError as error:
        raise DeliveryError(f"the webhook host does not resolve ({error_text(error)})", transient=True) from None
    try:
        with pinned(host, addresses):
            request = client.stream(
                "POST", url, content=body, headers=headers, timeout=timeout_s, follow_redirects=False
            )
            async with request as response:  # the answer's body is not read: only its status counts
                failure = webhook_failure(response.status_code, response.headers.get("retry-after"))
    except httpx.TimeoutException:
        raise TimeoutError from None
    except httpx.HTTPError as error:
        raise DeliveryError(f"the request failed ({error_text(error)})", transient=True) from None
    if failure is not None:
        raise failure


async def post_alert_webhook(
    client: httpx.AsyncClient,
    url: str,
    secret: str,
    alert: FraudAlert,
    *,
    now: datetime,
    allow_private: bool = False,
    timeout_s: float = 5.0,
    resolve: Resolver = system_resolve,
) -> None:
    """POST the alert's JSON, signed per Standard Webhooks with webhook-id = its event_id;
    return when the receiver answered 2xx, else raise DeliveryError. `timeout_s` bounds the
    whole exchange (DNS, connect, TLS, request, answer). `now` is the webhook-timestamp: pass
    the time of this attempt. `client` should come from callplane.webhooks.make_client()."""
    body = encode(alert)
    try:
        headers = signed_headers(secret, alert.event_id, now, body)
    except ValueError as error:  # the secret's form; the message never quotes it
        raise DeliveryError(f"bad webhook secret: {error}", transient=False) from None
    try:
        async with asyncio.timeout(timeout_s):
            await _post(
                client, url, body, headers, allow_private=allow_private, timeout_s=timeout_s, resolve=resolve
            )
    except TimeoutError:
        raise DeliveryError(f"no answer within {timeout_s * 1000:.0f} ms", transient=True) from None
    except DeliveryError as error:
        error.reason = _scrub(error.reason, url, secret)
        error.args = (error.reason,)
        raise


# -- retries and counters ---------------------------------------------------------------


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """Transient failures are retried; the defaults wait 4, 8, 16, 30 s (less jitter): five
    attempts within about a minute."""

    attempts: int = 5  # attempts in all, the first included
    first_delay_s: float = 4.0  # the nominal wait before the first retry
    factor: float = 2.0  # each nominal wait is this many times the one before ...
    max_delay_s: float = 30.0  # ... up to this
    jitter: float = 0.5  # a wait is drawn from [nominal * (1 - jitter), nominal]
    attempt_timeout_s: float = 30.0  # one attempt's deadline, whatever the channel's own


def backoff_delay(retry: int, policy: RetryPolicy, draw: float, retry_after_s: float | None = None) -> float:
    """Seconds to wait before retry number `retry` (1 = the first retry). `draw` in [0, 1) is
    the jitter's random draw; a receiver's Retry-After lengthens the wait, up to max_delay_s."""
    nominal = min(policy.max_delay_s, policy.first_delay_s * policy.factor ** (retry - 1))
    delay = nominal * (1 - policy.jitter * draw)
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, policy.max_delay_s))
    return delay


class DeliveryMetrics:
    """In-process counters per channel and outcome: delivered, retried (one per retry), failed
    (given up: permanent, or out of attempts)."""

    def __init__(self) -> None:
        self._counts = {(channel, outcome): 0 for channel in CHANNELS for outcome in OUTCOMES}

    def count(self, channel: str, outcome: str) -> None:
        self._counts[(channel, outcome)] = self._counts.get((channel, outcome), 0) + 1

    def snapshot(self) -> dict[str, dict[str, int]]:
        """{"email": {"delivered": 3, "retried": 1, "failed": 0}, "webhook": {...}}"""
        result: dict[str, dict[str, int]] = {}
        for (channel, outcome), value in self._counts.items():
            result.setdefault(channel, {})[outcome] = value
        return result


@dataclass(frozen=True)
class DeliveryResult:
    delivered: bool
    attempts: int
    error: DeliveryError | None = None  # the last failure, when not delivered


async def deliver(
    channel: str,
    alert_id: str,
    attempt: Callable[[], Awaitable[None]],
    *,
    policy: RetryPolicy,
    metrics: DeliveryMetrics,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    draw: Callable[[], float] = random.random,
) -> DeliveryResult:
    """Run `attempt` until it succeeds, fails permanently or runs out of attempts, each under
    policy.attempt_timeout_s; count the outcome and log one line. Never raises (but passes a
    cancellation on). `attempt` is called afresh each time: build the webhook timestamp inside."""
    error = DeliveryError("no attempt made", transient=False)
    n = 0
    for n in range(1, policy.attempts + 1):
        try:
            async with asyncio.timeout(policy.attempt_timeout_s):
                await attempt()
        except DeliveryError as failure:
            error = failure
        except TimeoutError:
            error = DeliveryError(f"no result within {policy.attempt_timeout_s:g} s", transient=True)
        except Exception as unexpected:  # a bug must not kill the task silently; its text may hold a URL
            error = DeliveryError(f"unexpected {type(unexpected).__name__}", transient=False)
        else:
            metrics.count(channel, "delivered")
            log.info("alert_delivered", alert_id=alert_id, channel=channel, attempts=n)
            return DeliveryResult(delivered=True, attempts=n)
        if not error.transient or n == policy.attempts:
            break
        metrics.count(channel, "retried")
        await sleep(backoff_delay(n, policy, draw(), error.retry_after_s))
    metrics.count(channel, "failed")
    log.warning(
        "alert_delivery_failed",
        alert_id=alert_id,
        channel=channel,
        reason=error.reason,
        transient=error.transient,
        attempts=n,
    )
    return DeliveryResult(delivered=False, attempts=n, error=error)


# -- the service's entry point ----------------------------------------------------------


def _utcnow() -> datetime:
    return datetime.now(UTC)


class AlertDelivery:
    """Sends one alert by e-mail or by webhook, retried per the policy, counted in `metrics`.

    smtp None turns e-mail off; client or webhook_secret None turns webhooks off (`email_on`,
    `webhooks_on`). `client` comes from callplane.webhooks.make_client() and is owned by the
    caller."""

    def __init__(
        self,
        *,
        smtp: SmtpSettings | None,
        client: httpx.AsyncClient | None,
        webhook_secret: str | None,
        webhook_timeout_s: float = 5.0,
        allow_private: bool = False,
        policy: RetryPolicy = RetryPolicy(),
        metrics: DeliveryMetrics | None = None,
        clock: Callable[[], datetime] = _utcnow,
        resolve: Resolver = system_resolve,
    ) -> None:
        self.smtp = smtp
        self.client = client
        self.webhook_secret = webhook_secret
        self.webhook_timeout_s = webhook_timeout_s
        self.allow_private = allow_private
        self.policy = policy
        self.metrics = metrics or DeliveryMetrics()
        self.clock = clock
        self.resolve = resolve

    @property
    def email_on(self) -> bool:
        return self.smtp is not None

    @property
    def webhooks_on(self) -> bool:
        return self.client is not None and self.webhook_secret is not None

    async def email(self, alert: FraudAlert, to: str) -> DeliveryResult:
        """Send the alert's e-mail to `to`, retrying per the policy."""
        smtp = self.smtp
        assert smtp is not None, "e-mail is off (no SMTP settings)"
        try:
            message = render_email(alert, sender=smtp.sender, to=to)
        except (ValueError, TypeError) as error:  # an address the headers cannot hold
            failure = DeliveryError(f"cannot address the e-mail ({error_text(error)})", transient=False)
            return await deliver("email", alert.event_id, _raiser(failure), policy=self.policy, metrics=self.metrics)
        return await deliver(
            "email", alert.event_id, lambda: send_email(smtp, message), policy=self.policy, metrics=self.metrics
        )

    async def webhook(self, alert: FraudAlert, url: str) -> DeliveryResult:
        """POST the alert to `url`, retrying per the policy; each attempt has its own timestamp."""
        client, secret = self.client, self.webhook_secret
        assert client is not None and secret is not None, "webhooks are off (no client or secret)"

        def attempt() -> Awaitable[None]:
            return post_alert_webhook(
                client,
                url,
                secret,
                alert,
                now=self.clock(),
                allow_private=self.allow_private,
                timeout_s=self.webhook_timeout_s,
                resolve=self.resolve,
            )

        return await deliver("webhook", alert.event_id, attempt, policy=self.policy, metrics=self.metrics)


def _raiser(error: DeliveryError) -> Callable[[], Awaitable[None]]:
    async def attempt() -> None:
        raise error

    return attempt
