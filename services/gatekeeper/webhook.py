"""The pre-call webhook (SPEC section 6): before a call is accepted, the gatekeeper may ask the
account's or number's own endpoint for per-call personalization, or whether to decline the call.

    outcome = await call_pre_call_webhook(client, settings, caller_id=..., agent_id=...,
                                          called_number=..., call_id=..., msg_id=..., now=now)
    Proceed(dynamic_variables, conversation_config_override)  -> into call.accepted
    Decline(reason)                                           -> call.rejected webhook_rejected 603
    Failed(reason, fail_closed, kind)                         -> defaults, or reject if fail_closed

The decisions are pure functions (`sign`, `classify_address`, `parse_answer`, `outcome_of`);
the I/O is thin: one DNS resolution, one POST, a capped read. `call_pre_call_webhook` never
raises for a timeout, a connection error, a bad status, a bad answer or an unsafe URL: those are
all `Failed`, and the caller decides by `fail_closed`.

The request: POST, JSON body {caller_id, agent_id, called_number, call_id}, signed per
Standard Webhooks (https://www.standardwebhooks.com): headers webhook-id (`msg_id`; pass one
derived from the offer, so a redelivered offer sends the same id and the receiver can dedupe),
webhook-timestamp (unix seconds of `now`, never the clock) and webhook-signature
"v1,<base64 HMAC-SHA256 over '{id}.{timestamp}.{body}'>" keyed by the secret "whsec_<base64>".

The answer (2xx, JSON object; 204 No Content means "no changes"), every field optional:
    dynamic_variables             {name: string | number | bool}; names ^[A-Za-z_][A-Za-z0-9_]{0,63}$,
                                  never starting with "system__" (any case): those are ours
    conversation_config_override  nested object, only the leaves in OVERRIDABLE (below)
    reject, reason                true declines the call; reason (truncated) is kept for the decision
    type                          "conversation_initiation_client_data", accepted so that an
                                  ElevenLabs-style webhook works unchanged
Any other field, a nested object or null as a variable value, an override outside the
allow-list -> Failed(kind="invalid_answer") with a reason naming the field. An answer that says
"reject": true declines even if its other fields are malformed: declining is always safe.

Decisions:
- Deadline: `timeout_ms` bounds the whole exchange (DNS, connect, TLS, request, answer), since
  a caller is ringing meanwhile. The answer is read up to 64 KiB (MAX_ANSWER_BYTES), then Failed.
- Redirects are not followed (a Location could point inside the network): 3xx is Failed.
- SSRF: `check_url` allows only https (http too when allow_private), no user:password@, and a
  host whose every address is global. Refused unless allow_private: loopback, private
  (RFC 1918, fc00::/7, fec0::/10), link-local (169.254.0.0/16, fe80::/10), shared
  (100.64.0.0/10), other special-purpose and reserved ranges, and those forms embedded in IPv6
  (::ffff:a.b.c.d, ::a.b.c.d, 6to4 2002::/16, NAT64 64:ff9b::/96). Refused even with
  allow_private, since no webhook lives there: the cloud metadata addresses and names
  (METADATA_ADDRESSES, METADATA_NAMES), unspecified, multicast and broadcast addresses.
- DNS rebinding: the host is resolved once, checked, and the connection goes to the checked
  address. `make_client`'s transport has a network backend that connects only to addresses
  pinned for the current request (a ContextVar set by `call_pre_call_webhook`); an unpinned host
  is refused, so the shared client can reach nothing unchecked. The URL keeps its host name,
  so the Host header, SNI and certificate check are of the name, and kept-alive connections are
  pooled per (scheme, host, port), never shared between names that happen to share an address.
  Residual risk: a kept-alive connection to a host is reused while it lives (30 s idle) even if
  the name now resolves elsewhere; it was opened to an address that passed the check.
  (Coupling: the transport subclasses httpx.AsyncHTTPTransport and sets its `_pool`, an
  httpx-private attribute, to a pool with that backend; the tests catch a change.)
- Failure reasons never quote the URL: webhook URLs often carry tokens.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import ipaddress
import math
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal, TypeAlias

import httpcore
import httpx
import msgspec

DEFAULT_TIMEOUT_MS = 2000
MAX_ANSWER_BYTES = 64 * 1024
MAX_REASON_CHARS = 200
USER_AGENT = "callplane-webhook/1"
ANSWER_TYPE = "conversation_initiation_client_data"  # the ElevenLabs answer's `type`

Resolver: TypeAlias = Callable[[str], Awaitable[list[str]]]
VariableValue: TypeAlias = str | int | float | bool
IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

# -- settings ---------------------------------------------------------------------------


def _text_leaf(max_chars: int) -> Callable[[object], str | None]:
    def check(value: object) -> str | None:
        if not isinstance(value, str):
            return "must be a string"
        if len(value) > max_chars:
            return f"must be at most {max_chars} characters"
        return None

    return check


def _pattern_leaf(pattern: str, rule: str) -> Callable[[object], str | None]:
    compiled = re.compile(pattern)

    def check(value: object) -> str | None:
        if not isinstance(value, str) or not compiled.fullmatch(value):
            return f"must be {rule}"
        return None

    return check


# What an answer may override in the agent's conversation config, as dotted paths of the
# nested object, each with its validator (None = valid, else the rule broken). The same
# leaves ElevenLabs lets a pre-call webhook override; anything else (the LLM, tools, the
# knowledge base, TTS tuning) stays the agent's own configuration.
OVERRIDABLE: Mapping[str, Callable[[object], str | None]] = {
    "agent.first_message": _text_leaf(4_000),
    "agent.language": _pattern_leaf(
        r"[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8}){0,3}", "a language code, e.g. 'en' or 'pt-BR'"
    ),
    "agent.prompt.prompt": _text_leaf(50_000),
    "tts.voice_id": _pattern_leaf(r"[A-Za-z0-9._:-]{1,128}", "a voice id (letters, digits, . _ : -)"),
}


def decode_secret(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret: base64 after an optional "whsec_"."""
    text = secret.removeprefix("whsec_")
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("webhook secret must be 'whsec_' followed by base64") from None
    if not key:
        raise ValueError("webhook secret is empty")
    return key


