"""Service settings read from an environment mapping, never os.environ in these tests."""

from __future__ import annotations

import pytest

from callplane.config import ConfigError, NatsSettings, from_env
from services.meter.config import MeterSettings
from services.provisioner.config import ProvisionerSettings


class WorkerSettings(NatsSettings, frozen=True, kw_only=True):
    """A settings Struct with the field kinds from_env converts."""

    fetch_batch: int = 10  # FETCH_BATCH
    dry_run: bool = False  # DRY_RUN
    peers: tuple[str, ...] = ()  # PEERS: comma-separated


def test_defaults_when_nothing_is_set():
    assert from_env(NatsSettings, {}) == NatsSettings(nats_url="nats://127.0.0.1:4222", nats_creds=None, log_level="info")


def test_every_field_is_read_from_its_upper_case_variable():
    env = {"NATS_URL": "nats://a:4222,nats://b:4222", "NATS_CREDS": "/etc/nats/svc.creds", "LOG_LEVEL": "debug"}
    assert from_env(NatsSettings, env) == NatsSettings(
        nats_url="nats://a:4222,nats://b:4222", nats_creds="/etc/nats/svc.creds", log_level="debug"
    )


def test_lower_case_or_unrelated_variables_are_ignored():
    assert from_env(NatsSettings, {"nats_url": "nats://x:1", "PATH": "/usr/bin"}) == NatsSettings()


def test_the_mapping_given_wins_over_os_environ(monkeypatch):
    monkeypatch.setenv("NATS_URL", "nats://from-os-environ:4222")
    assert from_env(NatsSettings, {}).nats_url == "nats://127.0.0.1:4222"


@pytest.mark.parametrize(
    ("cls", "env", "field", "expected"),
    [
        (MeterSettings, {}, "callplane_data_dir", ".callplane/data"),
        (MeterSettings, {"CALLPLANE_DATA_DIR": "/var/lib/callplane"}, "callplane_data_dir", "/var/lib/callplane"),
        (ProvisionerSettings, {}, "sip_domain", "sip.callplane.dev"),
        (ProvisionerSettings, {"SIP_DOMAIN": "sip.example.com"}, "sip_domain", "sip.example.com"),
        (ProvisionerSettings, {"LOG_LEVEL": "warning"}, "log_level", "warning"),
    ],
)
def test_service_settings_inherit_and_extend_the_shared_ones(cls, env, field, expected):
    assert getattr(from_env(cls, env), field) == expected


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"FETCH_BATCH": "25"}, {"fetch_batch": 25}),
        ({"FETCH_BATCH": "0"}, {"fetch_batch": 0}),
        ({"DRY_RUN": "true"}, {"dry_run": True}),
        ({"DRY_RUN": "false"}, {"dry_run": False}),
        ({"DRY_RUN": "1"}, {"dry_run": True}),
        ({"PEERS": "a,b,c"}, {"peers": ("a", "b", "c")}),
        ({"PEERS": "solo"}, {"peers": ("solo",)}),
    ],
)
def test_values_are_converted_from_strings(env, expected):
    settings = from_env(WorkerSettings, env)
    assert {name: getattr(settings, name) for name in expected} == expected


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"FETCH_BATCH": "ten"}, "fetch_batch"),
        ({"FETCH_BATCH": "1.5"}, "fetch_batch"),
        ({"FETCH_BATCH": ""}, "fetch_batch"),
        ({"DRY_RUN": "maybe"}, "dry_run"),
    ],
)
def test_a_bad_value_raises_config_error_naming_the_variable(env, field):
    with pytest.raises(ConfigError) as caught:
        from_env(WorkerSettings, env)
    assert f"in {field.upper()}:" in str(caught.value)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_settings_are_frozen():
    settings = from_env(NatsSettings, {})
    with pytest.raises(AttributeError):
        settings.nats_url = "nats://elsewhere:4222"  # type: ignore[misc]


# -- bugs found ----------------------------------------------------------------------


def test_a_bad_value_names_the_environment_variable():
    with pytest.raises(ConfigError, match="FETCH_BATCH"):
        from_env(WorkerSettings, {"FETCH_BATCH": "ten"})


def test_an_empty_list_variable_is_an_empty_list():
    assert from_env(WorkerSettings, {"PEERS": ""}).peers == ()
