"""Gatekeeper adapter: NATS in, pure core, NATS out.

On start it rebuilds its state from the streams (numbers, accounts, and the last day of
calls: slots in use, windows, calls still ringing), so a restarted gatekeeper decides
exactly as it would have without the restart. Then, per offered call: checks 1-9 (core),
a credit hold from the meter (request/reply with a deadline), the pre-call webhook if
configured, and the final decision, published with the call's later lifecycle events.

The calls' durable hands over the messages delivered together (`consume_batches`): every
offer of a batch is decided provisionally, in delivery order, and takes its slot before
anything is awaited; then the batch waits for its holds once, and the next batches are
decided meanwhile (up to BATCHES_AT_ONCE). A task, a future wake-up and a log context per
offer cost ~10 us of the ~60 us an accepted call took (bench/README.md).

Credit holds are batched: the holds wanted by offers admitted provisionally in the same
turn of the event loop go to the meter as one `hold_credits` request (one alone goes as
`hold_credit`), so a burst of offers costs one round trip, and a lone offer waits for
nothing. A meter that does not handle `hold_credits` yet answers it `invalid`: that
batch is asked again one hold at a time, and batching pauses for a while.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from datetime import UTC, datetime

import msgspec
import nats.errors
import structlog
from faststream.nats import NatsBroker
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from structlog.contextvars import bound_contextvars

from callplane import topology
from callplane.broker import consume_batches, publish_all
from callplane.commands import serve_commands
from callplane.projection import Projection
from callplane.secrets import SecretBox, SecretError, read_sealed
from schemas import (
    AnyEvent,
    CallAccepted,
    CallOffered,
    CallRejected,
    Event,
    PreCallWebhook,
    Reply,
    command_name,
    decode,
    decode_reply,
    derived_id,
    encode_message,
    rpc,
)
from schemas.commands import AnswerCall, HoldCredit, HoldCredits

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
    withdraw,
)

log = structlog.get_logger()

HOLD_BATCH_MAX = 1000  # holds per hold_credits request (schemas.commands.HoldCredits)
# Batches of offers being completed at once: a batch waits for its holds (a round trip to
# the meter) while the next ones are decided provisionally.
BATCHES_AT_ONCE = 8
# After the meter answered hold_credits `invalid` as a command it does not handle (a meter
# older than the command), holds go one by one for this long before a batch is tried again.
HOLD_BATCH_RETRY_S = 60.0


def hold_outcome(reply: Reply) -> HoldOutcome:
    """The meter's answer to one hold, for the core. Anything but a hold or a refusal the
    core knows is no answer: never admit on a guess."""
    if reply.ok and reply.hold is not None:
        return Held(reply.hold.hold_id, reply.hold.max_duration_s)
    if reply.code in ("insufficient_credits", "daily_voice_cap"):
        return HoldRefused(reply.code)
    return HoldUnanswered()


class MeterHolds:
    """Credit holds from the meter, batched per turn of the event loop.

    `hold(command)` queues the request and returns a future of its outcome; the first
    request of a turn schedules the flush with `call_soon`, which runs after every handler
    started in that turn reached its first await. Each hold keeps its own deadline
    (`timeout_s` from when it was asked for); a hold not answered by then is HoldUnanswered.
    """

    def __init__(self, nc: Client, timeout_s: float, *, batching: bool = True) -> None:
        self.nc = nc
        self.timeout_s = timeout_s
        self.batching = batching
        self._queued: list[tuple[HoldCredit, float, asyncio.Future[HoldOutcome]]] = []
        self._tasks: set[asyncio.Task] = set()
        self._singles_until = 0.0  # the meter refused hold_credits: one by one until then

    def hold(self, command: HoldCredit) -> asyncio.Future[HoldOutcome]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[HoldOutcome] = loop.create_future()
        if not self._queued:
            loop.call_soon(self._flush)
        self._queued.append((command, loop.time() + self.timeout_s, future))
        return future

    def _flush(self) -> None:
        queued, self._queued = self._queued, []
        loop = asyncio.get_running_loop()
        if len(queued) > 1 and self.batching and loop.time() >= self._singles_until:
            groups = [queued[i : i + HOLD_BATCH_MAX] for i in range(0, len(queued), HOLD_BATCH_MAX)]
            sends = [(self._batch(group), group) for group in groups]
        else:
            sends = [(self._single(*item), [item]) for item in queued]
        for send, items in sends:
            task = loop.create_task(send)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(functools.partial(_settle_left, [item[2] for item in items]))

    async def _single(self, command: HoldCredit, deadline: float, future: asyncio.Future[HoldOutcome]) -> None:
        _settle(future, await self._ask(command, deadline, single=True))

    async def _batch(self, batch: list[tuple[HoldCredit, float, asyncio.Future[HoldOutcome]]]) -> None:
        command = HoldCredits(requests=[item[0] for item in batch])
        reply = await self._ask(command, min(item[1] for item in batch), single=False)
        if isinstance(reply, Reply) and not reply.ok and reply.code == "invalid":
            # Not understood as a batch: ask for each hold on its own, within its own deadline.
            if reply.rule == "known_command":
                self._singles_until = asyncio.get_running_loop().time() + HOLD_BATCH_RETRY_S
                log.info("meter_hold_batches_refused", retry_in_s=HOLD_BATCH_RETRY_S)
            await asyncio.gather(*(self._single(*item) for item in batch))
            return
        replies = reply.replies if isinstance(reply, Reply) and reply.ok else None
        if replies is None or len(replies) != len(batch):
            outcomes: list[HoldOutcome] = [HoldUnanswered()] * len(batch)  # no answer, or not one per hold
        else:
            outcomes = [hold_outcome(one) for one in replies]
        for (_, _, future), outcome in zip(batch, outcomes, strict=True):
            _settle(future, outcome)

    async def _ask(self, command: HoldCredit | HoldCredits, deadline: float, *, single: bool) -> Reply | HoldOutcome:
        """The meter's reply (a single hold's outcome when `single`), or HoldUnanswered."""
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            return HoldUnanswered()
        try:
            response = await self.nc.request(
                rpc("meter", command_name(type(command))), encode_message(command), timeout=remaining
            )
            reply = decode_reply(response.data)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError, msgspec.DecodeError):
            return HoldUnanswered()
        return hold_outcome(reply) if single else reply

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=1.0)


def _settle(future: asyncio.Future[HoldOutcome], outcome: HoldOutcome) -> None:
    if not future.done():  # its handler may have been cancelled meanwhile
        future.set_result(outcome)


def _settle_left(futures: list[asyncio.Future[HoldOutcome]], task: asyncio.Task) -> None:
    """A request that ended without settling its holds (an error other than no answer,
    e.g. the connection closed, or `stop`) fails them, as the request would have failed
    its handler: none waits forever holding its slot, none is admitted."""
    error = None if task.cancelled() else task.exception()
    for future in futures:
        if future.done():
            continue
        if error is None:
            future.cancel()
        else:
            future.set_exception(error)


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
        # The logger as configured now (the service configures logging before it wires):
        # 0.5 us less per decision's log line than the module's lazy proxy.
        self._log = structlog.get_logger().bind()
        fold = lambda event: evolve(self.state, event)  # noqa: E731
        self.numbers = Projection(js, "NUMBERS", fold)
        self.accounts = Projection(js, "ACCOUNTS", fold)
        self._ticker: asyncio.Task | None = None
        self.http = make_client()  # the one shared client for pre-call webhooks
        keys = self.settings.callplane_secret_keys
        self.box = SecretBox.from_keys(keys) if keys else None
        self._secrets: dict[str, str] = {}  # secret_ref -> webhook signing secret, opened once
        self.holds = MeterHolds(self.nc, self.settings.hold_timeout_ms / 1000, batching=self.settings.hold_batching)
        # Calls admitted provisionally whose hold (or webhook) is awaited -> the event a repeat
        # of their offer waits on (made only when one does).
        self._completing: dict[str, asyncio.Event | None] = {}

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
        await self.holds.stop()
        await self.http.aclose()
        await self.numbers.stop()
        await self.accounts.stop()

    # -- calls ---------------------------------------------------------------------

    async def on_call_events(self, items: list[tuple[AnyEvent, Msg.Metadata]]) -> list[list[Event] | Exception]:
        """The messages delivered together (`consume_batches`), in delivery order: each
        offer is decided provisionally and takes its slot before anything is awaited; then
        their holds come back (one request to the meter), the pre-call webhooks are called
        (concurrently, for the accounts that have one), and each is decided for good.
        Answered / missed / ended calls free what they held, in order with the offers."""
        results: list[list[Event] | Exception] = [[] for _ in items]
        admitting: list[tuple[int, CallOffered, CallAccepted, asyncio.Future[HoldOutcome]]] = []
        repeats: list[tuple[int, CallOffered]] = []
        for index, (event, _meta) in enumerate(items):
            if not isinstance(event, CallOffered):
                evolve(self.state, event)
            elif event.call_id in self._completing:
                repeats.append((index, event))  # its hold (or webhook) is awaited already: after it
            else:
                begun = self._begin(event)
                if isinstance(begun, CallAccepted):
                    admitting.append((index, event, begun, self.request_hold(begun)))
                else:
                    results[index] = begun
        if admitting:
            await self._complete_all(admitting, results)
        for index, offer in repeats:
            try:
                results[index] = await self.admit(offer)
            except Exception as exc:  # noqa: BLE001 - fails that message alone (the runtime retries it)
                results[index] = exc
        return results

    async def on_call_event(self, event: AnyEvent, meta: Msg.Metadata) -> list[Event]:
        """One event: `on_call_events` with a batch of one."""
        [result] = await self.on_call_events([(event, meta)])
        if isinstance(result, Exception):
            raise result
        return result

    async def admit(self, offer: CallOffered) -> list[Event]:
        """One offer, waiting first for a decision of the same call that is being completed."""
        call_id = offer.call_id
        while call_id in self._completing:
            # The same offer again (a redelivery, or the edge sent it twice) while its hold or
            # webhook is awaited: wait for that decision rather than ask the meter again (a
            # second answer could differ, and the stream keeps only the first published).
            waiter = self._completing[call_id]
            if waiter is None:
                waiter = self._completing[call_id] = asyncio.Event()
            await waiter.wait()
        begun = self._begin(offer)
        if not isinstance(begun, CallAccepted):
            return begun
        results: list[list[Event] | Exception] = [[]]
        await self._complete_all([(0, offer, begun, self.request_hold(begun))], results)
        if isinstance(results[0], Exception):
            raise results[0]
        return results[0]

    def _begin(self, offer: CallOffered) -> list[Event] | CallAccepted:
        """Checks 1-9 (no await): the outputs of a decision known already (a redelivery), a
        refusal, or a provisional admission that holds its slot until `_complete_all`."""
        if (known := self.state.decided.get(offer.call_id)) is not None:
            return self._outputs(decode(known))  # a redelivery: the same final decision again
        provisional = decide(self.state, offer, now=self.clock())
        evolve(self.state, provisional)  # takes the slot before any await: exact under concurrency
        if isinstance(provisional, CallRejected):
            self._log.info(
                "call_rejected", call_id=offer.call_id, event_id=offer.event_id, number=provisional.number,
                reason=provisional.reason,
            )
            return [provisional]
        self._completing[offer.call_id] = None
        return provisional

    async def _complete_all(
        self,
        admitting: list[tuple[int, CallOffered, CallAccepted, asyncio.Future[HoldOutcome]]],
        results: list[list[Event] | Exception],
    ) -> None:
        """Checks 10-12 for provisional admissions: wait for their holds, call the webhooks
        of those held (concurrently), decide each for good into `results` (an exception
        fails that message alone and gives its slot back)."""
        verdicts: dict[int, WebhookVerdict | None | BaseException] = {}
        try:
            await asyncio.wait([hold for *_, hold in admitting])
            calls = [
                (index, offer, provisional, hook)
                for index, offer, provisional, hold in admitting
                if not hold.cancelled() and hold.exception() is None and isinstance(hold.result(), Held)
                and (hook := self._webhook_of(offer, provisional)) is not None
            ]
            if calls:
                answers = await asyncio.gather(
                    *(self.ask_webhook(offer, provisional, hook) for _, offer, provisional, hook in calls),
                    return_exceptions=True,
                )
                verdicts = {index: answer for (index, *_), answer in zip(calls, answers, strict=True)}
        except BaseException:  # cancelled (the consumer stops): none was decided, none holds a slot
            for _, offer, provisional, hold in admitting:
                hold.cancel()
                self._done(offer.call_id)
                withdraw(self.state, provisional)
            raise
        for index, offer, provisional, hold in admitting:
            try:
                verdict = verdicts.get(index)
                if isinstance(verdict, Exception):
                    raise verdict
                if isinstance(verdict, BaseException) or hold.cancelled():  # stopped: the gatekeeper is stopping
                    raise RuntimeError("its hold request or webhook call was cancelled")
                final = complete(provisional, hold=hold.result(), webhook=verdict, now=self.clock())
                evolve(self.state, final)
            except Exception as exc:  # noqa: BLE001 - not decided (the runtime retries the offer): no slot meanwhile
                withdraw(self.state, provisional)
                results[index] = exc
                continue
            finally:  # decided, or failed (a repeat waiting then tries again, as a retry would)
                self._done(offer.call_id)
            if isinstance(final, CallAccepted):
                self._log.info(
                    "call_accepted", call_id=offer.call_id, event_id=offer.event_id, number=final.number,
                    agent_id=final.agent_id, hold_id=final.hold_id,
                )
            else:
                self._log.info(
                    "call_rejected", call_id=offer.call_id, event_id=offer.event_id, number=final.number,
                    reason=final.reason,
                )
            results[index] = self._outputs(final)

    def _done(self, call_id: str) -> None:
        if (waiter := self._completing.pop(call_id, None)) is not None:
            waiter.set()

    def _outputs(self, final: CallAccepted | CallRejected) -> list[Event]:
        if isinstance(final, CallAccepted) and final.auto_answer:
            pickup = answered(final, now=self.clock())
            evolve(self.state, pickup)
            return [final, pickup]
        return [final]

    def request_hold(self, provisional: CallAccepted) -> asyncio.Future[HoldOutcome]:
        command = HoldCredit(call_id=provisional.call_id, account_id=provisional.account_id, number=provisional.number)
        return self.holds.hold(command)

    def _webhook_of(self, offer: CallOffered, provisional: CallAccepted) -> PreCallWebhook | None:
        """The account's pre-call webhook, if it has one and the call is inbound."""
        account = self.state.accounts.get(provisional.account_id)
        hook = account.pre_call_webhook if account else None
        return hook if offer.direction == "inbound" else None

    async def ask_webhook(
        self, offer: CallOffered, provisional: CallAccepted, hook: PreCallWebhook
    ) -> WebhookVerdict | None:
        """Call a held call's pre-call webhook (found by `_webhook_of`); what it logs names the call."""
        with bound_contextvars(call_id=offer.call_id, event_id=offer.event_id):
            return await self._ask_webhook(offer, provisional, hook)

    async def _ask_webhook(
        self, offer: CallOffered, provisional: CallAccepted, hook: PreCallWebhook
    ) -> WebhookVerdict | None:
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
    consume_batches(broker, spec, gatekeeper.on_call_events, overlap=BATCHES_AT_ONCE)

    serve_commands(broker, "gatekeeper", gatekeeper.answer, accepts=(AnswerCall,))

    return gatekeeper.stop