class WebhookSettings(msgspec.Struct, frozen=True, kw_only=True):
    """One account's or number's pre-call webhook."""

    url: str
    secret: str  # Standard Webhooks: "whsec_<base64 key>"
    timeout_ms: int = DEFAULT_TIMEOUT_MS
    fail_closed: bool = False  # on timeout or error: reject the call instead of using defaults
    allow_private: bool = False  # let the URL resolve to loopback/private/link-local addresses
    # Narrower than OVERRIDABLE when the agent allows fewer overrides.
    allowed_overrides: frozenset[str] = frozenset(OVERRIDABLE)

    def __post_init__(self) -> None:
        decode_secret(self.secret)
        if not 1 <= self.timeout_ms <= 30_000:
            raise ValueError("timeout_ms must be 1 to 30000")
        if unknown := self.allowed_overrides - OVERRIDABLE.keys():
            raise ValueError(f"not overridable: {', '.join(sorted(unknown))}")

    def __repr__(self) -> str:  # the secret and the URL (which often carries a token) stay out of logs
        return (
            f"WebhookSettings(url=<redacted>, secret=<redacted>, timeout_ms={self.timeout_ms},"
            f" fail_closed={self.fail_closed}, allow_private={self.allow_private})"
        )


# -- outcomes ---------------------------------------------------------------------------

FailureKind = Literal[
    "unsafe_url", "dns", "connect", "timeout", "status", "redirect", "too_large", "invalid_answer"
]


