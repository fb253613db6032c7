"""Provisioner admin HTTP API under /v1: JSON requests in, commands to the Provisioner, Replies out.

Shaped like the phone-number APIs of ElevenLabs and Twilio. This module only translates: a
request body becomes a command, a `Reply` becomes a status and a body. Every rule about numbers,
policies and accounts lives in `core` and `validation`.

Decisions:
- Unknown JSON fields are ignored, at every depth, as everywhere on the callplane wire (and as
  in the ElevenLabs API); they are never stored or echoed.
- Status codes: malformed JSON 400, missing or wrong admin token 401, no such number, account
  or route 404, wrong method 405 (with `Allow`), conflict and quota_exceeded 409 (the request
  is well formed but the state of the account or number refuses it; 403 would read as an auth
  failure), body over 64 KiB 413, invalid input 422, NATS unreachable 503.
  Nothing else returns 5xx; an unexpected failure is a JSON 500 with code "internal".
- Every error body is `{"code", "message", "field"?, "rule"?}`; `field` names the request field
  at fault in the request's own terms ("phone_number", "sid", "allowed_cidrs[0]").
- Secrets (Twilio token, SIP passwords) never come back: responses carry hints of the last four
  characters at most. Error messages and logged tracebacks are scrubbed, too, of every value the
  request held under a secret-looking key (token, password, credentials, headers, ...), so an
  echo of input (msgspec quotes a bad enum value) cannot carry one out.
- Unknown query parameters are ignored; `force` must be true or false.
- A policy has an ETag, its policy_version: PUT it with `If-Match: "<version>"` to be refused
  (412) if someone changed it since you read it.
- If ADMIN_TOKEN is set, every /v1 route wants `Authorization: Bearer <token>`;
  /openapi.json and /healthz stay open.
"""

from __future__ import annotations

import hmac
import re
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
import nats.errors
import structlog
from msgspec import UNSET, Meta, Struct, UnsetType
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from schemas import Reply, SecurityPolicy
from schemas.commands import (
    PreCallWebhookConfig,
    AccountView,
    ConfigureAccount,
    CreditAccount,
    GetAccount,
    GetNumber,
    InboundTrunkConfig,
    ListNumbers,
    NumberView,
    OutboundTrunkConfig,
    RegisterNumber,
    SetPolicy,
    SyncNumber,
    TwilioCredentials,
    UnregisterNumber,
    UpdateNumber,
)
from schemas.events import NonNegative, Positive, Token

from .config import ProvisionerSettings
from .core import SIP_URI_TEMPLATE, Accepted, decide
from callplane.secrets import mask

if TYPE_CHECKING:
    from .app import Provisioner

log = structlog.get_logger()

MAX_BODY = 64 * 1024  # bytes; a number's whole configuration is a few hundred
JSON = "application/json"

# -- request bodies -----------------------------------------------------------------

AgentId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="the agent answering the number's calls")]


class CreatePhoneNumber(Struct, kw_only=True):
    """Import a number: from Twilio (`sid` and `token`) or as a SIP trunk (`outbound_trunk`, `inbound_trunk`)."""

    phone_number: Annotated[str, Meta(description="E.164, e.g. +48123456789")]
    account_id: Token
    provider: Literal["twilio", "sip_trunk"]
    label: str = ""
    sid: Annotated[str | None, Meta(description="Twilio account SID: AC + 32 hex digits")] = None
    token: Annotated[str | None, Meta(description="Twilio auth token: stored encrypted, never shown")] = None
    outbound_trunk: OutboundTrunkConfig | None = None
    inbound_trunk: InboundTrunkConfig | None = None


class UpdatePhoneNumber(Struct, kw_only=True):
    """A field left out stays as it is; `agent_id: null` unassigns the number."""

    label: str | UnsetType = UNSET
    agent_id: AgentId | None | UnsetType = UNSET
    assignment_type: Literal["agent", "softphone"] | UnsetType = UNSET


