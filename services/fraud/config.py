"""Fraud settings, from the environment: the detectors, alert recipients, SMTP, webhooks.

Secrets (SMTP_PASSWORD, FRAUD_WEBHOOK_SECRET) are read here and handed to the delivery
code only: never logged, never put in an event.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from callplane.config import NatsSettings

from .core import (
    DEFAULT_DETECTORS,
    AccountSpike,
    BaselineJump,
    CallSpike,
    Detectors,
    IrsfDestination,
    NonNegativeInt,
    PositiveInt,
    ScannerSweep,
)

# Defaults are the core's (one copy): the values are listed in README.md and deploy/README.md.
_D = DEFAULT_DETECTORS


class FraudSettings(NatsSettings, frozen=True, kw_only=True):
    # -- detectors (each off-able with <DETECTOR>=false; its rule name in fraud.alert) ------
    # CALL_SPIKE: "more than X calls within Y minutes" per number, X and Y (and recipients)
    # from the number's policy (fraud_alert); numbers without that policy are not watched.
    call_spike: bool = _D.call_spike.enabled
    # SCANNER_SWEEP: one source IP offering calls to SCANNER_SWEEP_DISTINCT_NUMBERS numbers
    # within SCANNER_SWEEP_WINDOW_S, or any offer whose User-Agent contains one of
    # SCANNER_SWEEP_USER_AGENTS (comma-separated, case-insensitive: friendly-scanner, sipvicious, ...).
    scanner_sweep: bool = _D.scanner_sweep.enabled
    scanner_sweep_distinct_numbers: PositiveInt = _D.scanner_sweep.distinct_numbers
    scanner_sweep_window_s: PositiveInt = _D.scanner_sweep.window_s
    scanner_sweep_user_agents: tuple[str, ...] = _D.scanner_sweep.user_agents
    # ACCOUNT_SPIKE: more than ACCOUNT_SPIKE_CALLS offers to all of an account's numbers
    # together within ACCOUNT_SPIKE_WINDOW_MINUTES.
    account_spike: bool = _D.account_spike.enabled
    account_spike_calls: NonNegativeInt = _D.account_spike.calls
    account_spike_window_minutes: PositiveInt = _D.account_spike.window_minutes
    # IRSF_DESTINATION: more than IRSF_DESTINATION_CALLS outbound offers from an account to
    # high-risk premium / revenue-share ranges (IRSF_DESTINATION_PREFIXES, comma-separated;
    # default schemas.HIGH_RISK_PREFIXES) within IRSF_DESTINATION_WINDOW_MINUTES (0: the first alerts).
    irsf_destination: bool = _D.irsf_destination.enabled
    irsf_destination_calls: NonNegativeInt = _D.irsf_destination.calls
    irsf_destination_window_minutes: PositiveInt = _D.irsf_destination.window_minutes
    irsf_destination_prefixes: tuple[str, ...] = _D.irsf_destination.prefixes
    # BASELINE_JUMP: a number's calls this minute against its own EWMA baseline: alert at a
    # z-score of BASELINE_JUMP_Z_SCORE with at least BASELINE_JUMP_MIN_CALLS calls in the
    # minute, after BASELINE_JUMP_WARMUP_MINUTES of history; BASELINE_JUMP_ALPHA is the
    # EWMA's weight of the newest minute.
    baseline_jump: bool = _D.baseline_jump.enabled
    baseline_jump_z_score: Annotated[float, msgspec.Meta(gt=0)] = _D.baseline_jump.z_score
    baseline_jump_min_calls: PositiveInt = _D.baseline_jump.min_calls
    baseline_jump_warmup_minutes: NonNegativeInt = _D.baseline_jump.warmup_minutes
    baseline_jump_alpha: Annotated[float, msgspec.Meta(gt=0, le=1)] = _D.baseline_jump.alpha

    # -- recipients ---------------------------------------------------------------------
    # FRAUD_ALERT_EMAIL / FRAUD_ALERT_WEBHOOK_URL: where alerts go when the number's policy
    # names no recipient (scanner sweeps, account spikes, numbers without fraud_alert).
    # Unset: such alerts are published on ALERTS only.
    fraud_alert_email: str | None = None
    fraud_alert_webhook_url: str | None = None

    # -- e-mail (SMTP) ------------------------------------------------------------------
    smtp_host: str | None = None  # SMTP_HOST: unset turns e-mail off (alerts are still published)
    smtp_port: PositiveInt = 587  # SMTP_PORT: 587 submission with STARTTLS, 465 implicit TLS, 25 relay
    smtp_starttls: bool = True  # SMTP_STARTTLS: upgrade the connection before AUTH (refuse if the server cannot)
    smtp_tls: bool = False  # SMTP_TLS: implicit TLS from the first byte (port 465)
    smtp_username: str | None = None  # SMTP_USERNAME: AUTH user; unset: no AUTH
    smtp_password: str | None = None  # SMTP_PASSWORD: AUTH password (never logged)
    smtp_from: str = "callplane <fraud@localhost>"  # SMTP_FROM: the From header and envelope sender
    smtp_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0  # SMTP_TIMEOUT_S: one delivery attempt's deadline
    # SMTP_CA_FILE: PEM file of the CAs to trust for the server's certificate instead of the
    # system's (a relay with a private CA); unset: the system's CAs.
    smtp_ca_file: str | None = None

    # -- webhooks -------------------------------------------------------------------------
    # FRAUD_WEBHOOK_SECRET: the Standard Webhooks signing secret (whsec_<base64>), shared
    # with every receiver; unset turns webhooks off.
    fraud_webhook_secret: str | None = None
    fraud_webhook_timeout_ms: Annotated[int, msgspec.Meta(ge=1, le=30_000)] = 5000  # FRAUD_WEBHOOK_TIMEOUT_MS: one POST's deadline
    # FRAUD_WEBHOOK_ALLOW_PRIVATE: let webhook URLs resolve to loopback / private addresses
    # (a receiver on the same host or network); refused by default (SSRF).
    fraud_webhook_allow_private: bool = False

    def detectors(self) -> Detectors:
        """The core's detector configuration, from these settings."""
        return Detectors(
            call_spike=CallSpike(enabled=self.call_spike),
            scanner_sweep=ScannerSweep(
                enabled=self.scanner_sweep,
                distinct_numbers=self.scanner_sweep_distinct_numbers,
                window_s=self.scanner_sweep_window_s,
                user_agents=tuple(agent.lower() for agent in self.scanner_sweep_user_agents),
            ),
            account_spike=AccountSpike(
                enabled=self.account_spike,
                calls=self.account_spike_calls,
                window_minutes=self.account_spike_window_minutes,
            ),
            irsf_destination=IrsfDestination(
                enabled=self.irsf_destination,
                calls=self.irsf_destination_calls,
                window_minutes=self.irsf_destination_window_minutes,
                prefixes=self.irsf_destination_prefixes,
            ),
            baseline_jump=BaselineJump(
                enabled=self.baseline_jump,
                z_score=self.baseline_jump_z_score,
                min_calls=self.baseline_jump_min_calls,
                warmup_minutes=self.baseline_jump_warmup_minutes,
                alpha=self.baseline_jump_alpha,
            ),
        )

    def __repr__(self) -> str:  # the secrets stay out of any accidental log line or traceback
        return f"FraudSettings(nats_url={self.nats_url!r}, smtp_host={self.smtp_host!r}, ...)"
