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
from callplane.projection import Projection
from schemas import (
    AnyEvent,
    CallAccepted,
    CallOffered,
    CallRejected,
    Event,
    Reply,
    command_name,
    decode_command,
    decode_reply,
    encode_message,
    rpc,
)
from schemas.commands import AnswerCall, HoldCredit

from .config import GatekeeperSettings
from .core import (
    DAY,
    Held,
    HoldOutcome,
    HoldRefused,
    HoldUnanswered,
    State,
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
        final = complete(provisional, hold=hold, now=self.clock())
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
    consume(broker, topology.consumer("gatekeeper"), gatekeeper.on_call_event)

    @broker.subscriber(rpc("gatekeeper", command_name(AnswerCall)), decoder=_raw)
    async def on_answer(body: bytes) -> bytes:
        try:
            command = decode_command(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return encode_message(Reply(ok=False, code="invalid", message=str(exc)))
        if not isinstance(command, AnswerCall):
            return encode_message(Reply(ok=False, code="invalid", message="the gatekeeper answers answer_call only"))
        return encode_message(await gatekeeper.answer(command))

    return gatekeeper.stop


async def _raw(message) -> bytes:  # noqa: ANN001
    return message.body