class SyncPhoneNumber(Struct, kw_only=True):
    """New provider configuration; what is left out is kept. Uses no quota."""

    sid: str | None = None
    token: str | None = None
    outbound_trunk: OutboundTrunkConfig | None = None
    inbound_trunk: InboundTrunkConfig | None = None






class AccountSettings(Struct, kw_only=True):
    """An account's prices and caps (PUT replaces them all: left out means the default)."""

    rate_millicredits_per_minute: NonNegative = 30_000
    text_price_millicredits: NonNegative = 0
    daily_voice_cap_s: NonNegative | None = None
    per_call_max_s: Positive | None = None
    timezone: Annotated[str, Meta(description="IANA time zone, e.g. Europe/Warsaw")] = "UTC"
    allowed_high_risk_prefixes: Annotated[
        tuple[str, ...], Meta(description="outbound premium / revenue-share prefixes this account may call")
    ] = ()
    pre_call_webhook: PreCallWebhookConfig | None = None


class Credit(Struct, kw_only=True):
    amount_millicredits: Positive
    reference: Annotated[str, Meta(min_length=1, max_length=200, description="idempotency key: credits once")]


# -- response bodies ----------------------------------------------------------------


class PhoneNumberList(Struct, kw_only=True):
    phone_numbers: list[NumberView]


class PolicyView(Struct, kw_only=True):
    policy: SecurityPolicy
    policy_version: int


class Usage(Struct, kw_only=True):
    assignment_type: Literal["agent", "softphone"] | None
    agent_id: str | None
    deletable: bool  # true if DELETE without force would succeed now


class SipUriTemplate(Struct, kw_only=True):
    template: str


class CreditReceipt(Struct, kw_only=True):
    account_id: str
    reference: str
    amount_millicredits: int
    duplicate: bool  # the reference was applied before: nothing was credited this time
    account: AccountView | None = None  # null until the account is configured


class Health(Struct, kw_only=True):
    status: Literal["ok"]


class ErrorBody(Struct, kw_only=True, omit_defaults=True):
    # Stable: malformed, invalid, unauthorized, not_found, method_not_allowed, conflict,
    # quota_exceeded, too_large, unavailable, internal.
    code: str
    message: str
    field: str | None = None
    rule: str | None = None


# -- errors -------------------------------------------------------------------------

STATUS_OF_CODE = {"invalid": 422, "not_found": 404, "conflict": 409, "quota_exceeded": 409, "unauthorized": 401}
STALE = "stale"  # the rule of a conflict with the version in If-Match: 412 Precondition Failed


class ApiError(Exception):
    def __init__(self, status: int, body: ErrorBody, headers: dict[str, str] | None = None) -> None:
        super().__init__(body.code)
        self.status, self.body, self.headers = status, body, headers


def refused(reply: Reply, names: dict[str, str]) -> ApiError:
    """A refusal from the provisioner, in the request's own field names."""
    status = 412 if reply.rule == STALE else STATUS_OF_CODE.get(reply.code or "")
    if status is None:
        raise RuntimeError(f"the provisioner answered with an unknown code {reply.code!r}")
    field, message = reply.field, reply.message or reply.code or ""
    if field is not None:
        renamed = rename(field, names)
        if message.startswith(f"{field}:"):
            message = f"{renamed or 'body'}:{message[len(field) + 1 :]}"
        field = renamed
    for old, new in names.items():
        if "." in old:  # a command path quoted inside the message
            message = message.replace(old, new)
    return ApiError(status, ErrorBody(code=reply.code or "", message=message, field=field, rule=reply.rule))


def rename(field: str, names: dict[str, str]) -> str | None:
    """'twilio.account_sid' -> 'sid'; 'policy.hours.start' -> 'hours.start' with {'policy': ''}."""
    for old, new in names.items():
        if field == old:
            return new or None
        if field.startswith((f"{old}.", f"{old}[")):
            rest = field[len(old) :]
            return new + rest if new else rest.lstrip(".")
    return field


