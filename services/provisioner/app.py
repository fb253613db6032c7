"""Provisioner adapter: commands (NATS request/reply, and the HTTP API) in, events out.

A write goes: decide against the read model -> seal the command's secrets into the
SECRETS bucket -> publish the events with optimistic concurrency on the number's
subjects (`Nats-Expected-Last-Subject-Sequence`) -> fold them into the read model.
A concurrent writer makes the publish fail; then the read model catches up and the
command is decided again, so updates apply in order and none is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections import defaultdict
from datetime import UTC, datetime

import msgspec
import nats.js.errors
import structlog
import uvicorn
from faststream.nats import NatsBroker
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from callplane.commands import invalid, serve_commands
from callplane.projection import Projection
from schemas import Reply, decode_command, encode, number_token, subject_for
from schemas.commands import AnyCommand, GetAccount, GetNumber, ListNumbers, RotateSecrets

from . import validation
from .config import ProvisionerSettings
from .core import Accepted, Refusal, Registry, Rules, decide, evolve, secrets_of, view_account, view_number
from callplane.secrets import SealedSecret, SecretBox, SecretError, new_secret_ref, put_sealed

log = structlog.get_logger()

WRONG_LAST_SEQUENCE = 10071  # JetStream's answer to a stale expected sequence
ATTEMPTS = 5


class Conflict(Exception):
    """Someone else wrote the number first."""


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class Provisioner:
    def __init__(self, js: JetStreamContext, settings: ProvisionerSettings) -> None:
        self.js = js
        self.rules = Rules(sip_domain=settings.sip_domain, max_numbers_per_account=settings.max_numbers_per_account)
        self.box = SecretBox.from_keys(settings.callplane_secret_keys) if settings.callplane_secret_keys else None
        self.registry = Registry()
        self.projections = {
            stream: Projection(js, stream, self._fold_from(stream)) for stream in ("NUMBERS", "ACCOUNTS")
        }
        self.secrets: KeyValue | None = None
        self._watch: asyncio.Task | None = None
        # Writes to one number from this instance queue up; only other instances can conflict.
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def _fold_from(self, stream: str):  # noqa: ANN202
        return lambda event: evolve(self.registry, event, sequence=self.projections[stream].position)

    async def start(self) -> None:
        self.secrets = await self.js.key_value("SECRETS")
        watcher = await self.secrets.watchall()
        self._watch = asyncio.create_task(self._follow_hints(watcher))
        for projection in self.projections.values():
            await projection.follow()

    async def stop(self) -> None:
        if self._watch:
            self._watch.cancel()
        for projection in self.projections.values():
            await projection.stop()

    async def _follow_hints(self, watcher) -> None:  # noqa: ANN001
        async for entry in watcher:
            if entry is not None and entry.value:
                with contextlib.suppress(msgspec.DecodeError):
                    self.registry.secret_hints[entry.key] = msgspec.json.decode(entry.value, type=SealedSecret).hint

    # -- commands ------------------------------------------------------------------

    async def handle_bytes(self, data: bytes) -> Reply:
        try:
            command = decode_command(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return invalid(exc)
        return await self.handle(command)

    async def handle(self, command: AnyCommand) -> Reply:
        match command:
            case GetNumber():
                return self.get_number(command)
            case ListNumbers():
                records = sorted(self.registry.numbers.values(), key=lambda r: r.registered.number)
                views = [view_number(self.registry, r) for r in records]
                if command.account_id is not None:
                    views = [v for v in views if v.account_id == command.account_id]
                return Reply(ok=True, numbers=views)
            case RotateSecrets():
                return await self.rotate_secrets()
            case GetAccount():
                account = view_account(self.registry, command.account_id)
                if account is None:
                    return Reply(ok=False, code="not_found", message=f"account {command.account_id} is not configured", field="account_id")
                return Reply(ok=True, account=account)
        async with self._locks[getattr(command, "number", None) or ""]:
            for attempt in range(ATTEMPTS):
                try:
                    return await self._write(command)
                except Conflict:
                    await self.projections["NUMBERS"].catch_up()
                    await asyncio.sleep(random.uniform(0, 0.01 * 2**attempt))  # de-synchronise rivals
        return Reply(ok=False, code="conflict", message="the number changed concurrently, again and again: retry", field="number")

    async def rotate_secrets(self) -> Reply:
        """Re-seal every secret under the first key (compare-and-set per entry)."""
        if self.box is None or self.secrets is None:
            return Reply(ok=False, code="invalid", message="no CALLPLANE_SECRET_KEYS configured", rule="secret_keys")
        try:
            keys = await self.secrets.keys()
        except nats.js.errors.NoKeysError:
            keys = []
        rotated, unreadable = 0, 0
        for key in keys:
            entry = await self.secrets.get(key)
            sealed = msgspec.json.decode(entry.value, type=SealedSecret)
            try:
                fresh = msgspec.structs.replace(sealed, ciphertext=self.box.rotate(sealed.ciphertext))
            except SecretError:
                unreadable += 1
                continue
            await self.secrets.update(key, msgspec.json.encode(fresh), last=entry.revision)
            rotated += 1
        log.info("secrets_rotated", rotated=rotated, unreadable=unreadable)
        message = f"re-sealed {rotated} secrets under the newest key"
        if unreadable:
            return Reply(ok=False, code="secret_unreadable", message=f"{message}; {unreadable} no configured key opens")
        return Reply(ok=True, message=message)

    def get_number(self, query: GetNumber) -> Reply:
        number = self.registry.ids.get(query.number_id or "")
        if query.number is not None:
            try:
                number = validation.e164(query.number)
            except validation.Invalid as exc:
                return Reply(ok=False, code="invalid", message=str(exc), field=exc.field, rule=exc.rule)
        record = self.registry.numbers.get(number or "")
        if record is None:
            return Reply(ok=False, code="not_found", message="no such number", field="number_id" if query.number_id else "number")
        return Reply(ok=True, number=view_number(self.registry, record))

    async def _write(self, command: AnyCommand) -> Reply:
        plaintexts = secrets_of(command)
        refs = {slot: new_secret_ref(uuid.uuid4().hex) for slot in plaintexts}
        outcome = decide(self.registry, command, now=datetime.now(UTC), new_id=new_id, rules=self.rules, secret_refs=refs)
        if isinstance(outcome, Refusal):
            log.info("command_refused", command=type(command).__name__, code=outcome.code, field=outcome.field)
            return Reply(ok=False, code=outcome.code, message=outcome.message, field=outcome.field, rule=outcome.rule)
        if plaintexts:
            if self.box is None:
                return Reply(
                    ok=False,
                    code="invalid",
                    message="this provisioner has no CALLPLANE_SECRET_KEYS: it cannot store credentials",
                    field="credentials",
                    rule="secret_keys",
                )
            await self._seal(plaintexts, refs)
        await self._publish(outcome)
        log.info("command_applied", command=type(command).__name__, events=[e.event_id for e in outcome.events])
        reply = Reply(ok=True, event_ids=[e.event_id for e in outcome.events])
        if outcome.number and (record := self.registry.numbers.get(outcome.number)):
            reply.number = view_number(self.registry, record)
        if account_id := getattr(command, "account_id", None):
            reply.account = view_account(self.registry, account_id)
        return reply

    async def _seal(self, plaintexts: dict[str, str], refs: dict[str, str]) -> None:
        assert self.box is not None and self.secrets is not None
        for slot, plaintext in plaintexts.items():
            sealed = await put_sealed(self.secrets, self.box, refs[slot], plaintext)
            self.registry.secret_hints[refs[slot]] = sealed.hint

    async def _publish(self, outcome: Accepted) -> None:
        """Publish in order; for a number, each event expects the number's last sequence."""
        expected = outcome.expected_version
        for event in outcome.events:
            headers = {"Nats-Msg-Id": event.event_id}
            if outcome.number is not None:
                headers["Nats-Expected-Last-Subject-Sequence"] = str(expected)
                headers["Nats-Expected-Last-Subject-Sequence-Subject"] = f"number.*.{number_token(outcome.number)}"
            try:
                ack = await self.js.publish(subject_for(event), encode(event), headers=headers)
            except nats.js.errors.APIError as exc:
                if exc.err_code == WRONG_LAST_SEQUENCE:
                    raise Conflict from None
                raise
            stream = "NUMBERS" if outcome.number is not None else "ACCOUNTS"
            evolve(self.registry, event, sequence=ack.seq if stream == "NUMBERS" else 0)
            expected = ack.seq


