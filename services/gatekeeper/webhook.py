"""The pre-call webhook (SPEC section 6): before a call is accepted, the gatekeeper may ask the
account's or number's own endpoint for per-call personalization, or whether to decline the call.

    outcome = await call_pre_call_webhook(client, settings, caller_id=..., agent_id=...,
                                          called_number=..., call_id=..., msg_id=..., now=now)
    Proceed(dynamic_variables, conversation_config_override)  -> into call.accepted
    Decline(reason)                                           -> call.rejected webhook_rejected 603
    Failed(reason, fail_closed, kind)                         -> defaults, or reject if fail_closed

The decisions are pure functions (`parse_answer`, `outcome_of`; `sign` and `classify_address`
come from callplane.webhooks); the I/O is thin: one DNS resolution, one POST, a capped read.
`call_pre_call_webhook` never raises for a timeout, a connection error, a bad status, a bad
answer or an unsafe URL: those are all `Failed`, and the caller decides by `fail_closed`.

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
- SSRF and DNS rebinding: the URL is checked and its host resolved once by
  callplane.webhooks (`checked_addresses`, shared with the fraud alert webhook; its docstring
  lists what is refused, even with allow_private), and the request goes to the checked address
  through `make_client`'s pinned transport.
- Failure reasons never quote the URL: webhook URLs often carry tokens.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from typing import Any, Literal, TypeAlias

import httpx
import msgspec

# The generic parts, shared with the fraud alert webhook; names the tests and callers use
# from this module are re-exported.
from callplane.webhooks import (  # noqa: F401
    DEFAULT_TIMEOUT_MS,
    Resolver,
    UnsafeWebhookUrl,
    check_url,
    checked_addresses,
    classify_address,
    decode_secret,
    error_text,
    make_client,
    pinned,
    sign,
    signed_headers,
    system_resolve,
)

MAX_ANSWER_BYTES = 64 * 1024
MAX_REASON_CHARS = 200
ANSWER_TYPE = "conversation_initiation_client_data"  # the ElevenLabs answer's `type`

VariableValue: TypeAlias = str | int | float | bool

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


# -- signing ----------------------------------------------------------------------------


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
    return body, signed_headers(settings.secret, msg_id, now, body)


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
        reason = f"the webhook host does not resolve ({error_text(error)})"
        return Failed(reason=reason, fail_closed=fail_closed, kind="dns")
    try:
        with pinned(host, addresses):
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
        reason = f"the request failed ({error_text(error)})"
        return Failed(reason=reason, fail_closed=fail_closed, kind="connect")


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
