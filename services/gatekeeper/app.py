"""Gatekeeper adapter: NATS in, pure core, NATS out.

On start it rebuilds its state from the streams (numbers, accounts, and the last day of
calls: slots in use, windows, calls still ringing), so a restarted gatekeeper decides
exactly as it would have without the restart. Then, per offered call: checks 1-9 (core),
a credit hold from the meter (request/reply with a deadline), the pre-call webhook if
configured, and the final decision, published with the call's later lifecycle events.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import UTC, datetime

import msgspec
import nats.errors
import structlog
from faststream.nats import NatsBroker
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from callplane import topology
from callplane.broker import consume, publish_all
from callplane.commands import serve_commands
from callplane.projection import Projection
from callplane.secrets import SecretBox, SecretError, read_sealed
from schemas import (
    AnyEvent,
    CallAccepted,
    CallOffered,
    CallRejected,
    Event,
    Reply,
    command_name,
    decode_reply,
    derived_id,
    encode_message,
    rpc,
)
from schemas.commands import AnswerCall, HoldCredit

from .config import GatekeeperSettings
from .webhook import Decline, Failed, Proceed, WebhookSettings, call_pre_call_webhook, make_client
from .core import (
    DAY,
    Held,
    HoldOutcome,
    HoldRefused,
    HoldUnanswered,
    State,
    WebhookVerdict,
    answered,
    complete,
    decide,
    due,
    evolve,
)

log = structlog.get_logger()


class Gatekeeper:
    def __init__(
        self,
        js: JetStreamContext,
        settings: GatekeeperSettings | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.js = js
        self.nc: Client = js._nc
        self.settings = settings or GatekeeperSettings()
        self.clock = clock
        self.state = State()
        fold = lambda event: evolve(self.state, event)  # noqa: E731
        self.numbers = Projection(js, "NUMBERS", fold)
        self.accounts = Projection(js, "ACCOUNTS", fold)
        self._ticker: asyncio.Task | None = None
        self.http = make_client()  # the one shared client for pre-call webhooks
        keys = self.settings.callplane_secret_keys
        self.box = SecretBox.from_keys(keys) if keys else None
        self._secrets: dict[str, str] = {}  # secret_ref -> webhook signing secret, opened once

    async def start(self) -> None:
        """Rebuild the state from the streams, then keep the lifecycle clock ticking."""
        await self.numbers.follow()
        await self.accounts.follow()
        calls = Projection(self.js, "CALLS", lambda event: evolve(self.state, event), since=self.clock() - DAY)
        await calls.follow()
        await calls.stop()  # from here on the durable consumer brings what matters
        self._ticker = asyncio.create_task(self._tick())
        log.info("gatekeeper_state_rebuilt", numbers=len(self.state.lines), ringing=len(self.state.ringing))

    async def stop(self) -> None:
        if self._ticker:
            self._ticker.cancel()
        await self.http.aclose()
        await self.numbers.stop()
        await self.accounts.stop()

    # -- calls ---------------------------------------------------------------------

    async def on_call_event(self, event: AnyEvent, _meta: Msg.Metadata) -> list[Event]:
        if isinstance(event, CallOffered):
            return await self.admit(event)
        evolve(self.state, event)  # answered / missed / ended: slots and ringing
        return []

    async def admit(self, offer: CallOffered) -> list[Event]:
        earlier = self.state.decided.get(offer.call_id)
        if isinstance(earlier, CallRejected) or (isinstance(earlier, CallAccepted) and earlier.hold_id):
            return self._outputs(earlier)  # a redelivery: the same final decision again
        provisional = decide(self.state, offer, now=self.clock())
        evolve(self.state, provisional)  # takes the slot before any await: exact under concurrency
        if isinstance(provisional, CallRejected):
            log.info("call_rejected", number=provisional.number, reason=provisional.reason)
            return [provisional]
        hold = await self.request_hold(provisional)
        verdict = await self.ask_webhook(offer, provisional) if isinstance(hold, Held) else None
        final = complete(provisional, hold=hold, webhook=verdict, now=self.clock())
        evolve(self.state, final)
        if isinstance(final, CallAccepted):
            log.info("call_accepted", number=final.number, agent_id=final.agent_id, hold_id=final.hold_id)
        else:
            log.info("call_rejected", number=final.number, reason=final.reason)
        return self._outputs(final)

    def _outputs(self, final: CallAccepted | CallRejected) -> list[Event]:
        if isinstance(final, CallAccepted) and final.auto_answer:
            pickup = answered(final, now=self.clock())
            evolve(self.state, pickup)
            return [final, pickup]
        return [final]

    async def request_hold(self, provisional: CallAccepted) -> HoldOutcome:
        command = HoldCredit(call_id=provisional.call_id, account_id=provisional.account_id, number=provisional.number)
        try:
            response = await self.nc.request(
                rpc("meter", command_name(HoldCredit)),
                encode_message(command),
                timeout=self.settings.hold_timeout_ms / 1000,
            )
            reply = decode_reply(response.data)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError, msgspec.DecodeError):
            return HoldUnanswered()
        if reply.ok and reply.hold is not None:
            return Held(reply.hold.hold_id, reply.hold.max_duration_s)
        if reply.code in ("insufficient_credits", "daily_voice_cap"):
            return HoldRefused(reply.code)
        return HoldUnanswered()

    async def ask_webhook(self, offer: CallOffered, provisional: CallAccepted) -> WebhookVerdict | None:
        """The account's pre-call webhook, if it has one (inbound calls only)."""
        account = self.state.accounts.get(provisional.account_id)
        hook = account.pre_call_webhook if account else None
        if hook is None or offer.direction != "inbound":
            return None
        try:
            secret = await self._webhook_secret(hook.secret_ref)
            settings = WebhookSettings(
                url=hook.url,
                secret=secret,
                timeout_ms=hook.timeout_ms,
                fail_closed=hook.fail_closed,
                allow_private=hook.allow_private,
            )
        except (SecretError, ValueError) as exc:
            log.warning("webhook_unusable", account_id=provisional.account_id, error=type(exc).__name__)
            return WebhookVerdict(proceed=not hook.fail_closed, failed=True, reason="webhook secret unavailable")
        outcome = await call_pre_call_webhook(
            self.http,
            settings,
            caller_id=offer.from_,
            agent_id=provisional.agent_id,
            called_number=offer.to,
            call_id=offer.call_id,
            msg_id=derived_id(offer.event_id, "webhook"),
            now=self.clock(),
        )
        match outcome:
            case Proceed():
                return WebhookVerdict(
                    proceed=True,
                    dynamic_variables=outcome.dynamic_variables,
                    conversation_config_override=outcome.conversation_config_override,
                )
            case Decline(reason=reason):
                return WebhookVerdict(proceed=False, reason=reason)
            case Failed():
                log.warning("webhook_failed", kind=outcome.kind, fail_closed=outcome.fail_closed)
                return WebhookVerdict(proceed=not outcome.fail_closed, failed=True, reason=f"{outcome.kind}: {outcome.reason}")
        return None

    async def _webhook_secret(self, ref: str | None) -> str:
        if ref is None or self.box is None:
            raise SecretError("no signing secret, or no CALLPLANE_SECRET_KEYS to open it")
        if ref not in self._secrets:
            self._secrets[ref] = await read_sealed(await self.js.key_value("SECRETS"), self.box, ref)
        return self._secrets[ref]

    # -- the lifecycle clock and the agent's own pick-up ---------------------------

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.settings.lifecycle_tick_ms / 1000)
            with contextlib.suppress(Exception):
                await self.publish_due()

    async def publish_due(self) -> list[Event]:
        missed = due(self.state, self.clock())
        if missed:
            await publish_all(self.js, missed)
            for event in missed:
                evolve(self.state, event)
                log.info("call_missed", call_id=event.call_id, number=event.number)
        return missed

    async def answer(self, command: AnswerCall) -> Reply:
        ringing = self.state.ringing.get(command.call_id)
        if ringing is None:
            return Reply(ok=False, code="not_found", message=f"{command.call_id} is not ringing", field="call_id")
        pickup = answered(ringing, now=self.clock())
        await publish_all(self.js, [pickup])
        evolve(self.state, pickup)
        return Reply(ok=True, event_ids=[pickup.event_id])


async def wire(broker: NatsBroker, js: JetStreamContext, settings: GatekeeperSettings):
    gatekeeper = Gatekeeper(js, settings)
    await gatekeeper.start()
    partition = settings.gatekeeper_partition
    spec = topology.consumer("gatekeeper") if partition is None else topology.gatekeeper_partition(partition)
    consume(broker, spec, gatekeeper.on_call_event)

    serve_commands(broker, "gatekeeper", gatekeeper.answer, accepts=(AnswerCall,))

    return gatekeeper.stop