def schema_error(exc: msgspec.ValidationError) -> ApiError:
    """msgspec says '... - at `$.outbound_trunk.transport`': that path is the field."""
    text = str(exc)
    found = re.search(r" - at `\$\.?(.*)`$", text)
    return ApiError(422, ErrorBody(code="invalid", message=text, field=(found.group(1) or None) if found else None, rule="schema"))


# Keys whose values are secrets; every value under `credentials` and `headers` counts too.
_SECRET_KEY = re.compile(r"token|password|passwd|secret|credential|auth|key|headers", re.IGNORECASE)
_MIN_SCRUBBED = 4  # a shorter "secret" would turn ordinary words of a message into masks


def secret_values(value: object, *, inside: bool = False) -> set[str]:
    """Every string under a secret-looking key of a decoded JSON document."""
    found: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            found |= secret_values(item, inside=inside or bool(_SECRET_KEY.search(str(key))))
    elif isinstance(value, list):
        for item in value:
            found |= secret_values(item, inside=inside)
    elif inside and isinstance(value, str) and len(value) >= _MIN_SCRUBBED:
        found.add(value)
    return found


def scrub(text: str, secrets: set[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, mask(secret))
    return text


# -- the operations -----------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    name: str
    where: Literal["path", "query", "header"]
    schema: dict[str, Any]
    description: str = ""


@dataclass(frozen=True)
class Operation:
    """One route: what it takes, what it answers, and every status it can answer with."""

    method: str
    path: str
    handler: Callable[[Request], Awaitable[Response]]
    summary: str
    status: int
    returns: type | None
    errors: tuple[int, ...] = ()
    body: type | None = None
    body_required: bool = True
    params: tuple[Param, ...] = ()  # query and header parameters
    protected: bool = True  # wants the admin token, if one is set
    headers: tuple[str, ...] = ()  # response headers of the success status


NUMBER_ID = Param("phone_number_id", "path", {"type": "string", "minLength": 1}, "pn_...")
ACCOUNT_ID = Param("account_id", "path", {"type": "string", "minLength": 1})
PATH_PARAMS = {p.name: p for p in (NUMBER_ID, ACCOUNT_ID)}
BY_ID_NAMES = {"number": "phone_number_id"}
IF_MATCH = Param("If-Match", "header", {"type": "string"}, 'the ETag of the policy you read, e.g. "3"')


def twilio_names(sid: str | None, token: str | None) -> dict[str, str]:
    """The command's `twilio` credentials are the request's `sid` and `token`."""
    whole = "token" if sid is None and token is not None else "sid"
    return {"twilio.account_sid": "sid", "twilio.auth_token": "token", "twilio": whole}


def json_response(status: int, value: object, headers: dict[str, str] | None = None) -> Response:
    return Response(msgspec.json.encode(value), status_code=status, media_type=JSON, headers=headers)


def twilio(sid: str | None, token: str | None) -> TwilioCredentials | None:
    if sid is None and token is None:
        return None
    return TwilioCredentials(account_sid=sid or "", auth_token=token or "")


def policy_response(view: NumberView) -> Response:
    body = PolicyView(policy=view.policy, policy_version=view.policy_version)
    return json_response(200, body, {"ETag": f'"{view.policy_version}"'})


def expected_version(request: Request) -> int | None:
    """If-Match: '"3"' (or 3) expects policy_version 3; absent or '*' expects nothing."""
    value = request.headers.get("if-match", "*").strip()
    if value == "*":
        return None
    if not re.fullmatch(r'"?[0-9]{1,18}"?', value) or value.count('"') == 1:
        message = 'If-Match: must be the ETag of the policy, e.g. "3"'
        raise ApiError(422, ErrorBody(code="invalid", message=message, field="If-Match", rule="etag"))
    return int(value.strip('"'))


def query_flag(request: Request, name: str) -> bool:
    value = request.query_params.get(name, "false").lower()
    if value not in ("true", "false", "1", "0"):
        raise ApiError(422, ErrorBody(code="invalid", message=f"{name}: must be true or false", field=name, rule="boolean"))
    return value in ("true", "1")


async def read_body(request: Request, kind: type, *, required: bool = True):  # noqa: ANN201
    """Decode the body into `kind`; the request's secrets are noted for scrubbing first."""
    data = b""
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY:
            raise ApiError(413, ErrorBody(code="too_large", message=f"the body is over {MAX_BODY} bytes", rule="max_body"))
    if not data.strip() and not required:
        data = b"{}"
    try:
        request.state.secrets = secret_values(msgspec.json.decode(data))
    except msgspec.DecodeError:
        message = "the body is not valid JSON" if data.strip() else "a JSON body is required"
        raise ApiError(400, ErrorBody(code="malformed", message=message, rule="json")) from None
    try:
        return msgspec.json.decode(data, type=kind)
    except msgspec.ValidationError as exc:
        raise schema_error(exc) from None


def command(cls: type, **fields: object):  # noqa: ANN201
    """A command built with its type's constraints checked (a Struct built in code skips them)."""
    try:
        return msgspec.convert(fields, type=cls)
    except msgspec.ValidationError as exc:
        raise schema_error(exc) from None


class AdminApi:
    def __init__(self, provisioner: Provisioner, settings: ProvisionerSettings) -> None:
        self.provisioner = provisioner
        self.settings = settings

    async def ask(self, cmd: object, names: dict[str, str] | None = None) -> Reply:
        reply = await self.provisioner.handle(cmd)
        if not reply.ok:
            raise refused(reply, names or {})
        return reply

    async def number_of(self, request: Request) -> NumberView:
        reply = await self.ask(GetNumber(number_id=request.path_params["phone_number_id"]), {"number_id": "phone_number_id"})
        assert reply.number is not None
        return reply.number

    # -- numbers --

    async def create_number(self, request: Request) -> Response:
        body: CreatePhoneNumber = await read_body(request, CreatePhoneNumber)
        cmd = RegisterNumber(
            number=body.phone_number,
            account_id=body.account_id,
            provider=body.provider,
            label=body.label,
            twilio=twilio(body.sid, body.token),
            outbound_trunk=body.outbound_trunk,
            inbound_trunk=body.inbound_trunk,
        )
        names = {"number": "phone_number", **twilio_names(body.sid, body.token)}
        view = (await self.ask(cmd, names)).number
        assert view is not None
        return json_response(201, view, {"Location": f"/v1/phone-numbers/{view.phone_number_id}"})

    async def list_numbers(self, request: Request) -> Response:
        reply = await self.ask(ListNumbers(account_id=request.query_params.get("account_id")))
        return json_response(200, PhoneNumberList(phone_numbers=reply.numbers or []))

    async def get_number(self, request: Request) -> Response:
        return json_response(200, await self.number_of(request))

    async def update_number(self, request: Request) -> Response:
        body: UpdatePhoneNumber = await read_body(request, UpdatePhoneNumber)
        view = await self.number_of(request)
        assignment_type = "agent" if body.assignment_type is UNSET else body.assignment_type
        cmd = UpdateNumber(number=view.phone_number, label=body.label, agent_id=body.agent_id, assignment_type=assignment_type)
        return json_response(200, (await self.ask(cmd, BY_ID_NAMES)).number)

    async def get_policy(self, request: Request) -> Response:
        view = await self.number_of(request)
        return policy_response(view)

    async def put_policy(self, request: Request) -> Response:
        policy: SecurityPolicy = await read_body(request, SecurityPolicy)
        expected = expected_version(request)
        view = await self.number_of(request)
        cmd = SetPolicy(number=view.phone_number, policy=policy, expected_policy_version=expected)
        names = {**BY_ID_NAMES, "policy": "", "expected_policy_version": "If-Match"}
        view = (await self.ask(cmd, names)).number
        assert view is not None
        return policy_response(view)

    async def usage(self, request: Request) -> Response:
        view = await self.number_of(request)
        # Deletable is the core's answer to an unforced delete, asked without writing anything.
        dry_run = decide(
            self.provisioner.registry,
            UnregisterNumber(number=view.phone_number),
            now=datetime.now(UTC),
            new_id=lambda prefix: f"{prefix}_dry_run",
            rules=self.provisioner.rules,
        )
        usage = Usage(assignment_type=view.assignment_type, agent_id=view.agent_id, deletable=isinstance(dry_run, Accepted))
        return json_response(200, usage)

    async def delete_number(self, request: Request) -> Response:
        force = query_flag(request, "force")
        view = await self.number_of(request)
        await self.ask(UnregisterNumber(number=view.phone_number, force=force), BY_ID_NAMES)
        return Response(status_code=204)

    async def sync_number(self, request: Request) -> Response:
        body: SyncPhoneNumber = await read_body(request, SyncPhoneNumber, required=False)
        view = await self.number_of(request)
        cmd = SyncNumber(
            number=view.phone_number,
            twilio=twilio(body.sid, body.token),
            outbound_trunk=body.outbound_trunk,
            inbound_trunk=body.inbound_trunk,
        )
        names = {**BY_ID_NAMES, **twilio_names(body.sid, body.token)}
        return json_response(200, (await self.ask(cmd, names)).number)

    async def sip_uri_template(self, request: Request) -> Response:
        return json_response(200, SipUriTemplate(template=SIP_URI_TEMPLATE.format(domain=self.settings.sip_domain)))

    # -- accounts --

    async def configure_account(self, request: Request) -> Response:
        body: AccountSettings = await read_body(request, AccountSettings)
        cmd = command(ConfigureAccount, account_id=request.path_params["account_id"], **msgspec.structs.asdict(body))
        return json_response(200, (await self.ask(cmd)).account)

    async def get_account(self, request: Request) -> Response:
        return json_response(200, (await self.ask(GetAccount(account_id=request.path_params["account_id"]))).account)

    async def credit_account(self, request: Request) -> Response:
        body: Credit = await read_body(request, Credit)
        account_id = request.path_params["account_id"]
        cmd = command(CreditAccount, account_id=account_id, **msgspec.structs.asdict(body))
        reply = await self.ask(cmd)
        duplicate = not reply.event_ids
        receipt = CreditReceipt(
            account_id=account_id,
            reference=body.reference,
            amount_millicredits=body.amount_millicredits,
            duplicate=duplicate,
            account=reply.account,
        )
        return json_response(200 if duplicate else 201, receipt)

    # -- open --

    async def health(self, request: Request) -> Response:
        return json_response(200, Health(status="ok"))

    def operations(self) -> list[Operation]:
        n, a = "/v1/phone-numbers", "/v1/accounts/{account_id}"
        by_id = f"{n}/{{phone_number_id}}"
        body_errors = (400, 413, 422)
        return [
            Operation("POST", n, self.create_number, "Import (register) a number", 201, NumberView,
                      (*body_errors, 409), CreatePhoneNumber, headers=("Location",)),
            Operation("GET", n, self.list_numbers, "List numbers", 200, PhoneNumberList,
                      params=(Param("account_id", "query", {"type": "string"}, "only this account's numbers"),)),
            Operation("GET", by_id, self.get_number, "Get a number", 200, NumberView, (404,)),
            Operation("PATCH", by_id, self.update_number, "Update the label or the agent (agent_id null unassigns)",
                      200, NumberView, (*body_errors, 404, 409), UpdatePhoneNumber),
            Operation("DELETE", by_id, self.delete_number, "Delete a number (409 while assigned, unless force=true)",
                      204, None, (404, 409, 422),
                      params=(Param("force", "query", {"type": "boolean"}, "delete even while assigned"),)),
            Operation("GET", f"{by_id}/security-policy", self.get_policy, "Get the security policy (ETag: its version)",
                      200, PolicyView, (404,), headers=("ETag",)),
            Operation("PUT", f"{by_id}/security-policy", self.put_policy,
                      "Replace the security policy (If-Match: only if still at that version)",
                      200, PolicyView, (*body_errors, 404, 409, 412), SecurityPolicy, params=(IF_MATCH,), headers=("ETag",)),
            Operation("GET", f"{by_id}/usage", self.usage, "Who uses the number; can it be deleted", 200, Usage, (404,)),
            Operation("POST", f"{by_id}/sync", self.sync_number, "Refresh the provider configuration (no quota)",
                      200, NumberView, (*body_errors, 404, 409), SyncPhoneNumber, body_required=False),
            Operation("GET", "/v1/sip-uri-template", self.sip_uri_template, "The SIP URI numbers get", 200, SipUriTemplate),
            Operation("PUT", a, self.configure_account, "Configure an account", 200, AccountView, body_errors, AccountSettings),
            Operation("GET", a, self.get_account, "Get an account", 200, AccountView, (404,)),
            Operation("POST", f"{a}/credits", self.credit_account,
                      "Credit an account (201; 200 if the reference was applied before)", 201, CreditReceipt,
                      body_errors, Credit),
            Operation("GET", "/healthz", self.health, "Liveness", 200, Health, protected=False),
        ]  # fmt: skip

    # -- serving --

    async def serve(self, operation: Operation, request: Request) -> Response:
        """Run one operation: auth, errors as JSON, secrets scrubbed, one log line."""
        started = time.perf_counter()
        request.state.secrets = set()
        code = None
        try:
            if operation.protected:
                self.authorize(request)
            response = await operation.handler(request)
        except ApiError as error:
            code, secrets = error.body.code, request.state.secrets
            body = msgspec.structs.replace(
                error.body,
                message=scrub(error.body.message, secrets),
                field=None if error.body.field is None else scrub(error.body.field, secrets),
            )
            response = json_response(error.status, body, error.headers)
        except (nats.errors.Error, TimeoutError) as exc:
            code = "unavailable"
            log.error("http_unavailable", route=operation.path, error=type(exc).__name__)
            response = json_response(503, ErrorBody(code=code, message="the message broker is unreachable: retry"))
        except Exception:
            code = "internal"
            log.error("http_failed", route=operation.path, traceback=scrub(traceback.format_exc(), request.state.secrets))
            response = json_response(500, ErrorBody(code=code, message="an internal error: it has been logged"))
        log.info(
            "http_request",
            method=request.method,
            route=operation.path,
            status=response.status_code,
            code=code,
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return response

    def authorize(self, request: Request) -> None:
        token = self.settings.admin_token
        if not token:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise ApiError(
                401,
                ErrorBody(code="unauthorized", message="this API wants `Authorization: Bearer <admin token>`"),
                {"WWW-Authenticate": "Bearer"},
            )


# -- OpenAPI ------------------------------------------------------------------------

ERROR_MEANINGS = {
    400: "malformed JSON",
    401: "missing or wrong admin token",
    404: "no such resource",
    405: "method not allowed",
    409: "conflicts with the current state (already registered, assigned, quota exceeded)",
    412: "If-Match names another version than the current one",
    413: "body too large",
    422: "invalid input: `field` and `rule` say which and why",
    503: "the message broker is unreachable: retry",
}
_REF = "#/components/schemas/{name}"


def openapi(operations: list[Operation], settings: ProvisionerSettings) -> dict[str, Any]:
    """OpenAPI 3.1 from the route table; bodies are the msgspec JSON schemas of the Structs."""
    kinds = sorted({k for op in operations for k in (op.body, op.returns) if k} | {ErrorBody}, key=lambda k: k.__name__)
    refs, components = msgspec.json.schema_components(kinds, ref_template=_REF)
    ref = dict(zip(kinds, refs, strict=True))
    secured = bool(settings.admin_token)
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        path_params = [PATH_PARAMS[name] for name in re.findall(r"{(\w+)}", op.path)]
        item: dict[str, Any] = {"summary": op.summary, "operationId": op.handler.__name__}
        params = [*path_params, *op.params]
        if params:
            item["parameters"] = [
                {"name": p.name, "in": p.where, "required": p.where == "path", "schema": p.schema}
                | ({"description": p.description} if p.description else {})
                for p in params
            ]
        if op.body is not None:
            item["requestBody"] = {"required": op.body_required, "content": {JSON: {"schema": ref[op.body]}}}
        ok: dict[str, Any] = {"description": "no content" if op.returns is None else "OK"}
        if op.returns is not None:
            ok["content"] = {JSON: {"schema": ref[op.returns]}}
        if op.headers:
            ok["headers"] = {h: {"schema": {"type": "string"}, "required": True} for h in op.headers}
        responses: dict[str, Any] = {str(op.status): ok}
        if op.returns is CreditReceipt:
            responses["200"] = {"description": "the reference was applied before", "content": {JSON: {"schema": ref[CreditReceipt]}}}
        errors = set(op.errors) | {405} | ({404} if path_params else set()) | ({401} if op.protected else set())
        if op.method != "GET":  # a write goes through NATS; reads are answered from memory
            errors.add(503)
        for status in sorted(errors):
            responses[str(status)] = {"description": ERROR_MEANINGS[status], "content": {JSON: {"schema": ref[ErrorBody]}}}
        item["responses"] = responses
        if op.protected and secured:
            item["security"] = [{"bearer": []}]
        paths.setdefault(op.path, {})[op.method.lower()] = item
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "callplane provisioner admin API",
            "version": "1",
            "description": "Phone numbers, security policies and accounts. Unknown JSON fields are ignored.",
        },
        "paths": paths,
        "components": {"schemas": components},
    }
    if secured:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return document


