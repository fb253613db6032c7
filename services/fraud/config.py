"""Fraud settings, from the environment: the detectors, alert recipients, SMTP, webhooks.

Secrets (SMTP_PASSWORD, FRAUD_WEBHOOK_SECRET) are read here and handed to the delivery
code only: never logged, never put in an event.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from callplane.config import NatsSettings

Positive = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]

# Known SIP scanner user agents (matched case-insensitively as substrings).
SCANNER_USER_AGENTS = ("friendly-scanner", "sipvicious", "sipcli", "sip-scan", "sundayddr", "iwar", "sipsak", "vaxsipuseragent")


class FraudSettings(NatsSettings, frozen=True, kw_only=True):
    # -- detectors (each one off-able; a rule name in fraud.alert) --------------------
    # CALL_SPIKE: "more than X calls within Y minutes" per number, X and Y from the number's
    # policy (fraud_alert); numbers without that policy are not watched by it.
    call_spike: bool = True
    # SCANNER_SWEEP: one source IP offering calls to SCANNER_SWEEP_NUMBERS or more distinct
    # numbers within SCANNER_SWEEP_WINDOW_S, or any offer from a known scanner user agent.
    scanner_sweep: bool = True
    scanner_sweep_numbers: Positive = 10
    scanner_sweep_window_s: Positive = 60
    # SCANNER_USER_AGENTS: comma-separated user-agent fragments that mark a SIP scanner.
    scanner_user_agents: tuple[str, ...] = SCANNER_USER_AGENTS
    # ACCOUNT_SPIKE: more than ACCOUNT_SPIKE_CALLS offers to all of an account's numbers
    # together within ACCOUNT_SPIKE_WINDOW_S.
    account_spike: bool = True
    account_spike_calls: Positive = 500
    account_spike_window_s: Positive = 300
    # IRSF_DESTINATION: outbound calls to high-risk premium / revenue-share ranges
    # (schemas.HIGH_RISK_PREFIXES): more than IRSF_DESTINATION_CALLS within
    # IRSF_DESTINATION_WINDOW_S from one number (0: the first such call alerts).
    irsf_destination: bool = True
    irsf_destination_calls: Annotated[int, msgspec.Meta(ge=0)] = 0
    irsf_destination_window_s: Positive = 3600
    # BASELINE_JUMP: calls per minute to a number against its own EWMA baseline: alert when
    # the z-score reaches BASELINE_Z, once BASELINE_MIN_MINUTES of history exist and the
    # minute holds at least BASELINE_MIN_CALLS; BASELINE_ALPHA is the EWMA's weight of a new minute.
    baseline_jump: bool = True
    baseline_alpha: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.1
    baseline_z: Annotated[float, msgspec.Meta(gt=0)] = 4.0
    baseline_min_minutes: Positive = 30
    baseline_min_calls: Positive = 20

    # -- recipients ---------------------------------------------------------------------
    # FRAUD_ALERT_EMAIL / FRAUD_ALERT_WEBHOOK_URL: where alerts go when the number's policy
    # names no recipient (scanner sweeps, account spikes, numbers without fraud_alert).
    # Unset: such alerts are published on ALERTS only.
    fraud_alert_email: str | None = None
    fraud_alert_webhook_url: str | None = None

    # -- e-mail (SMTP) ------------------------------------------------------------------
    smtp_host: str | None = None  # SMTP_HOST: unset turns e-mail off (alerts are still published)
    smtp_port: Positive = 587  # SMTP_PORT: 587 submission with STARTTLS, 465 implicit TLS, 25 relay
    smtp_starttls: bool = True  # SMTP_STARTTLS: upgrade the connection before AUTH (refuse if the server cannot)
    smtp_tls: bool = False  # SMTP_TLS: implicit TLS from the first byte (port 465)
    smtp_username: str | None = None  # SMTP_USERNAME: AUTH user; unset: no AUTH
    smtp_password: str | None = None  # SMTP_PASSWORD: AUTH password (never logged)
    smtp_from: str = "callplane <fraud@localhost>"  # SMTP_FROM: the From header and envelope sender
    smtp_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0  # SMTP_TIMEOUT_S: one delivery attempt's deadline

    # -- webhooks -------------------------------------------------------------------------
    # FRAUD_WEBHOOK_SECRET: the Standard Webhooks signing secret (whsec_<base64>), shared
    # with every receiver; unset turns webhooks off.
    fraud_webhook_secret: str | None = None
    fraud_webhook_timeout_ms: Annotated[int, msgspec.Meta(ge=1, le=30_000)] = 5000  # FRAUD_WEBHOOK_TIMEOUT_MS: one POST's deadline
    # FRAUD_WEBHOOK_ALLOW_PRIVATE: let webhook URLs resolve to loopback / private addresses
    # (a receiver on the same host or network); refused by default (SSRF).
    fraud_webhook_allow_private: bool = False

    def __repr__(self) -> str:  # the secrets stay out of any accidental log line or traceback
        return f"FraudSettings(nats_url={self.nats_url!r}, smtp_host={self.smtp_host!r}, ...)"