async def wire(broker: NatsBroker, js: JetStreamContext, settings: ProvisionerSettings):
    try:
        provisioner = Provisioner(js, settings)
    except SecretError as exc:
        raise RuntimeError(f"CALLPLANE_SECRET_KEYS: {exc}") from None
    await provisioner.start()

    serve_commands(broker, "provisioner", provisioner.handle)

    http = await serve_http(provisioner, settings) if settings.http_port >= 0 else None

    async def stop() -> None:
        if http is not None:
            http.should_exit = True
            await http.stopped
        await provisioner.stop()

    return stop


class HttpServer(uvicorn.Server):
    """uvicorn inside the service's event loop; the service, not uvicorn, owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self):  # noqa: ANN201
        yield

    stopped: asyncio.Task


async def serve_http(provisioner: Provisioner, settings: ProvisionerSettings) -> HttpServer:
    from .http import build_app

    config = uvicorn.Config(
        build_app(provisioner, settings), host=settings.http_host, port=settings.http_port, log_config=None, access_log=False
    )
    server = HttpServer(config)
    server.stopped = asyncio.create_task(server.serve())
    while not server.started:
        if server.stopped.done():
            raise RuntimeError(f"the admin API could not listen on {settings.http_host}:{settings.http_port}")
        await asyncio.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    log.info("http_listening", url=f"http://{settings.http_host}:{port}/v1")
    return server

