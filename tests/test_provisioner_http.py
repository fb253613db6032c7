"""The admin HTTP API end to end: HTTP in, a Provisioner on a real nats-server behind it.

The gatekeeper's core runs in-process too, fed by its own projection of NUMBERS, to show
that a policy changed over HTTP is what the next admission decides with.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import httpx
import pytest
from nats.js import JetStreamContext

from schemas import CallAccepted, CallOffered, CallRejected
from schemas.commands import ConfigureAccount
from services.gatekeeper.app import Gatekeeper
from services.gatekeeper.core import decide as admit
from services.provisioner.app import Provisioner
from services.provisioner.config import ProvisionerSettings
from services.provisioner.http import AccountSettings, build_app
from callplane.secrets import SecretBox

NUMBER = "+48123456789"
KEYS = SecretBox.generate_key()
SID = "AC" + "0123456789abcdef" * 2
DOMAIN = "sip.example.test"


@asynccontextmanager
async def admin_api(js: JetStreamContext, **settings: object) -> AsyncIterator[httpx.AsyncClient]:
    config = ProvisionerSettings(callplane_secret_keys=KEYS, http_port=-1, sip_domain=DOMAIN, **settings)
    provisioner = Provisioner(js, config)
    await provisioner.start()
    transport = httpx.ASGITransport(app=build_app(provisioner, config))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://provisioner") as client:
            yield client
    finally:
        await provisioner.stop()


@pytest.fixture
async def api(js: JetStreamContext) -> AsyncIterator[httpx.AsyncClient]:
    async with admin_api(js) as client:
        yield client


def sip_trunk(number: str = NUMBER, account_id: str = "acct_1", **extra: object) -> dict:
    return {"phone_number": number, "account_id": account_id, "provider": "sip_trunk", **extra}


async def register(api: httpx.AsyncClient, number: str = NUMBER, **extra: object) -> dict:
    response = await api.post("/v1/phone-numbers", json=sip_trunk(number, **extra))
    assert response.status_code == 201, response.text
    return response.json()


def assert_error(response: httpx.Response, status: int, code: str, field: str | None = None, rule: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["code"] == code and body["message"]
    if field is not None:
        assert body["field"] == field, body
    if rule is not None:
        assert body["rule"] == rule, body
    return body


# -- numbers ------------------------------------------------------------------------


async def test_the_template_comes_before_registration_and_the_number_is_embedded_after(api: httpx.AsyncClient) -> None:
    template = (await api.get("/v1/sip-uri-template")).json()["template"]
    assert template == f"<your-number>@{DOMAIN}:5060;transport=tcp"
    response = await api.post("/v1/phone-numbers", json=sip_trunk(label="Support"))
    assert response.status_code == 201
    number = response.json()
    assert number["sip_uri"] == template.replace("<your-number>", NUMBER)
    assert number["phone_number_id"].startswith("pn_") and number["label"] == "Support"
    assert response.headers["location"] == f"/v1/phone-numbers/{number['phone_number_id']}"


async def test_a_number_registered_twice_gets_a_conflict_naming_the_phone_number(api: httpx.AsyncClient) -> None:
    await register(api)
    second = await api.post("/v1/phone-numbers", json=sip_trunk(account_id="acct_2"))
    assert_error(second, 409, "conflict", field="phone_number", rule="unique")


async def test_numbers_are_listed_filtered_by_account_and_got_by_id(api: httpx.AsyncClient) -> None:
    first = await register(api, "+48123456781", account_id="acct_a")
    await register(api, "+48123456782", account_id="acct_b")
    everything = (await api.get("/v1/phone-numbers")).json()["phone_numbers"]
    assert [n["phone_number"] for n in everything] == ["+48123456781", "+48123456782"]
    only_a = (await api.get("/v1/phone-numbers", params={"account_id": "acct_a"})).json()["phone_numbers"]
    assert only_a == [first]
    assert (await api.get(f"/v1/phone-numbers/{first['phone_number_id']}")).json() == first
    assert_error(await api.get("/v1/phone-numbers/pn_nosuch"), 404, "not_found", field="phone_number_id")


async def test_an_assigned_number_is_deleted_only_when_forced(api: httpx.AsyncClient) -> None:
    number = await register(api)
    url = f"/v1/phone-numbers/{number['phone_number_id']}"
    usage = (await api.get(f"{url}/usage")).json()
    assert usage == {"assignment_type": None, "agent_id": None, "deletable": True}

    assigned = await api.patch(url, json={"agent_id": "agent_1"})
    assert assigned.status_code == 200 and assigned.json()["agent_id"] == "agent_1"
    usage = (await api.get(f"{url}/usage")).json()
    assert usage == {"assignment_type": "agent", "agent_id": "agent_1", "deletable": False}

    assert_error(await api.delete(url), 409, "conflict", field="phone_number_id", rule="assigned")
    assert (await api.delete(url, params={"force": "true"})).status_code == 204
    assert_error(await api.get(url), 404, "not_found")
    assert_error(await api.delete(url), 404, "not_found")


async def test_agent_id_null_unassigns_and_an_unassigned_number_deletes_without_force(api: httpx.AsyncClient) -> None:
    number = await register(api)
    url = f"/v1/phone-numbers/{number['phone_number_id']}"
    softphone = (await api.patch(url, json={"agent_id": "agent_1", "assignment_type": "softphone"})).json()
    assert softphone["assignment_type"] == "softphone"
    relabeled = (await api.patch(url, json={"label": "Sales"})).json()
    assert (relabeled["label"], relabeled["agent_id"]) == ("Sales", "agent_1")  # left out: left as it is
    unassigned = (await api.patch(url, json={"agent_id": None})).json()
    assert (unassigned["agent_id"], unassigned["assignment_type"], unassigned["label"]) == (None, None, "Sales")
    assert (await api.delete(url)).status_code == 204


async def test_the_quota_refuses_a_third_number_with_409_quota_exceeded(js: JetStreamContext) -> None:
    async with admin_api(js, max_numbers_per_account=2) as api:
        await register(api, "+48123456781")
        await register(api, "+48123456782")
        third = await api.post("/v1/phone-numbers", json=sip_trunk("+48123456783"))
        assert_error(third, 409, "quota_exceeded", field="account_id", rule="quota")
        await register(api, "+48123456783", account_id="acct_other")


async def test_sync_replaces_the_provider_config_and_uses_no_quota(js: JetStreamContext) -> None:
    async with admin_api(js, max_numbers_per_account=1) as api:
        number = await register(api, outbound_trunk={"address": "old.example.com"})
        url = f"/v1/phone-numbers/{number['phone_number_id']}/sync"
        synced = await api.post(url, json={"outbound_trunk": {"address": "new.example.com", "transport": "tls"}})
        assert synced.status_code == 200
        assert (synced.json()["outbound_trunk"]["address"], synced.json()["outbound_trunk"]["transport"]) == (
            "new.example.com",
            "tls",
        )
        unchanged = await api.post(url)  # an empty body keeps everything
        assert unchanged.status_code == 200 and unchanged.json()["outbound_trunk"]["address"] == "new.example.com"


async def test_a_twilio_import_shows_the_sid_and_only_a_hint_of_the_token(api: httpx.AsyncClient) -> None:
    token = "twilio-auth-token-0123456789abcdef"
    body = {"phone_number": NUMBER, "account_id": "acct_1", "provider": "twilio", "sid": SID, "token": token}
    response = await api.post("/v1/phone-numbers", json=body)
    assert response.status_code == 201, response.text
    assert response.json()["twilio"] == {"account_sid": SID, "auth_token_hint": "\u2022" * 8 + "cdef"}
    assert token not in response.text


# -- policy and admission ---------------------------------------------------------


async def test_a_policy_put_over_http_is_what_the_next_admission_decides_with(
    api: httpx.AsyncClient, js: JetStreamContext
) -> None:
    gatekeeper = Gatekeeper(js)
    await gatekeeper.numbers.follow()
    number = await register(api)
    url = f"/v1/phone-numbers/{number['phone_number_id']}"
    await api.patch(url, json={"agent_id": "agent_1"})

    offer = make_offer(caller="+19005550123")
    await gatekeeper.numbers.catch_up()
    assert isinstance(admit(gatekeeper.state, offer("call_1"), now=datetime.now(UTC)), CallAccepted)

    assert (await api.get(f"{url}/security-policy")).json() == {"policy": empty_policy(), "policy_version": 0}
    put = await api.put(f"{url}/security-policy", json={"blocked_prefixes": ["+1900"]})
    assert put.status_code == 200, put.text
    assert put.json()["policy"]["blocked_prefixes"] == ["+1900"] and put.json()["policy_version"] == 1
    assert (await api.get(f"{url}/security-policy")).json() == put.json()

    await gatekeeper.numbers.catch_up()
    decision = admit(gatekeeper.state, offer("call_2"), now=datetime.now(UTC))
    assert isinstance(decision, CallRejected)
    assert (decision.reason, decision.decision.policy_version) == ("caller_blocked", 1)

    again = await api.put(f"{url}/security-policy", json={"blocked_prefixes": []})
    assert again.json()["policy_version"] == 2
    await gatekeeper.numbers.stop()


async def test_a_policy_put_with_a_stale_if_match_is_refused_with_412(api: httpx.AsyncClient) -> None:
    number = await register(api)
    url = f"/v1/phone-numbers/{number['phone_number_id']}/security-policy"
    read = await api.get(url)
    assert read.headers["etag"] == '"0"'
    first = await api.put(url, json={"max_concurrent_calls": 2}, headers={"If-Match": read.headers["etag"]})
    assert first.status_code == 200 and first.headers["etag"] == '"1"'
    stale = await api.put(url, json={"max_concurrent_calls": 5}, headers={"If-Match": read.headers["etag"]})
    assert_error(stale, 412, "conflict", field="If-Match", rule="stale")
    assert (await api.get(url)).json()["policy"]["max_concurrent_calls"] == 2
    bad = await api.put(url, json={}, headers={"If-Match": "yesterday"})
    assert_error(bad, 422, "invalid", field="If-Match", rule="etag")
    assert (await api.put(url, json={}, headers={"If-Match": "*"})).status_code == 200


def make_offer(caller: str) -> Callable[[str], CallOffered]:
    def offer(call_id: str) -> CallOffered:
        return CallOffered(
            event_id=f"ev_{call_id}",
            occurred_at="2026-11-21T09:59:07.123Z",
            call_id=call_id,
            to=NUMBER,
            from_=caller,
        )

    return offer


def empty_policy() -> dict:
    return {
        "allowed_cidrs": [],
        "media_encryption": None,
        "max_concurrent_calls": None,
        "max_calls_per_hour": None,
        "max_calls_per_day": None,
        "hours": None,
        "allowed_prefixes": [],
        "blocked_prefixes": [],
        "fraud_alert": None,
    }


# -- accounts -----------------------------------------------------------------------


async def test_an_account_is_configured_read_back_and_credited_once_per_reference(api: httpx.AsyncClient) -> None:
    assert_error(await api.get("/v1/accounts/acct_1"), 404, "not_found", field="account_id")
    put = await api.put("/v1/accounts/acct_1", json={"rate_millicredits_per_minute": 20_000, "timezone": "Europe/Warsaw"})
    assert put.status_code == 200, put.text
    account = (await api.get("/v1/accounts/acct_1")).json()
    assert (account["rate_millicredits_per_minute"], account["timezone"], account["credited_millicredits"]) == (
        20_000,
        "Europe/Warsaw",
        0,
    )

    credit = {"amount_millicredits": 5_000, "reference": "invoice-1"}
    first = await api.post("/v1/accounts/acct_1/credits", json=credit)
    assert first.status_code == 201 and first.json()["duplicate"] is False
    repeat = await api.post("/v1/accounts/acct_1/credits", json=credit)
    assert repeat.status_code == 200 and repeat.json()["duplicate"] is True
    assert repeat.json()["account"]["credited_millicredits"] == 5_000
    assert (await api.get("/v1/accounts/acct_1")).json()["credited_millicredits"] == 5_000


def test_the_account_body_has_every_setting_of_the_command() -> None:
    settings = set(AccountSettings.__struct_fields__)
    assert settings == set(ConfigureAccount.__struct_fields__) - {"account_id"}


# -- auth, routing, bad input -----------------------------------------------------------


async def test_with_an_admin_token_every_v1_route_wants_it(js: JetStreamContext) -> None:
    async with admin_api(js, admin_token="s3cret-admin") as api:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-admin"}):
            refused = await api.get("/v1/phone-numbers", headers=headers)
            assert_error(refused, 401, "unauthorized")
            assert refused.headers["www-authenticate"] == "Bearer"
        assert_error(await api.post("/v1/phone-numbers", json=sip_trunk()), 401, "unauthorized")
        ok = await api.get("/v1/phone-numbers", headers={"Authorization": "Bearer s3cret-admin"})
        assert ok.status_code == 200
        assert (await api.get("/healthz")).status_code == 200
        assert (await api.get("/openapi.json")).status_code == 200


async def test_unknown_paths_and_wrong_methods_answer_in_json(api: httpx.AsyncClient) -> None:
    assert_error(await api.get("/v1/nothing-here"), 404, "not_found")
    assert_error(await api.get("/v1/phone-numbers/"), 404, "not_found")
    wrong = await api.put("/v1/phone-numbers", json={})
    assert_error(wrong, 405, "method_not_allowed")
    assert set(wrong.headers["allow"].split(", ")) == {"GET", "HEAD", "POST"}


async def test_the_openapi_document_lists_every_route_and_its_error_statuses(api: httpx.AsyncClient) -> None:
    document = (await api.get("/openapi.json")).json()
    assert document["openapi"].startswith("3.1")
    post = document["paths"]["/v1/phone-numbers"]["post"]
    assert {"201", "400", "405", "409", "413", "422"} <= set(post["responses"])
    assert set(document["paths"]["/v1/phone-numbers/{phone_number_id}"]) == {"get", "patch", "delete"}
    assert "ErrorBody" in document["components"]["schemas"]


BAD_INPUT = [
    pytest.param("post", "", b'{"phone_number": ', 400, "malformed", None, "json", id="malformed-json"),
    pytest.param("post", "", b"", 400, "malformed", None, "json", id="empty-body"),
    pytest.param("post", "", {"phone_number": 48123456789, "account_id": "a", "provider": "sip_trunk"},
                 422, "invalid", "phone_number", "schema", id="wrong-type"),
    pytest.param("post", "", {"phone_number": "48123456789", "account_id": "a", "provider": "sip_trunk"},
                 422, "invalid", "phone_number", "e164", id="no-plus"),
    pytest.param("post", "", {"phone_number": "+4812", "account_id": "a", "provider": "sip_trunk"},
                 422, "invalid", "phone_number", "e164", id="too-short"),
    pytest.param("post", "", {"phone_number": NUMBER, "account_id": "a b", "provider": "sip_trunk"},
                 422, "invalid", "account_id", "schema", id="account-id-not-a-token"),
    pytest.param("post", "", {"phone_number": NUMBER, "account_id": "a", "provider": "fax"},
                 422, "invalid", "provider", "schema", id="unknown-provider"),
    pytest.param("post", "", {"phone_number": NUMBER, "account_id": "a", "provider": "twilio", "sid": "AC1", "token": "t"},
                 422, "invalid", "sid", "twilio_sid", id="bad-sid"),
    pytest.param("post", "", {"phone_number": NUMBER, "account_id": "a", "provider": "twilio"},
                 422, "invalid", "sid", "required", id="twilio-without-credentials"),
    pytest.param("post", "", {"phone_number": NUMBER, "account_id": "a", "provider": "twilio", "sid": SID},
                 422, "invalid", "token", "secret_length", id="twilio-without-token"),
    pytest.param("post", "", sip_trunk(outbound_trunk={"address": "sip:trunk.example.com"}),
                 422, "invalid", "outbound_trunk.address", "sip_address", id="sip-scheme-in-address"),
    pytest.param("post", "", sip_trunk(inbound_trunk={"allowed_addresses": ["10.0.0.1/33"]}),
                 422, "invalid", "inbound_trunk.allowed_addresses[0]", "cidr", id="inbound-bad-cidr"),
    pytest.param("put", "/security-policy", {"allowed_cidrs": ["10.0.0.0/33"]},
                 422, "invalid", "allowed_cidrs[0]", "cidr", id="policy-bad-cidr"),
    pytest.param("put", "/security-policy", {"hours": {"start": "09:00", "end": "17:00", "timezone": "Mars/Olympus"}},
                 422, "invalid", "hours.timezone", "timezone", id="policy-unknown-timezone"),
    pytest.param("put", "/security-policy", {"blocked_prefixes": "+1900"},
                 422, "invalid", "blocked_prefixes", "schema", id="policy-wrong-type"),
    pytest.param("put", "/security-policy", [], 422, "invalid", None, "schema", id="policy-not-an-object"),
    pytest.param("patch", "", {"agent_id": "agent 1"}, 422, "invalid", "agent_id", "schema", id="agent-id-with-space"),
    pytest.param("patch", "", {"label": "x" * 201}, 422, "invalid", "label", "max_length", id="label-too-long"),
    pytest.param("delete", "?force=maybe", None, 422, "invalid", "force", "boolean", id="force-not-a-boolean"),
    pytest.param("post", "", b"{" + b" " * 70_000 + b"}", 413, "too_large", None, "max_body", id="body-too-large"),
]  # fmt: skip


@pytest.mark.parametrize(("method", "suffix", "body", "status", "code", "field", "rule"), BAD_INPUT)
async def test_bad_input_is_a_4xx_naming_the_field_and_the_rule(
    api: httpx.AsyncClient, method, suffix, body, status, code, field, rule  # noqa: ANN001
) -> None:
    number = await register(api, "+48123456780")
    url = "/v1/phone-numbers" if method == "post" else f"/v1/phone-numbers/{number['phone_number_id']}{suffix}"
    content = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    response = await api.request(method.upper(), url, content=content, headers={"content-type": "application/json"})
    error = assert_error(response, status, code, field, rule)
    assert error.get("field") == field


async def test_bad_account_input_is_a_4xx(api: httpx.AsyncClient) -> None:
    assert_error(await api.put("/v1/accounts/acct_1", json={"timezone": "Europe/Nowhere"}), 422, "invalid", "timezone", "timezone")
    assert_error(await api.put("/v1/accounts/a.b", json={}), 422, "invalid", "account_id", "schema")
    assert_error(await api.put("/v1/accounts/acct_1", json={"per_call_max_s": 0}), 422, "invalid", "per_call_max_s")
    credit = {"amount_millicredits": -5, "reference": "r"}
    assert_error(await api.post("/v1/accounts/acct_1/credits", json=credit), 422, "invalid", "amount_millicredits")
    credit = {"amount_millicredits": 10**30, "reference": "r"}  # more than the ledger's BIGINT holds
    assert_error(await api.post("/v1/accounts/acct_1/credits", json=credit), 422, "invalid", "amount_millicredits")
    credit = {"amount_millicredits": 5, "reference": ""}
    assert_error(await api.post("/v1/accounts/acct_1/credits", json=credit), 422, "invalid", "reference")


async def test_changing_only_the_assignment_type_of_an_assigned_number_is_applied(api: httpx.AsyncClient) -> None:
    number = await register(api)
    url = f"/v1/phone-numbers/{number['phone_number_id']}"
    await api.patch(url, json={"agent_id": "agent_1", "assignment_type": "agent"})
    changed = await api.patch(url, json={"agent_id": "agent_1", "assignment_type": "softphone"})
    assert changed.json()["assignment_type"] == "softphone"
