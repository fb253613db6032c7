"""Fraud alert delivery against real servers on 127.0.0.1: an SMTP server (aiosmtpd: plain with
AUTH, STARTTLS and implicit TLS with a certificate from a throwaway CA) and an HTTP server
(Starlette under uvicorn, as in the pre-call webhook tests). Webhook signatures are checked
by an HMAC computed here and by the `standardwebhooks` reference package.

Loopback is refused by default, so webhook calls to the local server pass allow_private=True;
the SSRF test shows the same URL refused without it, before any request.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy

import httpx
import pytest
import structlog
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from standardwebhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from callplane.webhooks import make_client
from schemas import AlertEvidence, FraudAlert, Tally, decode
from services.fraud.delivery import (
    AlertDelivery,
    DeliveryError,
    DeliveryMetrics,
    RetryPolicy,
    SmtpSettings,
    deliver,
    post_alert_webhook,
    render_email,
    send_email,
)
from tests.http_server import bound_socket, serve_app

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
USER, PASSWORD = "alerts", "s3cret-Pa55word"
SENDER, RECIPIENT = "callplane <fraud@callplane.test>", "ops@example.com"
NOW = datetime(2025, 6, 1, 12, 10, tzinfo=UTC)
FAST = RetryPolicy(attempts=5, first_delay_s=0.01, max_delay_s=0.05, attempt_timeout_s=5)

ALERT = FraudAlert(
    event_id="offer-31/call_spike",
    occurred_at="2025-06-01T12:09:30.000Z",
    number="+48123456789",
    account_id="acct_42",
    rule="call_spike",
    count=31,
    threshold=30,
    window_s=600,
    first_at="2025-06-01T12:00:00.000Z",
    last_at="2025-06-01T12:09:30.000Z",
    summary="31 calls to +48123456789 within 10 min (threshold 30)",
    evidence=AlertEvidence(
        first_call_id="call_1",
        last_call_id="call_31",
        top_source_ips=(Tally(value="203.0.113.7", count=25), Tally(value="198.51.100.22", count=6)),
        top_caller_prefixes=(Tally(value="+4479", count=20),),
    ),
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- a certificate for 127.0.0.1 from a throwaway CA -----------------------------------


@dataclass
class Tls:
    server: ssl.SSLContext  # presents the certificate for 127.0.0.1
    ca_file: str  # the CA that signed it, for SmtpSettings.ca_file


def _certificate(subject: str, issuer_key, public_key, issuer: str, *, ca: bool):
    import ipaddress

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
    if not ca:
        names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("test CA", ca_key, ca_key.public_key(), "test CA", ca=True)
    leaf = _certificate("127.0.0.1", ca_key, key.public_key(), "test CA", ca=False)
    folder = tmp_path_factory.mktemp("smtp-tls")
    pem = serialization.Encoding.PEM
    (folder / "ca.pem").write_bytes(ca.public_bytes(pem))
    (folder / "cert.pem").write_bytes(leaf.public_bytes(pem))
    (folder / "key.pem").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    return Tls(server=server, ca_file=str(folder / "ca.pem"))


# -- a real SMTP server -----------------------------------------------------------------


@dataclass
class Mail:
    sender: str
    recipients: list[str]
    content: bytes
    tls: bool  # the session was encrypted (STARTTLS or implicit TLS)
    login: str | None


@dataclass
class Mailbox:
    port: int
    received: list[Mail] = field(default_factory=list)
    answer: str = "250 OK"  # what DATA answers: "451 ..." or "550 ..." to refuse


class _Handler:
    def __init__(self, box: Mailbox) -> None:
        self.box = box

    async def handle_DATA(self, server, session, envelope) -> str:
        if self.box.answer.startswith("250"):
            login = session.auth_data.login.decode() if session.authenticated else None
            encrypted = server.transport.get_extra_info("ssl_object") is not None
            mail = Mail(envelope.mail_from, list(envelope.rcpt_tos), envelope.content, encrypted, login)
            self.box.received.append(mail)
        return self.box.answer


def _authenticate(server, session, envelope, mechanism: str, auth_data) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
        USER.encode(),
        PASSWORD.encode(),
    )
    return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)


@contextmanager
def smtp_server(**kwargs: object) -> Iterator[Mailbox]:
    box = Mailbox(port=free_port())
    controller = Controller(
        _Handler(box), hostname="127.0.0.1", port=box.port, authenticator=_authenticate, **kwargs
    )
    controller.start()
    try:
        yield box
    finally:
        controller.stop()


@pytest.fixture(scope="module")
def plain_smtp() -> Iterator[Mailbox]:
    """No TLS; AUTH allowed in the clear (a relay on the same host)."""
    with smtp_server(auth_require_tls=False) as box:
        yield box


@pytest.fixture(scope="module")
def starttls_smtp(tls: Tls) -> Iterator[Mailbox]:
    """STARTTLS required before anything else; AUTH only over TLS."""
    with smtp_server(tls_context=tls.server, require_starttls=True, auth_require_tls=True) as box:
        yield box


@pytest.fixture(scope="module")
def implicit_tls_smtp(tls: Tls) -> Iterator[Mailbox]:
    # TLS from the first byte; aiosmtpd's auth_require_tls only knows STARTTLS, so it is off here
    with smtp_server(ssl_context=tls.server, auth_require_tls=False) as box:
        yield box


@pytest.fixture
def mailbox_reset(plain_smtp: Mailbox, starttls_smtp: Mailbox) -> None:
    for box in (plain_smtp, starttls_smtp):
        box.received.clear()
        box.answer = "250 OK"


def smtp(port: int, **kwargs: object) -> SmtpSettings:
    base = {"host": "127.0.0.1", "port": port, "starttls": False, "sender": SENDER, "timeout_s": 5.0}
    return SmtpSettings(**{**base, **kwargs})


def alert_email(to: str = RECIPIENT):
    return render_email(ALERT, sender=SENDER, to=to)


def parsed(mail: Mail):
    return message_from_bytes(mail.content, policy=policy.default)


async def test_an_alert_email_is_delivered_with_auth(plain_smtp: Mailbox, mailbox_reset: None) -> None:
    await send_email(smtp(plain_smtp.port, username=USER, password=PASSWORD), alert_email())

    [mail] = plain_smtp.received
    assert mail.login == USER and not mail.tls
    assert mail.recipients == [RECIPIENT]
    assert "fraud@callplane.test" in mail.sender
    assert b"\r\nSubject: [callplane] call_spike on +48123456789: 31 calls" in mail.content  # not folded
    message = parsed(mail)
    assert message["Subject"] == "[callplane] call_spike on +48123456789: 31 calls in 10 min (threshold 30)"
    assert message["Message-ID"] == "<offer-31/call_spike@callplane>"
    body = message.get_content()
    assert "203.0.113.7" in body and "call_31" in body and "offer-31/call_spike" in body


async def test_starttls_with_a_private_ca_encrypts_before_auth(
    starttls_smtp: Mailbox, tls: Tls, mailbox_reset: None
) -> None:
    settings = smtp(starttls_smtp.port, starttls=True, username=USER, password=PASSWORD, ca_file=tls.ca_file)
    await send_email(settings, alert_email())
    [mail] = starttls_smtp.received
    assert mail.tls and mail.login == USER
    assert parsed(mail)["Message-ID"] == "<offer-31/call_spike@callplane>"


async def test_implicit_tls(implicit_tls_smtp: Mailbox, tls: Tls) -> None:
    settings = smtp(implicit_tls_smtp.port, tls=True, username=USER, password=PASSWORD, ca_file=tls.ca_file)
    await send_email(settings, alert_email())
    [mail] = implicit_tls_smtp.received
    assert mail.tls and mail.login == USER


async def test_starttls_refuses_a_certificate_it_does_not_trust(starttls_smtp: Mailbox, mailbox_reset: None) -> None:
    settings = smtp(starttls_smtp.port, starttls=True, username=USER, password=PASSWORD)  # system CAs only
    with pytest.raises(DeliveryError) as failed:
        await send_email(settings, alert_email())
    assert "CERTIFICATE_VERIFY_FAILED" in failed.value.reason
    assert starttls_smtp.received == []


async def test_without_starttls_the_server_that_requires_it_refuses(
    starttls_smtp: Mailbox, mailbox_reset: None
) -> None:
    with pytest.raises(DeliveryError) as failed:
        await send_email(smtp(starttls_smtp.port, starttls=False), alert_email())
    assert failed.value.transient is False and "530" in failed.value.reason
    assert starttls_smtp.received == []


async def test_a_wrong_password_is_permanent_and_never_quoted(plain_smtp: Mailbox, mailbox_reset: None) -> None:
    wrong = "Wr0ng-" + PASSWORD
    with pytest.raises(DeliveryError) as failed:
        await send_email(smtp(plain_smtp.port, username=USER, password=wrong), alert_email())
    assert failed.value.transient is False and "535" in failed.value.reason
    assert wrong not in str(failed.value) and wrong not in repr(failed.value)
    assert plain_smtp.received == []


@pytest.mark.parametrize(("answer", "transient"), [("451 4.3.0 try again later", True), ("554 5.6.0 no", False)])
async def test_a_refused_message_is_transient_on_4xx_and_permanent_on_5xx(
    plain_smtp: Mailbox, mailbox_reset: None, answer: str, transient: bool
) -> None:
    plain_smtp.answer = answer
    with pytest.raises(DeliveryError) as failed:
        await send_email(smtp(plain_smtp.port), alert_email())
    assert failed.value.transient is transient
    assert answer.split()[0] in failed.value.reason


async def test_a_server_that_refuses_connections_is_a_transient_failure() -> None:
    settings = smtp(free_port(), username=USER, password=PASSWORD)
    with pytest.raises(DeliveryError) as failed:
        await send_email(settings, alert_email())
    assert failed.value.transient is True
    assert PASSWORD not in failed.value.reason


async def test_a_server_that_never_answers_fails_by_its_deadline() -> None:
    with socket.socket() as silent:  # accepts connections (backlog) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        settings = smtp(silent.getsockname()[1], timeout_s=0.5)
        started = time.monotonic()
        with pytest.raises(DeliveryError) as failed:
            await send_email(settings, alert_email())
    assert time.monotonic() - started < 5  # a generous bound: the machine may be busy
    assert failed.value.transient is True and "0.5 s" in failed.value.reason


def test_smtp_settings_keep_the_password_out_of_their_repr() -> None:
    assert PASSWORD not in repr(smtp(25, username=USER, password=PASSWORD))


# -- a real HTTP server -----------------------------------------------------------------


@dataclass
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    port: int
    hits: list[Hit] = field(default_factory=list)

    def url(self, scenario: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}/alerts/{scenario}?token=t0ps3cret"


@contextmanager
def http_receiver() -> Iterator[Receiver]:
    sock = bound_socket()
    receiver = Receiver(port=sock.getsockname()[1])

    async def hook(request: Request) -> Response:
        body = await request.body()
        scenario = request.path_params["scenario"]
        receiver.hits.append(Hit(scenario, dict(request.headers), body))
        seen = sum(1 for hit in receiver.hits if hit.path == scenario)
        match scenario:
            case "ok":
                return Response(status_code=204)
            case "flaky":  # fails the first time, then takes it
                return Response("busy", status_code=500 if seen == 1 else 200)
            case "busy":
                return Response(status_code=429, headers={"retry-after": "0"})
            case "bad":
                return Response("no such hook", status_code=400)
            case "redirect":
                return Response(status_code=307, headers={"location": "/alerts/ok"})
            case "slow":  # far slower than any deadline a test sets
                await asyncio.sleep(10)
                return Response(status_code=200)
        return Response(status_code=404)

    app = Starlette(routes=[Route("/alerts/{scenario}", hook, methods=["POST"])])
    with serve_app(app, sock):
        yield receiver


@pytest.fixture(scope="module")
def receiver_server() -> Iterator[Receiver]:
    with http_receiver() as receiver:
        yield receiver


@pytest.fixture
def receiver(receiver_server: Receiver) -> Receiver:
    receiver_server.hits.clear()
    return receiver_server


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with make_client() as shared:
        yield shared


def verify_independently(hit: Hit) -> None:
    """The Standard Webhooks check, written out here: HMAC-SHA256 over "{id}.{ts}.{body}"."""
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    signed = f"{hit.headers['webhook-id']}.{hit.headers['webhook-timestamp']}.".encode() + hit.body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    versions = dict(part.split(",", 1) for part in hit.headers["webhook-signature"].split())
    assert hmac.compare_digest(versions["v1"], expected)


async def post(client: httpx.AsyncClient, url: str, **kwargs: object) -> None:
    await post_alert_webhook(client, url, SECRET, ALERT, now=NOW, **{"allow_private": True, **kwargs})


async def test_the_alert_is_posted_signed_with_its_event_id(receiver: Receiver, client: httpx.AsyncClient) -> None:
    await post(client, receiver.url("ok"))

    [hit] = receiver.hits
    assert hit.headers["webhook-id"] == ALERT.event_id
    assert hit.headers["webhook-timestamp"] == str(int(NOW.timestamp()))
    assert hit.headers["content-type"] == "application/json"
    verify_independently(hit)
    assert decode(hit.body) == ALERT


async def test_the_reference_verifier_accepts_a_signature_made_now(
    receiver: Receiver, client: httpx.AsyncClient
) -> None:
    await post_alert_webhook(client, receiver.url("ok"), SECRET, ALERT, now=datetime.now(UTC), allow_private=True)
    [hit] = receiver.hits
    payload = Webhook(SECRET).verify(hit.body, hit.headers)  # it also checks the timestamp's age
    assert payload["event_id"] == ALERT.event_id


async def test_a_500_then_200_is_retried_and_delivered_once_with_the_same_id(
    receiver: Receiver, client: httpx.AsyncClient
) -> None:
    metrics = DeliveryMetrics()
    delivery = AlertDelivery(smtp=None, client=client, webhook_secret=SECRET, allow_private=True, policy=FAST, metrics=metrics)

    result = await delivery.webhook(ALERT, receiver.url("flaky"))

    assert result.delivered and result.attempts == 2
    assert [hit.headers["webhook-id"] for hit in receiver.hits] == [ALERT.event_id, ALERT.event_id]
    for hit in receiver.hits:
        verify_independently(hit)
    assert metrics.snapshot()["webhook"] == {"delivered": 1, "retried": 1, "failed": 0}


@pytest.mark.parametrize("scenario", ["bad", "redirect"])
async def test_a_4xx_or_3xx_is_not_retried(receiver: Receiver, client: httpx.AsyncClient, scenario: str) -> None:
    metrics = DeliveryMetrics()
    with structlog.testing.capture_logs() as logs:
        result = await deliver(
            "webhook", ALERT.event_id, lambda: post(client, receiver.url(scenario)), policy=FAST, metrics=metrics
        )
    assert not result.delivered and result.attempts == 1
    assert result.error is not None and result.error.transient is False
    assert len(receiver.hits) == 1
    assert metrics.snapshot()["webhook"] == {"delivered": 0, "retried": 0, "failed": 1}
    [line] = [entry for entry in logs if entry["event"] == "alert_delivery_failed"]
    assert line["alert_id"] == ALERT.event_id and line["channel"] == "webhook"
    assert "HTTP" in line["reason"] and "t0ps3cret" not in str(line)


async def test_429_is_retried_until_attempts_run_out(receiver: Receiver, client: httpx.AsyncClient) -> None:
    metrics = DeliveryMetrics()
    policy = RetryPolicy(attempts=3, first_delay_s=0.01, max_delay_s=0.05)
    result = await deliver("webhook", ALERT.event_id, lambda: post(client, receiver.url("busy")), policy=policy, metrics=metrics)
    assert not result.delivered and result.attempts == 3 and result.error.transient
    assert len(receiver.hits) == 3
    assert metrics.snapshot()["webhook"] == {"delivered": 0, "retried": 2, "failed": 1}


async def test_no_answer_in_time_is_transient_and_bounded(receiver: Receiver, client: httpx.AsyncClient) -> None:
    started = time.monotonic()
    with pytest.raises(DeliveryError) as failed:
        await post(client, receiver.url("slow"), timeout_s=0.3)
    assert time.monotonic() - started < 5  # cut by the deadline, not by the answer 10 s later
    assert failed.value.transient is True and failed.value.reason == "no answer within 300 ms"


async def test_a_refused_connection_is_transient_and_the_url_is_never_quoted(client: httpx.AsyncClient) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/alerts?token=t0ps3cret"
    with pytest.raises(DeliveryError) as failed:
        await post(client, url)
    assert failed.value.transient is True
    assert "t0ps3cret" not in failed.value.reason and str(port) not in failed.value.reason
    assert SECRET not in failed.value.reason


async def test_ssrf_a_loopback_url_is_refused_without_allow_private(
    receiver: Receiver, client: httpx.AsyncClient
) -> None:
    with pytest.raises(DeliveryError) as failed:
        await post(client, receiver.url("ok"), allow_private=False)
    assert failed.value.transient is False
    assert failed.value.reason.startswith("unsafe webhook URL: ")
    assert receiver.hits == []

    with pytest.raises(DeliveryError) as metadata:  # not even with allow_private
        await post(client, "http://169.254.169.254/latest/meta-data", allow_private=True)
    assert "metadata address" in metadata.value.reason


async def test_a_bad_secret_is_permanent_and_never_quoted(receiver: Receiver, client: httpx.AsyncClient) -> None:
    with pytest.raises(DeliveryError) as failed:
        await post_alert_webhook(client, receiver.url("ok"), "whsec_not base64!", ALERT, now=NOW, allow_private=True)
    assert failed.value.transient is False and "not base64" not in failed.value.reason
    assert receiver.hits == []
