"""Input validation for the provisioner: each refusal names the field and the rule it broke.

Validators are pure functions that return the normalized value or raise `Invalid`:

    ValueError
    └── Invalid(field, rule)   field: "policy.allowed_cidrs[2]"; rule: stable code, e.g. "cidr"

Decisions:
- e164 requires `is_possible_number`, not `is_valid_number`: the ranges reserved for fiction and
  tests (+1 555-01xx, +44 7700 900xxx) that our demos use are "impossible to assign", so
  libphonenumber calls them invalid, yet they have the right length for their country.
  It is stricter than is_possible_number in one way: a number dialable only locally (US 7-digit,
  no area code) is refused, since a registry of E.164 numbers needs the full number.
- cidr accepts a bare address as a single host (/32 or /128): operators list one trunk IP far
  more often than a range, and the normalized text always carries the prefix length.
- Twilio account SIDs must be 'AC' + 32 lowercase hex digits, exactly as Twilio issues them: the
  SID goes back to Twilio verbatim, so a changed case means a mangled copy, not another spelling.
- Host names are ASCII (IDNs are given in punycode, xn--...) and compared in lowercase.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import zoneinfo
from collections.abc import Callable
from functools import lru_cache
from urllib.parse import urlsplit

import msgspec
import phonenumbers

from schemas.events import InboundTrunk, OutboundTrunk, SecurityPolicy

# Field names that may hold a secret: their values never appear in a message.
_SECRET_FIELD = re.compile(r"token|password|passwd|secret|credential|auth|key", re.IGNORECASE)
_MAX_SHOWN = 80  # characters of an offending value quoted back; enough to spot the typo


class Invalid(ValueError):
    """A refused input: `field` is where, `rule` is a stable code, str(exc) is for humans."""

    def __init__(self, field: str, rule: str, detail: str, value: object = None) -> None:
        self.field, self.rule = field, rule
        shown = ""
        if value is not None and not _SECRET_FIELD.search(field):
            text = repr(value)
            shown = f" (got {text[:_MAX_SHOWN]}{'...' if len(text) > _MAX_SHOWN else ''})"
        super().__init__(f"{field}: {detail}{shown}")

    @property
    def message(self) -> str:
        return str(self)


def _text(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise Invalid(field, "type", f"must be a string, not {type(value).__name__}")
    return value


# -- scalars -----------------------------------------------------------------------

# Visual separators people paste along with a number; letters (vanity numbers, "ext.") are not.
_PHONE_CHARS = re.compile(r"\+[0-9 ()./-]{1,40}")
_POSSIBLE = phonenumbers.ValidationResult.IS_POSSIBLE
_IMPOSSIBLE = {
    phonenumbers.ValidationResult.TOO_SHORT: "is too short for its country",
    phonenumbers.ValidationResult.TOO_LONG: "is too long for its country",
    phonenumbers.ValidationResult.INVALID_COUNTRY_CODE: "has an unknown country code",
    # is_possible_number() says yes to these, but without an area code no one abroad can dial them.
    phonenumbers.ValidationResult.IS_POSSIBLE_LOCAL_ONLY: "is a local number: add the area code",
}


def e164(value: object, field: str = "number") -> str:
    text = _text(value, field).strip()
    if not _PHONE_CHARS.fullmatch(text):
        raise Invalid(field, "e164", "must be an international number: '+', country code, digits", value)
    try:
        parsed = phonenumbers.parse(text, None)
    except phonenumbers.NumberParseException:
        raise Invalid(field, "e164", "is not a phone number (unknown country code?)", value) from None
    if (reason := phonenumbers.is_possible_number_with_reason(parsed)) != _POSSIBLE:
        raise Invalid(field, "e164", _IMPOSSIBLE.get(reason, "is not a possible number"), value)
    normalized = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
    if normalized.lstrip("+") != re.sub(r"\D", "", text):
        # libphonenumber drops digits it reads as a national prefix: refuse rather than change the number.
        raise Invalid(field, "e164", "is not in international form (digits would be dropped)", value)
    return normalized


def _no_leading_zero_octets(address: str) -> bool:
    # Python >= 3.9.5 refuses them already; older ones read '010' as 10 where other tools read
    # octal 8, so the same text would allow different hosts in different places.
    dotted = address.rsplit(":", 1)[-1]
    return "." not in dotted or not any(len(o) > 1 and o[0] == "0" for o in dotted.split("."))


def cidr(value: object, field: str) -> str:
    text = _text(value, field)
    address, slash, length = text.partition("/")
    # Only a plain decimal prefix length: netmask forms and zone ids ('%eth0') mean nothing in a
    # policy and would only make two spellings of one rule.
    if (slash and not re.fullmatch(r"0|[1-9][0-9]{0,2}", length)) or "%" in address:
        raise Invalid(field, "cidr", "must be an address or address/prefix-length", value)
    if not _no_leading_zero_octets(address):
        raise Invalid(field, "cidr", "IPv4 octets may not have leading zeros", value)
    try:
        return str(ipaddress.ip_network(text, strict=True))
    except ValueError as exc:
        detail = "has host bits set" if "host bits" in str(exc) else "is not an IPv4/IPv6 network"
        raise Invalid(field, "cidr", detail, value) from None


def twilio_account_sid(value: object, field: str = "sid") -> str:
    text = _text(value, field)
    if not re.fullmatch(r"AC[0-9a-f]{32}", text):
        raise Invalid(field, "twilio_sid", "must be 'AC' followed by 32 lowercase hex digits", value)
    return text


_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


def hostname(value: object, field: str, *, rule: str = "hostname", dotted: bool = False) -> str:
    """An RFC 1123 host name, lowercased; `dotted` requires at least two labels."""
    text = _text(value, field)
    # ASCII first: str.lower() maps some non-ASCII letters to ASCII ones (KELVIN SIGN to 'k').
    if not text.isascii():
        raise Invalid(field, rule, "must be ASCII (write international names as xn--...)", value)
    text = text.lower()
    labels = text.split(".")
    # An all-numeric last label is a mistyped IP address, not a name (RFC 3696 section 2).
    if labels[-1].isdigit():
        raise Invalid(field, rule, "is not a valid IP address (no leading zeros, four octets)", value)
    if len(text) > 253 or not all(map(_LABEL.fullmatch, labels)) or (dotted and len(labels) < 2):
        raise Invalid(field, rule, "must be a host name (letters, digits, '-', dot-separated)", value)
    return text


def _ip_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if "%" in text or not _no_leading_zero_octets(text):
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _host_and_port(text: str, field: str) -> tuple[str, str | None, bool]:
    """Split 'host:port' or '[v6]:port'; the flag says the host was in brackets."""
    if text.startswith("["):
        if not (m := re.fullmatch(r"\[([^\]]*)\](?::([^:]*))?", text)):
            raise Invalid(field, "sip_address", "an IPv6 address goes in [] before ':port'", text)
        return m.group(1), m.group(2), True
    host, colon, port = text.partition(":")
    return host, port if colon else None, False


def sip_address(value: object, field: str) -> str:
    """host, IPv4 or IPv6, optional :port; no scheme, user or params.

    An IPv6 address needs [] before a port: a bare '2001:db8::1:5060' is read as an address.
    """
    text = _text(value, field)
    if re.match(r"(?i)sips?:", text):
        raise Invalid(field, "sip_address", "must not start with 'sip:' or 'sips:'", value)
    if not text or re.search(r"[\s@;?<>\"/]", text):
        raise Invalid(field, "sip_address", "must be host[:port], without user@, params or spaces", value)
    if ip := _ip_address(text):  # a bare IPv6 address: colons, but no port
        return str(ip)
    host, port, bracketed = _host_and_port(text, field)
    if port is not None and (not re.fullmatch(r"[1-9][0-9]{0,4}", port) or int(port) > 65535):
        raise Invalid(field, "sip_address", "port must be 1-65535", value)
    ip = _ip_address(host)
    if bracketed != (ip is not None and ip.version == 6):
        raise Invalid(field, "sip_address", "brackets hold an IPv6 address, and only that", value)
    if ip is not None:
        host = f"[{ip}]" if bracketed else str(ip)
    else:
        host = hostname(host, field, rule="sip_address")
    return host if port is None else f"{host}:{port}"


def hhmm(value: object, field: str) -> str:
    text = _text(value, field)
    if not re.fullmatch(r"([01][0-9]|2[0-3]):[0-5][0-9]", text):
        raise Invalid(field, "hhmm", "must be a 24-hour time HH:MM, 00:00 to 23:59", value)
    return text


# Present in the tz database on disk but not a place: 'localtime' differs per machine.
_NOT_A_PLACE = frozenset({"localtime", "Factory", "posixrules", "posix", "right"})


@lru_cache(maxsize=1)
def _zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones()) - _NOT_A_PLACE


def timezone(value: object, field: str) -> str:
    # Membership in the list, not just ZoneInfo(name): on a case-insensitive disk
    # 'europe/warsaw' would load here and fail on the next machine.
    text = _text(value, field)
    if text not in _zones():
        raise Invalid(field, "timezone", "must be an IANA time zone name, e.g. 'Europe/Warsaw'", value)
    return text


def prefix(value: object, field: str) -> str:
    text = _text(value, field)
    if not re.fullmatch(r"\+[0-9]{1,15}", text):
        raise Invalid(field, "prefix", "must be '+' followed by 1 to 15 digits", value)
    return text


def url(value: object, field: str) -> str:
    """An http(s) URL with a host. The value is never quoted back: webhook URLs carry tokens."""
    text = _text(value, field)
    if len(text) > 2048 or re.search(r"[\s\x00-\x1f\x7f]", text):
        raise Invalid(field, "url", "must be at most 2048 characters, without spaces")
    try:
        parts = urlsplit(text)
    except ValueError:  # e.g. an unclosed '[' of an IPv6 host
        raise Invalid(field, "url", "is not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Invalid(field, "url", "must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        # Credentials in the URL would end up in events and logs.
        raise Invalid(field, "url", "must not contain user:password@")
    try:
        parts.port
    except ValueError:
        raise Invalid(field, "url", "port must be 1-65535") from None
    if parts.port == 0 or not (_ip_address(parts.hostname) or _is_hostname(parts.hostname)):
        raise Invalid(field, "url", "must have a valid host and port")
    return text


def _is_hostname(text: str) -> bool:
    try:
        hostname(text, "")
    except Invalid:
        return False
    return True


_LOCAL_PART = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")


def email(value: object, field: str) -> str:
    """local@domain.tld, ASCII, no DNS: enough to catch typos in an alert address."""
    text = _text(value, field)
    local, at, domain = text.rpartition("@")
    if len(text) > 254 or not at or len(local) > 64 or not _LOCAL_PART.fullmatch(local):
        raise Invalid(field, "email", "must be an address like name@example.com", value)
    try:
        return f"{local}@{hostname(domain, field, dotted=True)}"
    except Invalid:
        raise Invalid(field, "email", "must be an address like name@example.com", value) from None


def _count(value: object, field: str, *, minimum: int) -> int:
    # msgspec checks Meta(ge/gt) only when decoding; a Struct built in code skips it.
    rule = "positive" if minimum else "non_negative"
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise Invalid(field, rule, f"must be an integer >= {minimum}", value)
    return value


def _one_of(value: object, field: str, choices: tuple[object, ...]) -> object:
    if value not in choices:
        names = ", ".join(str(c) for c in choices if c is not None)
        raise Invalid(field, "enum", f"must be one of {names}", value)
    return value


def _each(items: tuple[str, ...], path: str, check: Callable[[object, str], str]) -> tuple[str, ...]:
    """Checks items[i] as "path[i]"; normalized, with duplicates dropped in order."""
    return tuple(dict.fromkeys(check(item, f"{path}[{i}]") for i, item in enumerate(items)))


# -- composite values --------------------------------------------------------------

_MEDIA_ENCRYPTION = ("disabled", "allowed", "required")


def policy(p: SecurityPolicy) -> SecurityPolicy:
    """Every field of a SecurityPolicy checked; returns a normalized copy."""
    _one_of(p.media_encryption, "policy.media_encryption", (None, *_MEDIA_ENCRYPTION))
    for name in ("max_concurrent_calls", "max_calls_per_hour", "max_calls_per_day"):
        if (limit := getattr(p, name)) is not None:
            _count(limit, f"policy.{name}", minimum=0)
    hours = p.hours
    if hours is not None:
        hours = msgspec.structs.replace(
            hours,
            start=hhmm(hours.start, "policy.hours.start"),
            end=hhmm(hours.end, "policy.hours.end"),
            timezone=timezone(hours.timezone, "policy.hours.timezone"),
        )
    alert = p.fraud_alert
    if alert is not None:
        alert = msgspec.structs.replace(
            alert,
            calls=_count(alert.calls, "policy.fraud_alert.calls", minimum=1),
            window_minutes=_count(alert.window_minutes, "policy.fraud_alert.window_minutes", minimum=1),
            email=None if alert.email is None else email(alert.email, "policy.fraud_alert.email"),
            webhook_url=None
            if alert.webhook_url is None
            else url(alert.webhook_url, "policy.fraud_alert.webhook_url"),
        )
    return msgspec.structs.replace(
        p,
        allowed_cidrs=_each(p.allowed_cidrs, "policy.allowed_cidrs", cidr),
        allowed_prefixes=_each(p.allowed_prefixes, "policy.allowed_prefixes", prefix),
        blocked_prefixes=_each(p.blocked_prefixes, "policy.blocked_prefixes", prefix),
        hours=hours,
        fraud_alert=alert,
    )


# RFC 3261 section 25.1: a header name is a token.
_SIP_TOKEN = re.compile(r"[A-Za-z0-9.!%*_+`'~-]+")
# Headers our SIP stack writes itself (long and compact forms); a trunk may not override them.
RESERVED_HEADERS = frozenset(
    h.lower()
    for h in (
        "Via", "v", "From", "f", "To", "t", "Call-ID", "i", "CSeq", "Contact", "m",
        "Max-Forwards", "Content-Length", "l", "Content-Type", "c", "Route", "Record-Route",
        "Authorization", "Proxy-Authorization",
    )
)  # fmt: skip


def _headers(headers: dict[str, str], field: str) -> dict[str, str]:
    seen: set[str] = set()
    for name, header_value in headers.items():
        where = f"{field}[{name}]"
        if not isinstance(name, str) or not _SIP_TOKEN.fullmatch(name):
            detail = "header names must be SIP tokens (letters, digits, -.!%*_+`'~)"
            raise Invalid(field, "sip_header", detail, name)
        if name.lower() in RESERVED_HEADERS:
            raise Invalid(where, "reserved_header", "is set by callplane and cannot be overridden")
        if name.lower() in seen:
            raise Invalid(where, "duplicate_header", "appears twice (SIP header names ignore case)")
        seen.add(name.lower())
        # Values may be API keys: never quoted back. CR/LF would inject extra headers.
        if not isinstance(header_value, str) or re.search(r"[\x00-\x08\x0a-\x1f\x7f]", header_value):
            raise Invalid(where, "header_value", "must be text on one line")
    return dict(headers)


def _credentials(username: str | None, secret_ref: str | None, field: str) -> None:
    if username is not None and not re.fullmatch(r"[^\s\x00-\x1f\x7f]{1,128}", username):
        raise Invalid(f"{field}.username", "username", "must be 1-128 characters without spaces")
    if secret_ref is not None and not re.fullmatch(r"sec_[A-Za-z0-9_-]{1,64}", secret_ref):
        raise Invalid(f"{field}.secret_ref", "secret_ref", "must be a reference like 'sec_...'")


def outbound_trunk(t: OutboundTrunk) -> OutboundTrunk:
    _one_of(t.transport, "outbound_trunk.transport", ("auto", "udp", "tcp", "tls"))
    _one_of(t.media_encryption, "outbound_trunk.media_encryption", _MEDIA_ENCRYPTION)
    _credentials(t.username, t.secret_ref, "outbound_trunk")
    return msgspec.structs.replace(
        t,
        address=sip_address(t.address, "outbound_trunk.address"),
        headers=_headers(t.headers, "outbound_trunk.headers"),
    )


def inbound_trunk(t: InboundTrunk) -> InboundTrunk:
    field = "inbound_trunk"
    _credentials(t.username, t.secret_ref, field)
    return msgspec.structs.replace(
        t,
        # A bare address is a one-host network, so both kinds share the CIDR rules.
        allowed_addresses=_each(t.allowed_addresses, f"{field}.allowed_addresses", cidr),
        allowed_numbers=_each(t.allowed_numbers, f"{field}.allowed_numbers", e164),
        remote_domains=_each(t.remote_domains, f"{field}.remote_domains", hostname),
    )


MAX_LABEL = 200


def label(value: object, field: str = "label") -> str:
    """A human label: printable text, at most MAX_LABEL characters, trimmed."""
    text = _text(value, field).strip()
    if len(text) > MAX_LABEL:
        raise Invalid(field, "max_length", f"must be at most {MAX_LABEL} characters")
    if any(not ch.isprintable() for ch in text):
        raise Invalid(field, "printable", "must not contain control characters")
    return text


MAX_SECRET = 512


def secret_text(value: object, field: str) -> str:
    """A secret (auth token, password): present and of sane size. Never quoted back."""
    text = _text(value, field)
    if not text or len(text) > MAX_SECRET:
        raise Invalid(field, "secret_length", f"must be 1 to {MAX_SECRET} characters")
    return text


def webhook_secret(value: object, field: str) -> str:
    """A Standard Webhooks signing secret: 'whsec_' and base64 of at least 24 bytes."""
    text = secret_text(value, field)
    try:
        key = base64.b64decode(text.removeprefix("whsec_"), validate=True)
    except ValueError:
        raise Invalid(field, "webhook_secret", "must be 'whsec_' followed by base64") from None
    if len(key) < 24:
        raise Invalid(field, "webhook_secret", "must hold at least 24 bytes of key")
    return text