# -- the app ------------------------------------------------------------------------


def build_app(provisioner: Provisioner, settings: ProvisionerSettings) -> Starlette:
    """The admin API of a started Provisioner, as an ASGI app."""
    api = AdminApi(provisioner, settings)
    operations = api.operations()
    document = msgspec.json.encode(openapi(operations, settings))

    async def openapi_json(request: Request) -> Response:
        return Response(document, media_type=JSON)

    routes = [Route(path, endpoint, methods=methods) for path, endpoint, methods in _grouped(api, operations)]
    routes.append(Route("/openapi.json", openapi_json, methods=["GET"]))
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error, Exception: _internal_error})
    app.router.redirect_slashes = False  # '/v1/phone-numbers/' is an unknown path, not a 307
    return app


def _grouped(api: AdminApi, operations: list[Operation]) -> Iterator[tuple[str, Callable, list[str]]]:
    """One Route per path, so a wrong method's 405 lists every allowed method in `Allow`."""
    by_path: dict[str, dict[str, Operation]] = {}
    for op in operations:
        by_path.setdefault(op.path, {})[op.method] = op
    for path, by_method in by_path.items():

        async def endpoint(request: Request, by_method: dict[str, Operation] = by_method) -> Response:
            method = "GET" if request.method == "HEAD" else request.method
            return await api.serve(by_method[method], request)

        yield path, endpoint, list(by_method)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        body = ErrorBody(code="method_not_allowed", message=f"{request.method} is not allowed here")
    elif exc.status_code == 404:
        body = ErrorBody(code="not_found", message="no such route (see /openapi.json)")
    else:
        body = ErrorBody(code=f"http_{exc.status_code}", message=str(exc.detail))
    return json_response(exc.status_code, body, dict(exc.headers or {}))


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("http_failed", route=request.url.path, error=type(exc).__name__)
    return json_response(500, ErrorBody(code="internal", message="an internal error: it has been logged"))
