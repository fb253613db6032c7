"""A canary secret sent through every path that takes one never comes back out.

Twilio tokens and SIP passwords go in through the admin API, in valid requests, invalid
ones and requests that fail on purpose. Afterwards the canary must be in no response
(body or header), no log line (structlog configured as the services configure it, JSON),
no message on any stream and no SECRETS value (those are Fernet ciphertext). Only its last
four characters may show, and only in a `*_hint` field.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import httpx
import nats
import pytest
import structlog
from nats.js import JetStreamContext

from callplane import logs
from schemas import STREAMS
from services.provisioner.app import Provisioner
from services.provisioner.config import ProvisionerSettings
from services.provisioner.http import build_app
from callplane.secrets import SecretBox

CANARY = "Zq-7f3e9d2a1b8c-Xw"  # no word of its own: file names in a traceback say "canary"
HINT = "\u2022" * 8 + CANARY[-4:]
SID = "AC" + "0123456789abcdef" * 2
KEYS = SecretBox.generate_key()


# Generated ids are random hex, and may hold a few canary characters by chance.
IDS = re.compile(r"\b(pn|ev|sec|credit)_[0-9a-f]{32}\b")


def leaks(text: str, window: int = 5) -> bool:
    """Any `window` consecutive characters of the canary (outside generated ids)."""
    text = IDS.sub("<id>", text)
    return any(CANARY[i : i + window] in text for i in range(len(CANARY) - window + 1))


def assert_response_keeps_the_secret(response: httpx.Response) -> None:
    for name, value in response.headers.items():
        assert not leaks(value), (name, value)
    if not response.content:
        return
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert not leaks(json.dumps(without_hints(body))), response.text
    for hint in hints(body):  # the last four characters, in a hint, and nothing more
        assert hint in (None, HINT) or not leaks(hint, 4), hint


def without_hints(value: object) -> object:
    if isinstance(value, dict):
        return {k: without_hints(v) for k, v in value.items() if not k.endswith("_hint")}
    if isinstance(value, list):
        return [without_hints(v) for v in value]
    return value


def hints(value: object) -> Iterator[str | None]:
    if isinstance(value, dict):
        for key, item in value.items():
            if key.endswith("_hint"):
                yield item
            else:
                yield from hints(item)
    elif isinstance(value, list):
        for item in value:
            yield from hints(item)


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """Log lines as the services write them (JSON), into a buffer this test reads."""
    saved = structlog.get_config()
    logs.configure("provisioner", json=True)
    buffer = io.StringIO()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(buffer), cache_logger_on_first_use=False)
    yield buffer
    structlog.configure(**saved)


@asynccontextmanager
async def admin_api(js: JetStreamContext, **settings: object) -> AsyncIterator[tuple[httpx.AsyncClient, Provisioner]]:
    config = ProvisionerSettings(**{"callplane_secret_keys": KEYS, "http_port": -1, **settings})
    provisioner = Provisioner(js, config)
    await provisioner.start()
    transport = httpx.ASGITransport(app=build_app(provisioner, config), raise_app_exceptions=False)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://provisioner") as client:
            yield client, provisioner
    finally:
        await provisioner.stop()


async def everything_stored(js: JetStreamContext) -> tuple[str, str]:
    """Every message of every stream (subject, headers, data), and every SECRETS value."""
    messages = []
    for stream in STREAMS:
        last = (await js.stream_info(stream)).state.last_seq
        for seq in range(1, last + 1):
            message = await js.get_msg(stream, seq)
            messages.append(f"{message.subject} {message.headers} {message.data.decode()}")
    kv = await js.key_value("SECRETS")
    try:
        keys = await kv.keys()
    except nats.js.errors.NoKeysError:
        keys = []
    sealed = [(await kv.get(key)).value.decode() for key in keys]
    return "\n".join(messages), "\n".join(sealed)


def twilio(number: str, token: str = CANARY, **extra: object) -> dict:
    return {"phone_number": number, "account_id": "acct_1", "provider": "twilio", "sid": SID, "token": token, **extra}


def trunk(number: str, **extra: object) -> dict:
    return {"phone_number": number, "account_id": "acct_1", "provider": "sip_trunk", **extra}


CREDENTIALS = {"username": "user", "password": CANARY}

# (what, path suffix or None for the collection, body, expected status)
REQUESTS = [
    ("twilio import", None, twilio("+48123456701"), 201),
    ("outbound trunk credentials", None, trunk("+48123456702", outbound_trunk={"address": "t.example.com", "credentials": CREDENTIALS}), 201),
    ("inbound trunk credentials", None, trunk("+48123456703", inbound_trunk={"credentials": CREDENTIALS}), 201),
    ("canary in unknown fields", None, trunk("+48123456704", api_key=CANARY, outbound_trunk={"address": "t.example.com", "password": CANARY}), 201),
    ("conflicting double register", None, twilio("+48123456701"), 409),
    ("invalid sid", None, twilio("+48123456705", sid="AC123"), 422),
    ("bad number", None, twilio("12345"), 422),
    ("sid of the wrong type", None, twilio("+48123456706", sid=12345), 422),
    ("token of the wrong type", None, twilio("+48123456706", token=[CANARY]), 422),
    ("token too long", None, twilio("+48123456706", token=CANARY * 30), 422),
    ("twilio token on a sip trunk", None, trunk("+48123456706", token=CANARY), 422),
    ("enum error next to a password", None, trunk("+48123456706", outbound_trunk={"address": "t.example.com", "transport": CANARY, "credentials": CREDENTIALS}), 422),
    ("bad trunk address next to a password", None, trunk("+48123456706", outbound_trunk={"address": "sip:" + CANARY, "credentials": CREDENTIALS}), 422),
    ("header value with a line break", None, trunk("+48123456706", outbound_trunk={"address": "t.example.com", "headers": {"X-Key": CANARY + "\r\nVia: x"}}), 422),
    ("bad inbound address next to a password", None, trunk("+48123456706", inbound_trunk={"allowed_addresses": ["10.0.0.1/99"], "credentials": CREDENTIALS}), 422),
    ("sync twilio with a new token", "twilio-sync", {"sid": SID, "token": CANARY}, 200),
    ("sync trunk with new passwords", "trunk-sync", {"outbound_trunk": {"address": "t.example.com", "credentials": CREDENTIALS}, "inbound_trunk": {"credentials": CREDENTIALS}}, 200),
    ("sync with an invalid sid", "twilio-sync", {"sid": "nope", "token": CANARY}, 422),
    ("sync a trunk with twilio credentials", "trunk-sync", {"sid": SID, "token": CANARY}, 422),
]  # fmt: skip


async def test_a_canary_secret_in_valid_and_invalid_requests_never_comes_back_out(
    js: JetStreamContext, log_lines: io.StringIO, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with admin_api(js) as (api, _):
        twilio_number = (await api.post("/v1/phone-numbers", json=twilio("+48123456790", token="another-token-0000"))).json()
        trunk_number = (await api.post("/v1/phone-numbers", json=trunk("+48123456791"))).json()
        sync_urls = {
            "twilio-sync": f"/v1/phone-numbers/{twilio_number['phone_number_id']}/sync",
            "trunk-sync": f"/v1/phone-numbers/{trunk_number['phone_number_id']}/sync",
        }
        for what, target, body, status in REQUESTS:
            url = sync_urls[target] if target else "/v1/phone-numbers"
            response = await api.post(url, json=body)
            assert response.status_code == status, (what, response.text)
            assert_response_keeps_the_secret(response)

        malformed = await api.post("/v1/phone-numbers", content=f'{{"token": "{CANARY}", "sid": '.encode())
        assert malformed.status_code == 400
        assert_response_keeps_the_secret(malformed)

        # What was stored shows the hint, and only the hint, everywhere it is read back.
        listed = await api.get("/v1/phone-numbers")
        assert_response_keeps_the_secret(listed)
        views = {n["phone_number"]: n for n in listed.json()["phone_numbers"]}
        assert views["+48123456701"]["twilio"]["auth_token_hint"] == HINT
        assert views["+48123456702"]["outbound_trunk"]["password_hint"] == HINT
        assert views["+48123456703"]["inbound_trunk"]["password_hint"] == HINT
        assert views["+48123456790"]["twilio"]["auth_token_hint"] == HINT  # synced to the canary
        assert views["+48123456791"]["inbound_trunk"]["password_hint"] == HINT
        for view in views.values():
            assert_response_keeps_the_secret(await api.get(f"/v1/phone-numbers/{view['phone_number_id']}"))

    events, sealed = await everything_stored(js)
    assert events and not leaks(events), "a stream holds the canary"
    assert sealed and not leaks(sealed), "a SECRETS value holds the canary in plaintext"
    assert_no_log_leaks(log_lines, capsys, caplog)


async def test_forced_failures_keep_the_secret_out_of_responses_and_logs(
    js: JetStreamContext,
    nats_url: str,
    log_lines: io.StringIO,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    # A bug that puts the whole command, token included, into an exception message.
    async with admin_api(js) as (api, provisioner):

        async def buggy(command: object) -> None:
            raise ValueError(f"cannot handle {command!r}")

        provisioner.handle = buggy
        response = await api.post("/v1/phone-numbers", json=twilio("+48123456701"))
        assert response.status_code == 500 and response.json()["code"] == "internal"
        assert_response_keeps_the_secret(response)
    assert "http_failed" in log_lines.getvalue()

    # NATS gone while the request is handled.
    nc = await nats.connect(nats_url)
    async with admin_api(nc.jetstream()) as (api, _):
        await nc.close()
        response = await api.post("/v1/phone-numbers", json=twilio("+48123456702"))
        assert response.status_code == 503 and response.json()["code"] == "unavailable"
        assert_response_keeps_the_secret(response)

    # No keys to seal the secret with.
    async with admin_api(js, callplane_secret_keys=None) as (api, _):
        response = await api.post("/v1/phone-numbers", json=twilio("+48123456703"))
        assert response.status_code == 422 and response.json()["rule"] == "secret_keys"
        assert_response_keeps_the_secret(response)

    # The canary as a wrong admin token.
    async with admin_api(js, admin_token="the-real-admin-token") as (api, _):
        response = await api.post(
            "/v1/phone-numbers", json=twilio("+48123456704"), headers={"Authorization": f"Bearer {CANARY}"}
        )
        assert response.status_code == 401
        assert_response_keeps_the_secret(response)

    events, sealed = await everything_stored(js)
    assert not leaks(events) and not leaks(sealed)
    assert_no_log_leaks(log_lines, capsys, caplog)


def assert_no_log_leaks(log_lines: io.StringIO, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    lines = log_lines.getvalue().splitlines()
    assert any(json.loads(line)["event"] == "http_request" for line in lines)  # the capture did capture
    for line in lines:
        assert not leaks(line), line
    out, err = capsys.readouterr()
    assert not leaks(out) and not leaks(err)
    assert not leaks(caplog.text)