class Proceed(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    dynamic_variables: dict[str, VariableValue] = {}
    conversation_config_override: dict[str, Any] = {}  # nested, only OVERRIDABLE leaves


class Decline(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    reason: str  # the webhook's own, or a default; for the decision record


class Failed(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    reason: str  # human-readable; never contains the URL
    fail_closed: bool  # the caller rejects the call if true, else proceeds with defaults
    kind: FailureKind


WebhookOutcome: TypeAlias = Proceed | Decline | Failed


class Answer(msgspec.Struct, frozen=True, kw_only=True):
    """A valid answer."""

    dynamic_variables: dict[str, VariableValue] = {}
    conversation_config_override: dict[str, Any] = {}
    reject: bool = False
    reason: str | None = None


class Invalid(msgspec.Struct, frozen=True):
    """Why an answer is not valid."""

    reason: str


class UnsafeWebhookUrl(ValueError):
    """The URL may not be called: its scheme, its form, or an address it resolves to."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# -- signing ----------------------------------------------------------------------------


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks `webhook-signature` value: "v1,<base64 HMAC-SHA256>"."""
    content = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(decode_secret(secret), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def unix_seconds(now: datetime) -> int:
    """`now` as integer unix seconds; a naive datetime is taken as UTC."""
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return math.floor(now.timestamp())


def request_parts(
    settings: WebhookSettings,
    *,
    caller_id: str,
    agent_id: str,
    called_number: str,
    call_id: str,
    msg_id: str,
    now: datetime,
) -> tuple[bytes, dict[str, str]]:
    """The body and headers of the POST."""
    body = msgspec.json.encode(
        {"caller_id": caller_id, "agent_id": agent_id, "called_number": called_number, "call_id": call_id}
    )
    timestamp = unix_seconds(now)
    headers = {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(settings.secret, msg_id, timestamp, body),
    }
    return body, headers


# -- SSRF: which addresses may be called ------------------------------------------------

# Cloud instance metadata services: AWS/GCP/Azure/OpenStack/DigitalOcean (and the AWS IPv6
# endpoint), AWS ECS task metadata, EKS pod identity, Alibaba Cloud, Oracle Cloud.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",
        "169.254.170.2",
        "169.254.170.23",
        "100.100.100.200",
        "192.0.0.192",
        "fd00:ec2::254",
        "fd00:ec2::23",
    )
)
METADATA_NAMES = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "instance-data",
        "instance-data.ec2.internal",
        "metadata.tencentyun.com",
    }
)
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT (RFC 6598)
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_RFC1918 = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))
_UNIQUE_LOCAL = ipaddress.ip_network("fc00::/7")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_BROADCAST = ipaddress.ip_address("255.255.255.255")

# Categories refused even when private addresses are allowed: nothing legitimate lives there.
ALWAYS_REFUSED = frozenset({"metadata", "unspecified", "multicast", "broadcast"})


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, if it is one of the forms that reach it."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    plain = ipaddress.IPv6Address(int(ip))  # without a scope id, for network membership
    if plain in _NAT64 or (plain in _IPV4_COMPATIBLE and int(plain) > 1):
        return ipaddress.IPv4Address(int(plain) & 0xFFFFFFFF)
    return None


def classify_address(ip: IPAddress) -> str | None:
    """None for a global (publicly routable) address, else its category: metadata, unspecified,
    multicast, broadcast, loopback, private, link-local, shared, special-purpose, reserved."""
    if isinstance(ip, ipaddress.IPv6Address):
        if (v4 := _embedded_ipv4(ip)) is not None:
            return classify_address(v4)
        ip = ipaddress.IPv6Address(int(ip))  # drop a %scope
    if ip in METADATA_ADDRESSES:
        return "metadata"
    if ip.is_unspecified or ip in _THIS_NETWORK:
        return "unspecified"
    if ip.is_multicast:
        return "multicast"
    if ip == _BROADCAST:
        return "broadcast"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip in _SHARED:
        return "shared"
    if any(ip in net for net in _RFC1918) or ip in _UNIQUE_LOCAL or getattr(ip, "is_site_local", False):
        return "private"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private or not ip.is_global:
        return "special-purpose"
    return None


def refusal(ip: IPAddress, *, allow_private: bool) -> str | None:
    """Why `ip` may not be called, or None."""
    category = classify_address(ip)
    if category is None or (allow_private and category not in ALWAYS_REFUSED):
        return None
    if isinstance(ip, ipaddress.IPv6Address) and (v4 := _embedded_ipv4(ip)) is not None:
        return f"{category} address {v4} (within IPv6 {ip})"
    return f"{category} address {ip}"


