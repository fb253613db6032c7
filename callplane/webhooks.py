"""Outgoing webhooks, the parts every service shares: Standard Webhooks signing, the SSRF check
of a URL, and an HTTP client that connects only to addresses that check has pinned.

    host, addresses = await checked_addresses(url, allow_private=False)   # or UnsafeWebhookUrl
    with pinned(host, addresses):
        await client.post(url, content=body, headers=headers)              # client = make_client()

Signing (https://www.standardwebhooks.com): headers webhook-id (the idempotency id: the same
for every retry of one message, so the receiver can dedupe), webhook-timestamp (unix seconds)
and webhook-signature "v1,<base64 HMAC-SHA256 over '{id}.{timestamp}.{body}'>" keyed by the
secret "whsec_<base64>".

- SSRF: `check_url` allows only https (http too when allow_private), no user:password@, and a
  host whose every address is global. Refused unless allow_private: loopback, private
  (RFC 1918, fc00::/7, fec0::/10), link-local (169.254.0.0/16, fe80::/10), shared
  (100.64.0.0/10), other special-purpose and reserved ranges, and those forms embedded in IPv6
  (::ffff:a.b.c.d, ::a.b.c.d, 6to4 2002::/16, NAT64 64:ff9b::/96). Refused even with
  allow_private, since no webhook lives there: the cloud metadata addresses and names
  (METADATA_ADDRESSES, METADATA_NAMES), unspecified, multicast and broadcast addresses.
- DNS rebinding: the host is resolved once, checked, and the connection goes to the checked
  address. `make_client`'s transport has a network backend that connects only to addresses
  pinned for the current request (a ContextVar set by `pinned`); an unpinned host is refused,
  so the shared client can reach nothing unchecked. The URL keeps its host name, so the Host
  header, SNI and certificate check are of the name, and kept-alive connections are pooled per
  (scheme, host, port), never shared between names that happen to share an address.
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
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TypeAlias

import httpcore
import httpx

DEFAULT_TIMEOUT_MS = 2000
USER_AGENT = "callplane-webhook/1"

Resolver: TypeAlias = Callable[[str], Awaitable[list[str]]]
IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address


class UnsafeWebhookUrl(ValueError):
    """The URL may not be called: its scheme, its form, or an address it resolves to."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# -- signing ----------------------------------------------------------------------------


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


def signed_headers(secret: str, msg_id: str, now: datetime, body: bytes) -> dict[str, str]:
    """The headers of a signed JSON POST: content-type and the three webhook-* headers."""
    timestamp = unix_seconds(now)
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
    }


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


# -- the client: connections only to pinned addresses -----------------------------------

# host (as in the URL) -> the checked addresses to connect to, for the current request
_PINNED: ContextVar[Mapping[str, tuple[str, ...]]] = ContextVar("callplane_webhook_pinned", default={})


@contextmanager
def pinned(host: str, addresses: tuple[str, ...]) -> Iterator[None]:
    """Within this block (and the tasks it starts), make_client's clients connect to `host` only
    at `addresses`, which must come from checked_addresses."""
    token = _PINNED.set({**_PINNED.get(), host: addresses})
    try:
        yield
    finally:
        _PINNED.reset(token)


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
            raise httpcore.ConnectError("no checked address for this host; check the URL and pin it first")
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
    """The one shared client for outgoing webhooks: no redirects, no proxies or netrc from the
    environment, connections only to addresses pinned by `pinned`. `verify`: certificates are
    checked against the system CAs (or SSL_CERT_FILE), or this context's."""
    return httpx.AsyncClient(
        transport=_PinnedTransport(
            httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=30),
            verify,
        ),
        follow_redirects=False,
        trust_env=False,
        timeout=httpx.Timeout(DEFAULT_TIMEOUT_MS / 1000),
        # identity: answers are capped as read, and a compressed one would expand past the cap
        headers={"user-agent": USER_AGENT, "accept-encoding": "identity"},
    )


def error_text(error: BaseException) -> str:
    """A short description of an exception for a failure reason: its type and first line."""
    text = str(error).splitlines()[0][:120] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
