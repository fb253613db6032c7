"""The provisioner over a real nats-server: optimistic concurrency, sealed secrets,
delete rules and quota. HTTP is tested on top of this in test_provisioner_http.py."""

from __future__ import annotations

import asyncio

import pytest
from nats.js import JetStreamContext

from schemas import SecurityPolicy
from schemas.commands import (
    GetNumber,
    RotateSecrets,
    RegisterNumber,
    SetPolicy,
    TwilioCredentials,
    UnregisterNumber,
    UpdateNumber,
)
from services.provisioner.app import Provisioner
from services.provisioner.config import ProvisionerSettings
from callplane.secrets import SecretBox

NUMBER = "+48123456789"
TOKEN = "canary-token-7d1f3e9a5b"
KEYS = SecretBox.generate_key()


async def provisioner(js: JetStreamContext, **settings) -> Provisioner:  # noqa: ANN003
    p = Provisioner(js, ProvisionerSettings(callplane_secret_keys=KEYS, http_port=-1, **settings))
    await p.start()
    return p


async def stream_bytes(js: JetStreamContext, stream: str) -> bytes:
    info = await js.stream_info(stream)
    return b"".join([(await js.get_msg(stream, seq)).data for seq in range(1, info.state.last_seq + 1)])


async def test_a_number_is_registered_once_and_the_second_gets_a_conflict(js: JetStreamContext) -> None:
    p = await provisioner(js)
    first = await p.handle(RegisterNumber(number=NUMBER, account_id="acct_1"))
    second = await p.handle(RegisterNumber(number=NUMBER, account_id="acct_2"))
    assert first.ok and first.number.sip_uri == f"{NUMBER}@sip.callplane.dev:5060;transport=tcp"
    assert (second.ok, second.code, second.field) == (False, "conflict", "number")
    await p.stop()


async def test_two_instances_updating_one_policy_concurrently_lose_no_update(js: JetStreamContext) -> None:
    a, b = await provisioner(js), await provisioner(js)
    assert (await a.handle(RegisterNumber(number=NUMBER, account_id="acct_1"))).ok
    await b.projections["NUMBERS"].catch_up()
    caps = list(range(1, 21))
    replies = await asyncio.gather(
        *(
            (a if cap % 2 else b).handle(SetPolicy(number=NUMBER, policy=SecurityPolicy(max_concurrent_calls=cap)))
            for cap in caps
        )
    )
    applied = [r for r in replies if r.ok]
    assert all(r.ok or r.code == "conflict" for r in replies)  # applied, or told so: never lost
    # Every applied update got its own policy_version, 1..n, with none lost or duplicated.
    info = await js.stream_info("NUMBERS")
    versions = []
    for seq in range(1, info.state.last_seq + 1):
        message = await js.get_msg("NUMBERS", seq)
        if message.subject.startswith("number.policy_set."):
            from schemas import decode

            versions.append(decode(message.data).policy_version)
    assert versions == list(range(1, len(applied) + 1))
    assert sorted(r.number.policy_version for r in applied) == versions
    last = max(applied, key=lambda r: r.number.policy_version)
    await a.projections["NUMBERS"].catch_up()
    final = (await a.handle(GetNumber(number=NUMBER))).number
    assert final.policy == last.number.policy
    assert len(applied) >= len(caps) // 2  # retries let most apply in turn
    await a.stop()
    await b.stop()


async def test_a_twilio_token_is_sealed_and_never_reaches_an_event_or_a_reply(js: JetStreamContext) -> None:
    p = await provisioner(js)
    reply = await p.handle(
        RegisterNumber(
            number=NUMBER,
            account_id="acct_1",
            provider="twilio",
            twilio=TwilioCredentials(account_sid="AC" + "0123456789abcdef" * 2, auth_token=TOKEN),
        )
    )
    assert reply.ok
    assert reply.number.twilio.auth_token_hint.endswith(TOKEN[-4:])
    assert TOKEN not in str(reply) and TOKEN.encode() not in await stream_bytes(js, "NUMBERS")
    kv = await js.key_value("SECRETS")
    [key] = await kv.keys()
    sealed = (await kv.get(key)).value
    assert TOKEN.encode() not in sealed
    assert key in (await stream_bytes(js, "NUMBERS")).decode()  # the event holds the reference
    await p.stop()


async def test_an_assigned_number_is_not_deleted_unless_forced(js: JetStreamContext) -> None:
    p = await provisioner(js)
    await p.handle(RegisterNumber(number=NUMBER, account_id="acct_1"))
    await p.handle(UpdateNumber(number=NUMBER, agent_id="agent_1"))
    refused = await p.handle(UnregisterNumber(number=NUMBER))
    assert (refused.ok, refused.code) == (False, "conflict")
    assert (await p.handle(UnregisterNumber(number=NUMBER, force=True))).ok
    assert (await p.handle(GetNumber(number=NUMBER))).code == "not_found"
    again = await p.handle(RegisterNumber(number=NUMBER, account_id="acct_1"))  # a retired number returns
    assert again.ok
    await p.stop()