async def system_resolve(host: str) -> list[str]:
    """Every address `host` resolves to, by the event loop's getaddrinfo."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


async def checked_addresses(
    url: str, *, allow_private: bool, resolve: Resolver = system_resolve
) -> tuple[str, tuple[str, ...]]:
    """(host as the HTTP client will connect to it, every address it resolves to), each checked;
    raises UnsafeWebhookUrl. DNS errors propagate as OSError."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        raise UnsafeWebhookUrl("not a valid URL") from None
    if parsed.scheme != "https" and not (parsed.scheme == "http" and allow_private):
        raise UnsafeWebhookUrl(
            "http is allowed only with allow_private; use https"
            if parsed.scheme == "http"
            else "the URL must be https"
        )
    if parsed.userinfo:
        raise UnsafeWebhookUrl("the URL must not contain user:password@")
    host = parsed.raw_host.decode("ascii")
    if not host:
        raise UnsafeWebhookUrl("the URL has no host")
    name = host.lower().rstrip(".")
    if name in METADATA_NAMES:
        raise UnsafeWebhookUrl(f"cloud metadata host {name}")
    if not allow_private and (name == "localhost" or name.endswith(".localhost")):
        raise UnsafeWebhookUrl(f"loopback host {name}")
    literal = _literal(host)
    addresses = [host] if literal is not None else await resolve(host)
    if not addresses:
        raise UnsafeWebhookUrl("the host resolves to no address")
    for address in addresses:
        ip = _literal(address)
        if ip is None:
            raise UnsafeWebhookUrl(f"the host resolves to a non-address {address[:64]!r}")
        if reason := refusal(ip, allow_private=allow_private):
            raise UnsafeWebhookUrl(reason if literal is not None else f"the host resolves to a {reason}")
    return host, tuple(addresses)


async def check_url(url: str, *, allow_private: bool, resolve: Resolver = system_resolve) -> None:
    """Raise UnsafeWebhookUrl unless `url` may be called (see the module docstring)."""
    await checked_addresses(url, allow_private=allow_private, resolve=resolve)


# -- the answer -------------------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_ANSWER_FIELDS = frozenset({"dynamic_variables", "conversation_config_override", "reject", "reason", "type"})
_INT64 = range(-(2**63), 2**63)


def _shown(name: object) -> str:
    return repr(str(name)[:64])


def _truncate(reason: object) -> str | None:
    if not isinstance(reason, str) or not reason.strip():
        return None
    return reason.strip()[:MAX_REASON_CHARS]


def _variables(value: object) -> dict[str, VariableValue] | Invalid:
    if not isinstance(value, dict):
        return Invalid("dynamic_variables must be an object")
    result: dict[str, VariableValue] = {}
    for name, item in value.items():
        if not _NAME.fullmatch(name):
            return Invalid(f"dynamic_variables: name {_shown(name)} must match ^[A-Za-z_][A-Za-z0-9_]{{0,63}}$")
        if name.lower().startswith("system__"):
            return Invalid(f"dynamic_variables: {name} is reserved (system__ names are set by callplane)")
        if isinstance(item, bool | str) or (isinstance(item, int) and item in _INT64):
            result[name] = item
        elif isinstance(item, float) and math.isfinite(item):
            result[name] = item
        else:
            kind = {dict: "an object", list: "an array", type(None): "null", int: "an integer out of range"}
            return Invalid(
                f"dynamic_variables.{name} must be a string, number or bool, not {kind.get(type(item), 'that')}"
            )
    return result


def _leaves(value: object, parts: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], object]]:
    """(path, leaf) of a nested object; a path in OVERRIDABLE is a leaf whatever its value."""
    if isinstance(value, dict) and ".".join(parts) not in OVERRIDABLE:
        for key, item in value.items():
            yield from _leaves(item, (*parts, key))
    else:
        yield parts, value


