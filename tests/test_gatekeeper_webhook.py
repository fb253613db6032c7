"""The pre-call webhook against a real HTTP server (Starlette under uvicorn, 127.0.0.1, a free
port, in a thread): the signature verifies with the `standardwebhooks` reference package,
answers become outcomes, timeouts and errors fail, unsafe URLs are refused before any request.

Loopback is refused by default, so calls to the local server pass allow_private=True; the
SSRF tables check refusals with a client that records instead of sending, and names that must
not reach real DNS go through a resolver stub. No traffic ever leaves 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import httpx
import msgspec
import pytest
from standardwebhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.gatekeeper.webhook import (
    OVERRIDABLE,
    Answer,
    Decline,
    Failed,
    Invalid,
    Proceed,
    UnsafeWebhookUrl,
    WebhookSettings,
    call_pre_call_webhook,
    check_url,
    classify_address,
    make_client,
    parse_answer,
    sign,
)
from tests.http_server import bound_socket, serve_app

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
CALL = {
    "caller_id": "+14155550100",
    "agent_id": "agent_7",
    "called_number": "+48123456789",
    "call_id": "call_abc",
}

FULL_ANSWER = {
    "type": "conversation_initiation_client_data",
    "dynamic_variables": {"customer_name": "Ada", "tier": 3, "vip": True, "balance": 12.5},
    "conversation_config_override": {
        "agent": {"first_message": "Hi Ada!", "language": "en", "prompt": {"prompt": "Be brief."}},
        "tts": {"voice_id": "21m00Tcm4TlvDq8ikWAM"},
    },
}

# scenario -> (status, body, seconds to wait before answering, extra headers)
SCENARIOS: dict[str, tuple[int, bytes, float, dict[str, str]]] = {
    "ok": (200, msgspec.json.encode(FULL_ANSWER), 0, {}),
    "decline": (200, b'{"reject": true, "reason": "caller is on the deny list"}', 0, {}),
    "slow": (200, b"{}", 1.0, {}),
    "error": (500, b"boom", 0, {}),
    "redirect": (307, b"", 0, {"location": "/hook/ok"}),
    "no_content": (204, b"", 0, {}),
    "huge": (200, b'{"reason": "' + b"x" * 200_000 + b'"}', 0, {}),
    "not_json": (200, b"hello", 0, {}),
    "system_name": (200, b'{"dynamic_variables": {"system__caller_id": "+1"}}', 0, {}),
    "nested": (200, b'{"dynamic_variables": {"account": {"id": 1}}}', 0, {}),
    "unknown_override": (200, b'{"conversation_config_override": {"agent": {"llm": "gpt-4o"}}}', 0, {}),
}


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class LocalServer:
    port: int
    received: list[Received] = field(default_factory=list)

    def url(self, scenario: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}/hook/{scenario}"


@contextmanager
def serving(**tls: str) -> Iterator[LocalServer]:
    """The hook app under uvicorn in a thread on 127.0.0.1, a free port; TLS if given files."""
    sock = bound_socket()
    local = LocalServer(port=sock.getsockname()[1])

    async def hook(request: Request) -> Response:
        body = await request.body()
        local.received.append(Received(request.url.path, dict(request.headers), body))
        status, content, delay, headers = SCENARIOS[request.path_params["scenario"]]
        if delay:
            await asyncio.sleep(delay)
        return Response(content, status_code=status, headers=headers, media_type="application/json")

    app = Starlette(routes=[Route("/hook/{scenario}", hook, methods=["POST"])])
    with serve_app(app, sock, **tls):
        yield local


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    with serving() as local:
        yield local


@dataclass
class TlsServer:
    server: LocalServer
    trust: ssl.SSLContext  # trusts the test CA, which signed a certificate for hooks.test only


def _certificate(subject: str, issuer_key, public_key, issuer: str, *, ca: bool, names: list[str]):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("test CA", ca_key, ca_key.public_key(), "test CA", ca=True, names=[])
    leaf = _certificate("hooks.test", ca_key, key.public_key(), "test CA", ca=False, names=["hooks.test"])
    folder = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    trust = ssl.create_default_context(cadata=ca.public_bytes(serialization.Encoding.PEM).decode())
    with serving(ssl_certfile=str(folder / "cert.pem"), ssl_keyfile=str(folder / "key.pem")) as local:
        yield TlsServer(local, trust)


@pytest.fixture
def received(server: LocalServer) -> list[Received]:
    server.received.clear()
    return server.received


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with make_client() as shared:
        yield shared


def settings(url: str, **kwargs: object) -> WebhookSettings:
    return WebhookSettings(url=url, secret=SECRET, **{"allow_private": True, **kwargs})


async def call(client: httpx.AsyncClient, config: WebhookSettings, *, now: datetime = NOW, **kwargs):
    return await call_pre_call_webhook(client, config, **CALL, msg_id="msg_1", now=now, **kwargs)


async def no_dns(host: str) -> list[str]:
    raise AssertionError(f"{host} must not be resolved")


def stub(table: dict[str, list[str]]):
    async def resolve(host: str) -> list[str]:
        return table[host]

    return resolve


# -- signature --------------------------------------------------------------------------


def test_sign_matches_the_standard_webhooks_test_vector() -> None:
    body = b'{"test": 2432232314}'
    expected = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert sign(SECRET, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == expected
    # the same key without the whsec_ prefix, as the reference implementation also accepts
    assert sign(SECRET.removeprefix("whsec_"), "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == expected


async def test_the_signature_the_server_receives_verifies_with_standardwebhooks(
    server: LocalServer, received: list[Received], client: httpx.AsyncClient
) -> None:
    now = datetime.now(UTC)  # the reference verifier refuses timestamps 5 minutes off its clock
    outcome = await call(client, settings(server.url("ok")), now=now)

    assert isinstance(outcome, Proceed)
    [request] = received
    assert Webhook(SECRET).verify(request.body, request.headers) == CALL
    assert request.headers["webhook-id"] == "msg_1"
    assert request.headers["webhook-timestamp"] == str(int(now.timestamp()))
    assert request.headers["content-type"] == "application/json"
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(request.body.replace(b"call_abc", b"call_xyz"), request.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "A" * 32).verify(request.body, request.headers)


async def test_the_timestamp_comes_from_now_not_the_clock(
    server: LocalServer, received: list[Received], client: httpx.AsyncClient
) -> None:
    await call(client, settings(server.url("ok")), now=NOW)
    [request] = received
    assert request.headers["webhook-timestamp"] == str(int(NOW.timestamp()))
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(SECRET).verify(request.body, request.headers)


# -- answers ----------------------------------------------------------------------------


async def test_variables_and_overrides_are_applied(
    server: LocalServer, received: list[Received], client: httpx.AsyncClient
) -> None:
    outcome = await call(client, settings(server.url("ok")))
    assert outcome == Proceed(
        dynamic_variables={"customer_name": "Ada", "tier": 3, "vip": True, "balance": 12.5},
        conversation_config_override=FULL_ANSWER["conversation_config_override"],
    )


async def test_reject_true_declines_with_the_webhooks_reason(
    server: LocalServer, received: list[Received], client: httpx.AsyncClient
) -> None:
    outcome = await call(client, settings(server.url("decline")))
    assert outcome == Decline(reason="caller is on the deny list")


async def test_no_content_proceeds_without_changes(
    server: LocalServer, received: list[Received], client: httpx.AsyncClient
) -> None:
    assert await call(client, settings(server.url("no_content"))) == Proceed()


async def test_a_slow_webhook_fails_at_the_deadline(
    server: LocalServer, received: list[Received], client: httpx.AsyncClient
) -> None:
    started = time.monotonic()
    outcome = await call(client, settings(server.url("slow"), timeout_ms=200, fail_closed=True))
    elapsed = time.monotonic() - started

    assert outcome == Failed(reason="no answer within 200 ms", fail_closed=True, kind="timeout")
    assert 0.19 <= elapsed < 0.45, elapsed
    assert len(received) == 1  # it did reach the server, which was too slow


@pytest.mark.parametrize("fail_closed", [False, True])
async def test_a_server_error_fails(
    server: LocalServer, received: list[Received], client: httpx.AsyncClient, fail_closed: bool
) -> None:
    outcome = await call(client, settings(server.url("error"), fail_closed=fail_closed))
    assert outcome == Failed(reason="answered HTTP 500", fail_closed=fail_closed, kind="status")


async def test_a_redirect_is_not_followed(
    server: LocalServer, received: list[Received], client: httpx.AsyncClient
) -> None:
    outcome = await call(client, settings(server.url("redirect")))
    assert isinstance(outcome, Failed) and outcome.kind == "redirect"
    assert "307" in outcome.reason
    assert [r.path for r in received] == ["/hook/redirect"]


async def test_an_oversized_answer_fails(
    server: LocalServer, received: list[Received], client: httpx.AsyncClient
) -> None:
    outcome = await call(client, settings(server.url("huge")))
    assert isinstance(outcome, Failed) and outcome.kind == "too_large"


@pytest.mark.parametrize(
    ("scenario", "reason"),
    [
        ("system_name", "system__caller_id is reserved"),
        ("nested", "dynamic_variables.account must be a string, number or bool, not an object"),
        ("unknown_override", "conversation_config_override.agent.llm may not be overridden"),
        ("not_json", "not valid JSON"),
    ],
)
async def test_an_invalid_answer_fails_with_the_reason(
    server: LocalServer, received: list[Received], client: httpx.AsyncClient, scenario: str, reason: str
) -> None:
    outcome = await call(client, settings(server.url(scenario)))
    assert isinstance(outcome, Failed) and outcome.kind == "invalid_answer"
    assert reason in outcome.reason
    assert outcome.fail_closed is False


async def test_a_refused_connection_fails(client: httpx.AsyncClient) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    outcome = await call(client, settings(f"http://127.0.0.1:{port}/hook", fail_closed=True))
    assert isinstance(outcome, Failed) and outcome.kind == "connect" and outcome.fail_closed
    assert str(port) not in outcome.reason  # the URL is never quoted


async def test_a_name_that_does_not_resolve_fails(client: httpx.AsyncClient) -> None:
    async def gone(host: str) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    outcome = await call(client, settings("https://hooks.invalid/x"), resolve=gone)
    assert isinstance(outcome, Failed) and outcome.kind == "dns"


# -- SSRF -------------------------------------------------------------------------------

REFUSED = [
    # (host as in the URL, what a stub resolver answers for it, the refusal names)
    ("127.0.0.1", None, "loopback address 127.0.0.1"),
    ("localhost", None, "loopback host localhost"),
    ("loopback.test", ["127.0.0.1"], "resolves to a loopback address 127.0.0.1"),
    ("10.0.0.5", None, "private address 10.0.0.5"),
    ("172.16.3.4", None, "private address"),
    ("192.168.1.1", None, "private address"),
    ("[fc00::1]", None, "private address"),
    ("169.254.169.254", None, "metadata address 169.254.169.254"),
    ("169.254.1.1", None, "link-local address"),
    ("[::1]", None, "loopback address ::1"),
    ("[fe80::1]", None, "link-local address fe80::1"),
    ("100.64.0.1", None, "shared address 100.64.0.1"),
    ("metadata.google.internal", None, "cloud metadata host metadata.google.internal"),
    ("METADATA.google.internal.", None, "cloud metadata host metadata.google.internal"),
    ("[::ffff:127.0.0.1]", None, "loopback address 127.0.0.1"),
    ("[::ffff:a9fe:a9fe]", None, "metadata address 169.254.169.254"),
    ("[::127.0.0.1]", None, "loopback address 127.0.0.1"),
    ("[64:ff9b::a9fe:a9fe]", None, "metadata address 169.254.169.254"),
    ("[2002:a00:5::1]", None, "private address 10.0.0.5"),
    ("[fd00:ec2::254]", None, "metadata address"),
    ("0.0.0.0", None, "unspecified address"),
    ("224.0.0.1", None, "multicast address"),
    ("240.0.0.1", None, "reserved address"),
    ("rebind.test", ["93.184.216.34", "10.1.2.3"], "resolves to a private address 10.1.2.3"),
    ("nothing.test", [], "resolves to no address"),
]


@pytest.mark.parametrize(("host", "addresses", "reason"), REFUSED, ids=[r[0] for r in REFUSED])
async def test_unsafe_addresses_are_refused(host: str, addresses: list[str] | None, reason: str) -> None:
    resolve = no_dns if addresses is None else stub({host: addresses})
    with pytest.raises(UnsafeWebhookUrl) as refused:
        await check_url(f"https://{host}/hook", allow_private=False, resolve=resolve)
    assert reason in refused.value.reason


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1",
        "http://localhost",
        "http://10.0.0.5",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]",
        "http://[fe80::1]",
        "http://100.64.0.1",
        "http://metadata.google.internal",
        "https://[::ffff:127.0.0.1]",
        "https://loopback.test/hook",
    ],
)
async def test_unsafe_urls_fail_without_a_request(url: str) -> None:
    sent: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:  # nothing leaves the process
        sent.append(request)
        return httpx.Response(200, json={})

    async with httpx.AsyncClient(transport=httpx.MockTransport(record)) as recorder:
        outcome = await call_pre_call_webhook(
            recorder,
            WebhookSettings(url=url, secret=SECRET, fail_closed=True),
            **CALL,
            msg_id="msg_1",
            now=NOW,
            resolve=stub({"loopback.test": ["127.0.0.1"]}),
        )
    assert isinstance(outcome, Failed) and outcome.kind == "unsafe_url" and outcome.fail_closed
    assert outcome.reason.startswith("unsafe webhook URL: ")
    assert sent == []


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://hooks.example.com/x", "http is allowed only with allow_private"),
        ("ftp://hooks.example.com/x", "must be https"),
        ("https://user:pw@hooks.example.com/x", "user:password@"),
        ("https:///x", "no host"),
        ("not a url", "must be https"),
    ],
)
async def test_malformed_or_plain_http_urls_are_refused(url: str, reason: str) -> None:
    with pytest.raises(UnsafeWebhookUrl) as refused:
        await check_url(url, allow_private=False, resolve=stub({"hooks.example.com": ["93.184.216.34"]}))
    assert reason in refused.value.reason


@pytest.mark.parametrize("host", ["127.1", "2130706433", "0x7f.0.0.1"])
async def test_numeric_spellings_of_loopback_are_refused_by_what_they_resolve_to(host: str) -> None:
    # the system resolver parses these like inet_aton does, without any DNS traffic
    with pytest.raises(UnsafeWebhookUrl, match="loopback address 127.0.0.1"):
        await check_url(f"https://{host}/hook", allow_private=False)


async def test_global_addresses_pass() -> None:
    public = stub({"hooks.example.com": ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"]})
    await check_url("https://hooks.example.com/pre-call?token=t", allow_private=False, resolve=public)
    await check_url("https://8.8.8.8/x", allow_private=False, resolve=no_dns)
    await check_url("https://[2606:4700:4700::1111]/x", allow_private=False, resolve=no_dns)
    await check_url("https://[::ffff:8.8.8.8]/x", allow_private=False, resolve=no_dns)


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data",
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://[fd00:ec2::254]/",
        "http://0.0.0.0:8080/",
        "http://224.0.0.1/",
    ],
)
async def test_allow_private_never_allows_metadata_unspecified_or_multicast(url: str) -> None:
    with pytest.raises(UnsafeWebhookUrl):
        await check_url(url, allow_private=True, resolve=no_dns)


async def test_allow_private_allows_loopback_and_private(server: LocalServer) -> None:
    for url in ["http://127.0.0.1/", "http://[::1]/", "http://10.0.0.5/", "http://[fe80::1]/", "http://100.64.0.1/"]:
        await check_url(url, allow_private=True, resolve=no_dns)
    await check_url(server.url("ok", host="localhost"), allow_private=True)  # the system resolver


def test_classification() -> None:
    from ipaddress import ip_address as ip

    assert classify_address(ip("93.184.216.34")) is None
    assert classify_address(ip("2606:4700:4700::1111")) is None
    assert classify_address(ip("fe80::1%eth0")) == "link-local"
    assert classify_address(ip("192.0.2.1")) == "special-purpose"  # TEST-NET-1
    assert classify_address(ip("255.255.255.255")) == "broadcast"
    assert classify_address(ip("fec0::1")) == "private"  # deprecated site-local


async def test_the_same_loopback_url_is_refused_without_allow_private(
    server: LocalServer, received: list[Received], client: httpx.AsyncClient
) -> None:
    url = server.url("ok").replace("http://", "https://")  # so that only the address decides
    refused = await call(client, settings(url, allow_private=False))
    assert isinstance(refused, Failed) and refused.kind == "unsafe_url"
    assert "loopback address 127.0.0.1" in refused.reason
    assert received == []

    plain = await call(client, settings(server.url("ok"), allow_private=False))
    assert isinstance(plain, Failed) and plain.kind == "unsafe_url"
    assert received == []

    assert isinstance(await call(client, settings(server.url("ok"))), Proceed)
    assert len(received) == 1


# -- DNS rebinding: resolved once, connected to the checked address ---------------------


async def test_the_connection_goes_to_the_checked_address_without_resolving_again(
    server: LocalServer, received: list[Received], client: httpx.AsyncClient
) -> None:
    answers = [["127.0.0.1"], ["10.9.9.9"]]  # a rebinding name: a second lookup would differ
    lookups: list[str] = []

    async def rebinding(host: str) -> list[str]:
        lookups.append(host)
        return answers[len(lookups) - 1]

    # hooks.test is not in any DNS: reaching the server proves the pinned address was used
    outcome = await call(client, settings(server.url("ok", host="hooks.test")), resolve=rebinding)

    assert isinstance(outcome, Proceed)
    assert lookups == ["hooks.test"]
    [request] = received
    assert request.headers["host"] == f"hooks.test:{server.port}"  # the name, not the address


async def test_https_to_the_checked_address_verifies_the_certificate_of_the_name(
    tls_server: TlsServer,
) -> None:
    local = tls_server.server
    local.received.clear()
    resolve = stub({"hooks.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    url = f"https://hooks.test:{local.port}/hook/ok"
    async with make_client(verify=tls_server.trust) as tls_client:
        outcome = await call(tls_client, settings(url), resolve=resolve)
        assert isinstance(outcome, Proceed)
        assert [r.headers["host"] for r in local.received] == [f"hooks.test:{local.port}"]

        # Same address, another name: the certificate is for hooks.test only, so SNI and the
        # check are of the name in the URL, and the kept-alive hooks.test connection is not reused.
        other = await call(tls_client, settings(url.replace("hooks.test", "other.test")), resolve=resolve)
        assert isinstance(other, Failed) and other.kind == "connect"
        assert "CERTIFICATE_VERIFY_FAILED" in other.reason
        assert len(local.received) == 1


async def test_the_shared_client_connects_to_nothing_unchecked(
    server: LocalServer, received: list[Received], client: httpx.AsyncClient
) -> None:
    with pytest.raises(httpx.ConnectError, match="no checked address"):
        await client.post(server.url("ok"), content=b"{}")
    assert received == []


async def test_concurrent_calls_each_use_their_own_pinned_address(
    server: LocalServer, received: list[Received], client: httpx.AsyncClient
) -> None:
    names = [f"tenant{i}.test" for i in range(8)]
    resolve = stub({name: ["127.0.0.1"] for name in names})
    outcomes = await asyncio.gather(
        *(call(client, settings(server.url("ok", host=name)), resolve=resolve) for name in names)
    )
    assert all(isinstance(outcome, Proceed) for outcome in outcomes)
    assert sorted(r.headers["host"] for r in received) == sorted(f"{n}:{server.port}" for n in names)


# -- parse_answer (pure) ----------------------------------------------------------------


def test_parse_a_full_answer() -> None:
    answer = parse_answer(msgspec.json.encode(FULL_ANSWER))
    assert answer == Answer(
        dynamic_variables=FULL_ANSWER["dynamic_variables"],
        conversation_config_override=FULL_ANSWER["conversation_config_override"],
    )
    assert parse_answer(b"{}") == Answer()
    assert parse_answer(b'{"dynamic_variables": null}') == Answer()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "empty"),
        (b"[]", "must be a JSON object"),
        (b'{"dynamic_variables": []}', "dynamic_variables must be an object"),
        (b'{"dynamic_variables": {"System__X": "a"}}', "reserved"),
        (b'{"dynamic_variables": {"1st": "a"}}', "must match"),
        (b'{"dynamic_variables": {"' + b"a" * 65 + b'": "a"}}', "must match"),
        (b'{"dynamic_variables": {"a": null}}', "not null"),
        (b'{"dynamic_variables": {"a": [1]}}', "not an array"),
        (b'{"dynamic_variables": {"a": 99999999999999999999}}', "out of range"),
        (b'{"conversation_config_override": {"tts": {"voice_id": 5}}}', "tts.voice_id must be a voice id"),
        (b'{"conversation_config_override": {"agent": {"prompt": "x"}}}', "agent.prompt may not be overridden"),
        (b'{"conversation_config_override": {"agent.first_message": "x"}}', "may not be overridden"),
        (b'{"conversation_config_override": {"agent": {"language": "english!"}}}', "a language code"),
        (b'{"dynamic_variable": {"a": 1}}', "unknown field 'dynamic_variable'"),
        (b'{"reject": "yes"}', "reject must be true or false"),
        (b'{"type": "something_else"}', "type must be"),
    ],
)
def test_parse_refuses(body: bytes, reason: str) -> None:
    result = parse_answer(body)
    assert isinstance(result, Invalid)
    assert reason in result.reason


def test_a_reject_is_honoured_even_if_the_rest_is_malformed() -> None:
    body = b'{"reject": true, "reason": "  ' + b"r" * 500 + b'", "dynamic_variables": {"system__x": {}}}'
    answer = parse_answer(body)
    assert isinstance(answer, Answer) and answer.reject
    assert answer.reason == "r" * 200


def test_the_agent_can_allow_fewer_overrides() -> None:
    body = b'{"conversation_config_override": {"agent": {"first_message": "Hi"}}}'
    assert isinstance(parse_answer(body, allowed_overrides=frozenset({"tts.voice_id"})), Invalid)
    assert parse_answer(body, allowed_overrides=frozenset(OVERRIDABLE)).conversation_config_override == {
        "agent": {"first_message": "Hi"}
    }


@pytest.mark.parametrize(
    "kwargs",
    [
        {"secret": "whsec_not base64!"},
        {"secret": "whsec_"},
        {"timeout_ms": 0},
        {"allowed_overrides": frozenset({"agent.llm"})},
    ],
)
def test_settings_are_validated(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        WebhookSettings(**{"url": "https://hooks.example.com", "secret": SECRET, **kwargs})


def test_settings_keep_the_secret_and_the_url_out_of_their_repr() -> None:
    shown = repr(WebhookSettings(url="https://hooks.example.com/?token=t0ps3cret", secret=SECRET))
    assert "t0ps3cret" not in shown and SECRET not in shown
