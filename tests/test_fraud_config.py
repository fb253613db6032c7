"""The fraud service's environment maps onto the core's Detectors, SMTP and webhook settings,
and every setting is documented where operators look (README.md, the systemd env example)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from callplane.config import ConfigError, NatsSettings, from_env
from services.fraud.app import smtp_settings
from services.fraud.config import FraudSettings
from services.fraud.core import DEFAULT_DETECTORS
from services.fraud.delivery import SmtpSettings

ROOT = Path(__file__).resolve().parents[1]


def test_the_defaults_are_the_cores_detectors() -> None:
    assert from_env(FraudSettings, {}).detectors() == DEFAULT_DETECTORS


@pytest.mark.parametrize("detector", ["call_spike", "scanner_sweep", "account_spike", "irsf_destination", "baseline_jump"])
def test_every_detector_can_be_switched_off(detector: str) -> None:
    detectors = from_env(FraudSettings, {detector.upper(): "false"}).detectors()
    assert getattr(detectors, detector).enabled is False
    others = [name for name in DEFAULT_DETECTORS.__struct_fields__ if name != detector]
    assert all(getattr(detectors, name).enabled for name in others)


def test_every_detector_setting_reaches_the_core() -> None:
    env = {
        "SCANNER_SWEEP_DISTINCT_NUMBERS": "25",
        "SCANNER_SWEEP_WINDOW_S": "30",
        "SCANNER_SWEEP_USER_AGENTS": "Friendly-Scanner, evil-dialer",
        "ACCOUNT_SPIKE_CALLS": "900",
        "ACCOUNT_SPIKE_WINDOW_MINUTES": "10",
        "IRSF_DESTINATION_CALLS": "2",
        "IRSF_DESTINATION_WINDOW_MINUTES": "30",
        "IRSF_DESTINATION_PREFIXES": "+881,+882",
        "BASELINE_JUMP_Z_SCORE": "3.5",
        "BASELINE_JUMP_MIN_CALLS": "40",
        "BASELINE_JUMP_WARMUP_MINUTES": "60",
        "BASELINE_JUMP_ALPHA": "0.2",
    }
    d = from_env(FraudSettings, env).detectors()
    assert (d.scanner_sweep.distinct_numbers, d.scanner_sweep.window_s) == (25, 30)
    assert d.scanner_sweep.user_agents == ("friendly-scanner", "evil-dialer")
    assert (d.account_spike.calls, d.account_spike.window_minutes) == (900, 10)
    assert (d.irsf_destination.calls, d.irsf_destination.window_minutes) == (2, 30)
    assert d.irsf_destination.prefixes == ("+881", "+882")
    assert (d.baseline_jump.z_score, d.baseline_jump.min_calls, d.baseline_jump.warmup_minutes) == (3.5, 40, 60)
    assert d.baseline_jump.alpha == 0.2


@pytest.mark.parametrize(
    ("variable", "value"),
    [("BASELINE_JUMP_ALPHA", "1.5"), ("SCANNER_SWEEP_WINDOW_S", "0"), ("SMTP_PORT", "smtp"), ("CALL_SPIKE", "maybe")],
)
def test_a_bad_value_names_its_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        from_env(FraudSettings, {variable: value})


def test_smtp_is_off_without_a_host_and_secrets_stay_out_of_reprs() -> None:
    assert smtp_settings(FraudSettings()) is None
    settings = from_env(
        FraudSettings,
        {"SMTP_HOST": "mail.example.com", "SMTP_PASSWORD": "hunter2-canary", "FRAUD_WEBHOOK_SECRET": "whsec_c2VjcmV0LWNhbmFyeQ=="},
    )
    smtp = smtp_settings(settings)
    assert smtp is not None and smtp.host == "mail.example.com" and smtp.port == 587 and smtp.starttls
    for text in (repr(settings), str(settings), repr(smtp)):
        assert "hunter2-canary" not in text and "c2VjcmV0LWNhbmFyeQ" not in text


def test_every_smtp_setting_reaches_the_delivery_settings() -> None:
    env = {
        "SMTP_HOST": "relay.internal", "SMTP_PORT": "465", "SMTP_STARTTLS": "false", "SMTP_TLS": "true",
        "SMTP_USERNAME": "alerts", "SMTP_PASSWORD": "pw", "SMTP_FROM": "fraud <fraud@example.com>",
        "SMTP_TIMEOUT_S": "2.5", "SMTP_CA_FILE": "/etc/callplane/relay-ca.pem",
    }  # fmt: skip
    smtp = smtp_settings(from_env(FraudSettings, env))
    assert smtp == SmtpSettings(
        host="relay.internal", port=465, starttls=False, tls=True, username="alerts", password="pw",
        sender="fraud <fraud@example.com>", timeout_s=2.5, ca_file="/etc/callplane/relay-ca.pem",
    )  # fmt: skip


SETTINGS = [name.upper() for name in FraudSettings.__struct_fields__ if name not in NatsSettings.__struct_fields__]


@pytest.mark.parametrize("document", ["README.md", "deploy/systemd/callplane.env.example"])
def test_every_fraud_setting_is_documented(document: str) -> None:
    text = (ROOT / document).read_text(encoding="utf-8")
    missing = [name for name in SETTINGS if not re.search(rf"\b{name}\b", text)]
    assert missing == [], f"{document} does not mention {', '.join(missing)}"


def test_the_env_examples_fraud_values_are_valid_settings() -> None:
    text = (ROOT / "deploy/systemd/callplane.env.example").read_text(encoding="utf-8")
    env = dict(re.findall(r"^#([A-Z_]+)=(.+)$", text, re.M))
    settings = from_env(FraudSettings, {name: value for name, value in env.items() if name in SETTINGS})
    assert settings.detectors().scanner_sweep.user_agents == ("friendly-scanner", "sipvicious")
    assert smtp_settings(settings) is not None