def _overrides(value: object, allowed: frozenset[str]) -> dict[str, Any] | Invalid:
    if not isinstance(value, dict):
        return Invalid("conversation_config_override must be an object")
    result: dict[str, Any] = {}
    for parts, leaf in _leaves(value):
        path = ".".join(parts)
        if path not in allowed or any("." in part for part in parts):
            return Invalid(
                f"conversation_config_override.{path[:128]} may not be overridden"
                f" (allowed: {', '.join(sorted(allowed)) or 'none'})"
            )
        if error := OVERRIDABLE[path](leaf):
            return Invalid(f"conversation_config_override.{path} {error}")
        *parents, last = parts
        node = result
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = leaf
    return result


def parse_answer(data: bytes, *, allowed_overrides: frozenset[str] = frozenset(OVERRIDABLE)) -> Answer | Invalid:
    """Validate the webhook's answer (see the module docstring)."""
    if not data.strip():
        return Invalid("the answer is empty; send a JSON object, or 204 for no changes")
    try:
        obj = msgspec.json.decode(data)
    except msgspec.DecodeError as error:
        return Invalid(f"the answer is not valid JSON: {error}")
    if not isinstance(obj, dict):
        return Invalid("the answer must be a JSON object")
    obj = {key: value for key, value in obj.items() if value is not None}  # null = absent
    reject = obj.get("reject", False)
    if not isinstance(reject, bool):
        return Invalid("reject must be true or false")
    if "reason" in obj and not isinstance(obj["reason"], str):
        return Invalid("reason must be a string")
    if reject:  # honoured even if the rest is malformed: declining is always safe
        return Answer(reject=True, reason=_truncate(obj.get("reason")))
    if unknown := sorted(obj.keys() - _ANSWER_FIELDS):
        return Invalid(f"unknown field {_shown(unknown[0])} (allowed: {', '.join(sorted(_ANSWER_FIELDS))})")
    if "type" in obj and obj["type"] != ANSWER_TYPE:
        return Invalid(f"type must be {ANSWER_TYPE!r} when given")
    variables = _variables(obj.get("dynamic_variables", {}))
    if isinstance(variables, Invalid):
        return variables
    overrides = _overrides(obj.get("conversation_config_override", {}), allowed_overrides)
    if isinstance(overrides, Invalid):
        return overrides
    return Answer(
        dynamic_variables=variables, conversation_config_override=overrides, reason=_truncate(obj.get("reason"))
    )


def outcome_of(status: int, body: bytes, settings: WebhookSettings) -> WebhookOutcome:
    """What an HTTP answer means (the body may be empty unless status is 2xx)."""
    if 300 <= status < 400:
        reason = f"answered HTTP {status}; redirects are not followed"
        return Failed(reason=reason, fail_closed=settings.fail_closed, kind="redirect")
    if not 200 <= status < 300:
        return Failed(reason=f"answered HTTP {status}", fail_closed=settings.fail_closed, kind="status")
    if status == 204:
        return Proceed()
    answer = parse_answer(body, allowed_overrides=settings.allowed_overrides)
    if isinstance(answer, Invalid):
        reason = f"invalid answer: {answer.reason}"
        return Failed(reason=reason, fail_closed=settings.fail_closed, kind="invalid_answer")
    if answer.reject:
        return Decline(reason=answer.reason or "declined by the pre-call webhook")
    return Proceed(
        dynamic_variables=answer.dynamic_variables,
        conversation_config_override=answer.conversation_config_override,
    )


# -- I/O --------------------------------------------------------------------------------

# host (as in the URL) -> the checked addresses to connect to, for the current request
_PINNED: ContextVar[Mapping[str, tuple[str, ...]]] = ContextVar("callplane_webhook_pinned", default={})


class _PinnedBackend(httpcore.AsyncNetworkBackend):
    """Connects only to the addresses pinned for the host; never resolves names itself."""

    def __init__(self) -> None:
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = _PINNED.get().get(host)
        if not addresses:
            raise httpcore.ConnectError("no checked address for this host; use call_pre_call_webhook")
        last: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as error:
                last = error
        assert last is not None
        raise last

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Any = None
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not webhook targets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _PinnedTransport(httpx.AsyncHTTPTransport):
    def __init__(self, limits: httpx.Limits, verify: ssl.SSLContext | bool) -> None:
        # Not super().__init__: the same pool it would build, plus the pinning backend.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(verify=verify),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=True,
            http2=False,
            network_backend=_PinnedBackend(),
        )