async def test_the_quota_counts_registered_numbers_per_account(js: JetStreamContext) -> None:
    p = await provisioner(js, max_numbers_per_account=2)
    numbers = ["+48123456781", "+48123456782", "+48123456783"]
    replies = [await p.handle(RegisterNumber(number=n, account_id="acct_q")) for n in numbers]
    assert [r.ok for r in replies] == [True, True, False]
    assert (replies[2].code, replies[2].field) == ("quota_exceeded", "account_id")
    assert (await p.handle(RegisterNumber(number=numbers[2], account_id="acct_other"))).ok
    await p.stop()


async def test_a_restarted_provisioner_rebuilds_the_registry_from_the_stream(js: JetStreamContext) -> None:
    p = await provisioner(js)
    await p.handle(RegisterNumber(number=NUMBER, account_id="acct_1", label="Support"))
    await p.handle(SetPolicy(number=NUMBER, policy=SecurityPolicy(blocked_prefixes=("+1900",))))
    await p.stop()
    restarted = await provisioner(js)
    view = (await restarted.handle(GetNumber(number=NUMBER))).number
    assert (view.label, view.policy.blocked_prefixes, view.policy_version) == ("Support", ("+1900",), 1)
    await restarted.stop()


@pytest.mark.parametrize(
    ("command", "field", "rule"),
    [
        (RegisterNumber(number="48123456789", account_id="a"), "number", "e164"),
        (SetPolicy(number=NUMBER, policy=SecurityPolicy(allowed_cidrs=("10.0.0.0/33",))), "policy.allowed_cidrs[0]", "cidr"),
    ],
)
async def test_invalid_commands_name_the_field_and_the_rule(js: JetStreamContext, command, field, rule) -> None:  # noqa: ANN001
    p = await provisioner(js)
    await p.handle(RegisterNumber(number=NUMBER, account_id="acct_1"))
    reply = await p.handle(command)
    assert (reply.ok, reply.code, reply.field, reply.rule) == (False, "invalid", field, rule)
    await p.stop()


async def test_rotating_secrets_lets_the_old_key_be_retired(js: JetStreamContext) -> None:
    old, new = SecretBox.generate_key(), SecretBox.generate_key()
    before = Provisioner(js, ProvisionerSettings(callplane_secret_keys=old, http_port=-1))
    await before.start()
    twilio = TwilioCredentials(account_sid="AC" + "0123456789abcdef" * 2, auth_token=TOKEN)
    assert (await before.handle(RegisterNumber(number=NUMBER, account_id="a", provider="twilio", twilio=twilio))).ok
    await before.stop()

    rotating = Provisioner(js, ProvisionerSettings(callplane_secret_keys=f"{new},{old}", http_port=-1))
    await rotating.start()
    reply = await rotating.handle(RotateSecrets())
    assert reply.ok and reply.message == "re-sealed 1 secrets under the newest key"
    await rotating.stop()

    kv = await js.key_value("SECRETS")
    [key] = await kv.keys()
    from callplane.secrets import SealedSecret
    import msgspec

    sealed = msgspec.json.decode((await kv.get(key)).value, type=SealedSecret)
    assert SecretBox.from_keys(new).unseal(sealed.ciphertext) == TOKEN


async def test_a_webhook_signing_secret_is_sealed_like_any_credential(js: JetStreamContext) -> None:
    from schemas.commands import ConfigureAccount, GetAccount, PreCallWebhookConfig

    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    p = await provisioner(js)
    hook = PreCallWebhookConfig(url="https://hooks.example.com/pre-call", secret=secret, fail_closed=True)
    reply = await p.handle(ConfigureAccount(account_id="acct_1", pre_call_webhook=hook))
    assert reply.ok
    view = (await p.handle(GetAccount(account_id="acct_1"))).account.pre_call_webhook
    assert (view.url, view.fail_closed) == ("https://hooks.example.com/pre-call", True)
    assert view.secret_hint.endswith(secret[-4:]) and secret not in str(view)
    assert secret.encode() not in await stream_bytes(js, "ACCOUNTS")
    bad = await p.handle(ConfigureAccount(account_id="acct_1", pre_call_webhook=PreCallWebhookConfig(url="https://x.example", secret="nope")))
    assert (bad.code, bad.field, bad.rule) == ("invalid", "pre_call_webhook.secret", "webhook_secret")
    await p.stop()