def make_client(*, verify: ssl.SSLContext | bool = True) -> httpx.AsyncClient:
    """The one shared client for pre-call webhooks: no redirects, no proxies or netrc from the
    environment, connections only to addresses checked by call_pre_call_webhook. `verify`:
    certificates are checked against the system CAs (or SSL_CERT_FILE), or this context's."""
    return httpx.AsyncClient(
        transport=_PinnedTransport(
            httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=30),
            verify,
        ),
        follow_redirects=False,
        trust_env=False,
        timeout=httpx.Timeout(DEFAULT_TIMEOUT_MS / 1000),
        # identity: the answer is capped as read, and a compressed one would expand past the cap
        headers={"user-agent": USER_AGENT, "accept-encoding": "identity"},
    )


def _error_text(error: BaseException) -> str:
    text = str(error).splitlines()[0][:120] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


async def _exchange(
    client: httpx.AsyncClient,
    settings: WebhookSettings,
    body: bytes,
    headers: dict[str, str],
    resolve: Resolver,
    deadline: float,
) -> WebhookOutcome:
    fail_closed = settings.fail_closed
    try:
        host, addresses = await checked_addresses(
            settings.url, allow_private=settings.allow_private, resolve=resolve
        )
    except UnsafeWebhookUrl as error:
        return Failed(reason=f"unsafe webhook URL: {error.reason}", fail_closed=fail_closed, kind="unsafe_url")
    except OSError as error:
        reason = f"the webhook host does not resolve ({_error_text(error)})"
        return Failed(reason=reason, fail_closed=fail_closed, kind="dns")
    token = _PINNED.set({**_PINNED.get(), host: addresses})
    try:
        request = client.stream(
            "POST", settings.url, content=body, headers=headers, timeout=deadline, follow_redirects=False
        )
        async with request as response:
            status = response.status_code
            if not 200 <= status < 300:
                return outcome_of(status, b"", settings)
            received = bytearray()
            async for chunk in response.aiter_bytes():
                received += chunk
                if len(received) > MAX_ANSWER_BYTES:
                    reason = f"the answer is larger than {MAX_ANSWER_BYTES} bytes"
                    return Failed(reason=reason, fail_closed=fail_closed, kind="too_large")
            return outcome_of(status, bytes(received), settings)
    except httpx.TimeoutException:
        raise TimeoutError from None
    except httpx.HTTPError as error:  # transport errors, decoding errors; never the URL in the reason
        reason = f"the request failed ({_error_text(error)})"
        return Failed(reason=reason, fail_closed=fail_closed, kind="connect")
    finally:
        _PINNED.reset(token)


async def call_pre_call_webhook(
    client: httpx.AsyncClient,
    settings: WebhookSettings,
    *,
    caller_id: str,
    agent_id: str,
    called_number: str,
    call_id: str,
    msg_id: str,
    now: datetime,
    resolve: Resolver = system_resolve,
) -> WebhookOutcome:
    """POST the signed request and turn what happens into an outcome; never raises for a
    timeout, a failure or a bad answer. `client` should come from make_client() (another
    client works but resolves the name again when connecting: see DNS rebinding above)."""
    body, headers = request_parts(
        settings,
        caller_id=caller_id,
        agent_id=agent_id,
        called_number=called_number,
        call_id=call_id,
        msg_id=msg_id,
        now=now,
    )
    deadline = settings.timeout_ms / 1000
    try:
        async with asyncio.timeout(deadline):
            return await _exchange(client, settings, body, headers, resolve, deadline)
    except TimeoutError:
        reason = f"no answer within {settings.timeout_ms} ms"
        return Failed(reason=reason, fail_closed=settings.fail_closed, kind="timeout")
