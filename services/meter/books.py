"""The meter's books in memory: accounts, calls and holds, changed by source events and
hold requests, with the rows each change must write to the DuckDB ledger queued alongside.

Everything here runs in memory, with no I/O: `Books.apply` takes one source event and returns
the ledger.* events it produced; the rows it queued (`Books.pending`) are written by
`ledger.write` in one transaction with the events' tracking rows. Until that commit the
effects exist only here; if the commit fails the caller throws the books away and loads them
again from the database (`ledger.load`), so memory never runs ahead of what is stored.

Amounts are integer millicredits. The clock is passed in (`now`), never read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from functools import lru_cache
from zoneinfo import ZoneInfo

import structlog

from schemas import (
    AccountConfigured,
    AccountCredited,
    AnyEvent,
    CallAccepted,
    CallAgentReplied,
    CallAnswered,
    CallCutoff,
    CallEnded,
    CallMissed,
    CallRejected,
    Event,
    LedgerCharged,
    LedgerCredited,
    LedgerHeld,
    LedgerReleased,
    derived_id,
    encode,
    parse_timestamp,
    timestamp,
)

from .core import (
    AccountLimits,
    Charge,
    Extend,
    HoldGrant,
    HoldRefusal,
    RunningCall,
    decide_hold,
    rate_call,
    round_half_up_div,
    supervise,
)

log = structlog.get_logger()

# An open hold whose call is not answered this long after it was opened is released: the
# ring timeout (60 s by default) and generous slack for the events that should resolve it.
HOLD_TTL_S = 300
DEFAULT_RATE = 30_000  # an account charged before its settings arrive: ElevenLabs voice, 30 credits/min


class UnknownAccount(LookupError):
    """A call of an account whose configuration has not reached the meter yet: retried."""


class UnknownCall(LookupError):
    """An event of a call whose admission has not reached the meter yet (a redelivery can
    overtake it): retried until it has."""


@dataclass(slots=True)
class Account:
    account_id: str
    rate: int = DEFAULT_RATE  # millicredits per minute
    text_price: int = 0  # millicredits per agent response
    timezone: str = "UTC"
    balance: int = 0
    daily_voice_cap_s: int | None = None
    per_call_max_s: int | None = None
    held: int = 0  # the sum of its open holds
    voice_s: dict[date, int] = field(default_factory=dict)  # charged seconds per local day

    def row(self) -> tuple:
        return (self.account_id, self.rate, self.text_price, self.timezone, self.balance,
                self.daily_voice_cap_s, self.per_call_max_s)  # fmt: skip


ACCOUNT_COLUMNS = ["account_id", "rate_millicredits_per_minute", "text_price_millicredits", "timezone",
                   "balance_millicredits", "daily_voice_cap_s", "per_call_max_s"]  # fmt: skip


@dataclass(slots=True)
class Call:
    call_id: str
    account_id: str
    number: str
    accepted_at: str
    agent_id: str | None = None
    status: str = "accepted"  # accepted | missed | rejected (refused after a hold: never charged)
    rate: int | None = None  # as admitted; None: the account's rate
    text_price: int | None = None
    responses: int = 0
    answered_at: str | None = None
    answered_s: float | None = None  # answered_at in seconds since the epoch
    ended: bool = False
    cut_off: str | None = None  # the cutoff reason, once ordered

    def row(self) -> tuple:
        return tuple(getattr(self, name) for name in CALL_FIELDS)


CALL_COLUMNS = ["call_id", "account_id", "number", "agent_id", "accepted_at", "responses", "answered_at", "status",
                "rate_millicredits_per_minute", "text_price_millicredits", "ended", "cut_off"]  # fmt: skip
CALL_FIELDS = ["call_id", "account_id", "number", "agent_id", "accepted_at", "responses", "answered_at", "status",
               "rate", "text_price", "ended", "cut_off"]  # the Call attribute of each column  # fmt: skip


@dataclass(slots=True)
class Hold:
    hold_id: str
    call_id: str
    account_id: str
    amount: int
    status: str = "open"  # open | posted | released
    # When this process granted it, or first saw it (0: not yet; a hold replayed from
    # call.accepted or loaded at start counts from the supervisor's next round).
    opened_s: float = 0.0

    def row(self) -> tuple:
        return (self.hold_id, self.call_id, self.account_id, self.amount, self.status)


HOLD_COLUMNS = ["hold_id", "call_id", "account_id", "amount_millicredits", "status"]


@dataclass(slots=True)
class Pending:
    """What the next commit must write: new ledger rows and tracking rows, and the current
    state of every account, call and hold changed since the last commit."""

    ledger: list[tuple] = field(default_factory=list)
    applied: list[tuple] = field(default_factory=list)
    accounts: set[str] = field(default_factory=set)
    calls: set[str] = field(default_factory=set)
    holds: set[str] = field(default_factory=set)  # by call_id
    ends: list[tuple] = field(default_factory=list)  # (call_id,) of each call ended
    finished: set[str] = field(default_factory=set)  # calls ended or refused: let go after the commit
    outbox: dict[str, list[Event]] = field(default_factory=dict)  # the ledger.* events of each source event

    def __bool__(self) -> bool:
        return bool(self.ledger or self.applied or self.accounts or self.calls or self.holds or self.ends)


@dataclass(slots=True)
class Batch:
    """The rows of one commit, and what to let go of once it is durable."""

    ledger: list[tuple]
    applied: list[tuple]
    accounts: list[tuple]
    calls: list[tuple]
    holds: list[tuple]
    ends: list[tuple]
    finished: set[str]
    outbox: dict[str, list[Event]]  # the ledger.* events of its source events, for a redelivery meanwhile


class Books:
    def __init__(self) -> None:
        self.accounts: dict[str, Account] = {}
        self.calls: dict[str, Call] = {}
        self.holds: dict[str, Hold] = {}  # by call_id: a call has at most one hold
        self.applied: set[str] = set()  # ids of the source events applied
        self.pending = Pending()
        # Memory holds the calls in progress and every open hold. A call that finished before
        # (a late agent_replied after its end, or after a restart) is looked up in the database:
        # `ledger.load` sets this.
        self.find_call: Callable[[str], Call | None] = lambda call_id: None

    # -- source events ------------------------------------------------------------------

    def apply(self, event: AnyEvent, consumer: str, sequence: int) -> list[Event] | None:
        """Apply one source event once. Returns the ledger.* events it produced, or None if
        it had been applied before (its ledger.* events are then in `pending.outbox`, in the
        batch being written, or in the database)."""
        if event.event_id in self.applied:
            return None
        produced = self._apply(event)
        self.applied.add(event.event_id)
        self.pending.applied.append((event.event_id, consumer, sequence))
        if produced:
            self.pending.outbox[event.event_id] = produced
        return produced

    def _apply(self, event: AnyEvent) -> list[Event]:
        match event:
            case AccountConfigured():
                account = self.account(event.account_id)
                account.rate = event.rate_millicredits_per_minute
                account.text_price = event.text_price_millicredits
                account.timezone = event.timezone
                account.daily_voice_cap_s = event.daily_voice_cap_s
                account.per_call_max_s = event.per_call_max_s
                self.pending.accounts.add(account.account_id)
            case AccountCredited():
                account = self._add_to_balance(event.account_id, event.amount_millicredits)
                entry = LedgerCredited(
                    event_id=derived_id(event.event_id, "credited"),
                    occurred_at=event.occurred_at,
                    account_id=event.account_id,
                    amount_millicredits=event.amount_millicredits,
                    balance_millicredits=account.balance,
                    reference=event.reference,
                )
                self._write(entry, event.event_id, "credited", None, None)
                return [entry]
            case CallAccepted():
                if event.hold_id and event.rate_millicredits_per_minute is None and event.account_id not in self.accounts:
                    # An event from before call.accepted carried the prices: its hold needs the
                    # account's rate. Checked before anything changes, so the retry starts clean.
                    raise UnknownAccount(f"account {event.account_id} is not configured (yet)")
                if event.call_id not in self.calls:
                    self.calls[event.call_id] = Call(
                        event.call_id, event.account_id, event.number, event.occurred_at, agent_id=event.agent_id,
                        rate=event.rate_millicredits_per_minute, text_price=event.text_price_millicredits,
                    )  # fmt: skip
                    self.pending.calls.add(event.call_id)
                if event.hold_id:
                    return self._record_hold(event)
            case CallRejected():
                if event.call_id not in self.calls:
                    self.calls[event.call_id] = Call(event.call_id, "", event.number, event.occurred_at, status="rejected")
                    self.pending.calls.add(event.call_id)
                    self.pending.finished.add(event.call_id)
                return self._release(event)
            case CallMissed():  # a missed call's last event: no call.ended follows
                call = self.calls.get(event.call_id)
                if call is not None and call.status == "accepted" and call.answered_at is None:
                    call.status = "missed"  # not loaded again at start (ledger.load)
                    self.pending.calls.add(call.call_id)
                    self.pending.finished.add(call.call_id)
                return self._release(event)
            case CallAnswered():
                call = self.call(event.call_id)
                if call is None:
                    raise UnknownCall(f"{event.call_id} has not been admitted (yet)")
                if call.answered_at is None:
                    call.answered_at = event.occurred_at
                    call.answered_s = parse_timestamp(event.occurred_at).timestamp()
                    self.pending.calls.add(call.call_id)
                if call.ended:
                    self.pending.finished.add(call.call_id)
            case CallAgentReplied() | CallEnded():
                return self._charge(event)
        return []

    def _charge(self, event: CallAgentReplied | CallEnded) -> list[Event]:
        """Each source event posts its own part of a call's charge, whatever the order they
        arrive in: the agent's responses (text) when replied, the voice when ended."""
        call = self.call(event.call_id)
        if call is None:
            raise UnknownCall(f"{event.call_id} has not been admitted (yet)")
        if call.status == "rejected":
            log.info("call_not_admitted_no_charge", call_id=call.call_id)
            return []
        account = self.accounts.get(call.account_id)
        if account is None:
            raise UnknownAccount(f"account {call.account_id} is not configured (yet)")
        rate = account.rate if call.rate is None else call.rate
        text_price = account.text_price if call.text_price is None else call.text_price
        if isinstance(event, CallAgentReplied):
            call.responses += event.responses
            self.pending.calls.add(call.call_id)
            if call.ended:  # a late reply, looked up in the database: let it go again
                self.pending.finished.add(call.call_id)
            charge = Charge(charged_s=0, voice_millicredits=0, text_millicredits=event.responses * text_price)
            if not charge.total_millicredits:
                return []
        else:
            charge = rate_call(duration_ms=event.duration_ms, silent_ms=event.silent_ms, rate_millicredits_per_minute=rate)
            call.ended = True
            self.pending.ends.append((call.call_id,))  # appended: cheaper to commit than the call's row again
            self.pending.finished.add(call.call_id)
            hold = self.holds.get(call.call_id)
            if hold is not None and hold.status == "open":
                self._settle(hold, "posted", write=False)  # the call's end records it (ledger hold_states)
            if charge.charged_s:
                day = local_day(event.occurred_at, account.timezone)
                account.voice_s[day] = account.voice_s.get(day, 0) + charge.charged_s
        self._add_to_balance(account.account_id, -charge.total_millicredits)
        entry = LedgerCharged(
            event_id=derived_id(event.event_id, "charged"),
            occurred_at=event.occurred_at,
            account_id=account.account_id,
            amount_millicredits=charge.total_millicredits,
            balance_millicredits=account.balance,
            call_id=event.call_id,
            number=event.number,
            charged_s=charge.charged_s,
            voice_millicredits=charge.voice_millicredits,
            text_millicredits=charge.text_millicredits,
        )
        self._write(entry, event.event_id, "charged", event.call_id, event.number, charge)
        return [entry]

    # -- holds: reserve at admission, post on end, release on rejection or miss ----------

    def hold(self, call_id: str, account_id: str, *, now: datetime) -> Hold | HoldRefusal | HoldGrant:
        """The gatekeeper's request to reserve a call's first minute (idempotent by call_id):
        the existing Hold, a refusal, or the grant of a new hold (recorded here). A retry of
        a call that has ended since is not recognized (its hold left memory): the gatekeeper
        retries within its deadline, long before a call can end."""
        existing = self.holds.get(call_id)
        if existing is not None:
            return existing
        account = self.accounts.get(account_id)
        if account is None:
            return HoldRefusal("insufficient_credits")
        grant = decide_hold(
            rate_millicredits_per_minute=account.rate,
            balance_millicredits=account.balance,
            open_holds_millicredits=account.held,
            per_call_max_s=account.per_call_max_s,
            daily_voice_cap_s=account.daily_voice_cap_s,
            voice_s_today=self.voice_s_today(account, now),
        )
        if isinstance(grant, HoldGrant):
            self._open(Hold(f"hold_{call_id}", call_id, account_id, grant.amount_millicredits, opened_s=now.timestamp()))
        return grant

    def _record_hold(self, accepted: CallAccepted) -> list[Event]:
        """The ledger's record of a hold comes from call.accepted, so a replay rebuilds it."""
        account = self.account(accepted.account_id)  # its settings may come later
        rate = accepted.rate_millicredits_per_minute
        if rate is None:  # an event from before call.accepted carried the prices (known: checked in _apply)
            rate = account.rate
        amount = round_half_up_div(rate * 60, 60)
        if accepted.call_id not in self.holds:
            self._open(Hold(accepted.hold_id, accepted.call_id, accepted.account_id, amount))
        entry = LedgerHeld(
            event_id=derived_id(accepted.event_id, "held"),
            occurred_at=accepted.occurred_at,
            account_id=accepted.account_id,
            amount_millicredits=amount,
            balance_millicredits=account.balance,
            call_id=accepted.call_id,
            hold_id=accepted.hold_id,
        )
        self._write(entry, accepted.event_id, "held", accepted.call_id, accepted.number)
        return [entry]

    def _release(self, event: CallRejected | CallMissed) -> list[Event]:
        hold = self.holds.get(event.call_id)  # every open hold is in memory
        if hold is None or hold.status != "open":
            return []
        self._settle(hold, "released")
        entry = LedgerReleased(
            event_id=derived_id(event.event_id, "released"),
            occurred_at=event.occurred_at,
            account_id=hold.account_id,
            amount_millicredits=hold.amount,
            balance_millicredits=self.account(hold.account_id).balance,
            call_id=event.call_id,
            hold_id=hold.hold_id,
        )
        self._write(entry, event.event_id, "released", event.call_id, event.number)
        return [entry]

    def expire_holds(self, now: datetime) -> list[Event]:
        """Release the holds of calls that never got going: not answered HOLD_TTL_S after the
        hold was opened (the call.accepted, call.missed or call.rejected that should have
        resolved it never came). A call answered later still pays what it used."""
        now_s = now.timestamp()
        produced: list[Event] = []
        expired = []
        for hold in self.holds.values():
            if hold.status == "open":
                if not hold.opened_s:
                    hold.opened_s = now_s
                elif now_s - hold.opened_s >= HOLD_TTL_S:
                    expired.append(hold)
        for hold in expired:
            call = self.calls.get(hold.call_id)
            if call is not None and call.answered_s is not None:
                continue
            self._settle(hold, "released")
            if call is None or call.status == "rejected":
                self.pending.finished.add(hold.call_id)
            entry = LedgerReleased(
                # A hold can expire again once opened again (a call.accepted after it expired): unique per expiry.
                event_id=f"{hold.hold_id}/expired/{timestamp(now)}",
                occurred_at=timestamp(now),
                account_id=hold.account_id,
                amount_millicredits=hold.amount,
                balance_millicredits=self.account(hold.account_id).balance,
                call_id=hold.call_id,
                hold_id=hold.hold_id,
            )
            self._write(entry, entry.event_id, "released", hold.call_id, call.number if call else None)
            produced.append(entry)
            log.warning("hold_expired", call_id=hold.call_id, millicredits=hold.amount)
        return produced

    def _open(self, hold: Hold) -> None:
        self.holds[hold.call_id] = hold
        self.account(hold.account_id).held += hold.amount
        self.pending.holds.add(hold.call_id)

    def _settle(self, hold: Hold, status: str, *, write: bool = True) -> None:
        hold.status = status
        if hold.account_id in self.accounts:
            self.accounts[hold.account_id].held -= hold.amount
        if write:
            self.pending.holds.add(hold.call_id)

    # -- calls in progress: extend holds or cut off ------------------------------------

    def supervise(self, now: datetime) -> list[Event]:
        """Extend the holds of running calls before they run dry (each extension published as
        a ledger.held of the increment); order call.cutoff when an account cannot cover the
        next minute or a cap is reached."""
        running = [
            (call, hold)
            for call in self.calls.values()
            if call.answered_s is not None and not call.ended and call.cut_off is None
            and (hold := self.holds.get(call.call_id)) is not None and hold.status == "open"
        ]  # fmt: skip
        if not running:
            return []
        calls = [RunningCall(c.call_id, c.account_id, c.answered_s, h.amount) for c, h in running]
        limits = {a: self._limits(self.accounts[a], now) for a in {c.account_id for c in calls} if a in self.accounts}
        by_id = {c.call_id: (c, h) for c, h in running}
        orders: list[Event] = []
        for action in supervise(calls, limits, now.timestamp()):
            call, hold = by_id[action.call_id]
            if isinstance(action, Extend):
                hold.amount += action.amount_millicredits
                self.accounts[hold.account_id].held += action.amount_millicredits
                self.pending.holds.add(hold.call_id)
                extended = LedgerHeld(
                    # The amount after it: unique per extension, the same if it is ever derived again.
                    event_id=f"{hold.hold_id}/extended/{hold.amount}",
                    occurred_at=timestamp(now),
                    account_id=hold.account_id,
                    amount_millicredits=action.amount_millicredits,
                    balance_millicredits=self.accounts[hold.account_id].balance,
                    call_id=call.call_id,
                    hold_id=hold.hold_id,
                )
                self._write(extended, extended.event_id, "held", call.call_id, call.number)
                orders.append(extended)
                log.info("hold_extended", call_id=call.call_id, millicredits=action.amount_millicredits)
            else:
                call.cut_off = action.reason
                self.pending.calls.add(call.call_id)
                orders.append(_cutoff(call, now))
                log.warning("call_cutoff", call_id=call.call_id, reason=action.reason)
        return orders

    def cutoffs_ordered(self, now: datetime) -> list[CallCutoff]:
        """call.cutoff of every call ordered cut off that has not ended: at start, as the
        publish of a committed order may not have happened (a crash in between)."""
        return [_cutoff(call, now) for call in self.calls.values() if call.cut_off is not None and not call.ended]

    def _limits(self, account: Account, now: datetime) -> AccountLimits:
        return AccountLimits(
            rate_millicredits_per_minute=account.rate,
            available_millicredits=account.balance - account.held,
            per_call_max_s=account.per_call_max_s,
            daily_voice_cap_s=account.daily_voice_cap_s,
            voice_s_today=self.voice_s_today(account, now),
        )

    # -- lookups -------------------------------------------------------------------------

    def account(self, account_id: str) -> Account:
        """The account, created with default settings if a credit or call comes first."""
        account = self.accounts.get(account_id)
        if account is None:
            account = self.accounts[account_id] = Account(account_id)
            self.pending.accounts.add(account_id)
        return account

    def call(self, call_id: str) -> Call | None:
        call = self.calls.get(call_id)
        if call is None and (call := self.find_call(call_id)) is not None:
            self.calls[call_id] = call
        return call

    def voice_s_today(self, account: Account, now: datetime) -> int:
        if account.daily_voice_cap_s is None:
            return 0
        return account.voice_s.get(now.astimezone(_zone(account.timezone)).date(), 0)

    # -- what a commit writes, and what it lets go of --------------------------------------

    def _add_to_balance(self, account_id: str, delta: int) -> Account:
        account = self.account(account_id)
        account.balance += delta
        self.pending.accounts.add(account_id)
        return account

    def _write(self, entry, source_id: str, kind: str, call_id, number, charge: Charge | None = None) -> None:  # noqa: ANN001
        self.pending.ledger.append(
            (entry.event_id, source_id, kind, entry.account_id, call_id, number, entry.amount_millicredits,
             entry.balance_millicredits, charge.charged_s if charge else None,
             charge.voice_millicredits if charge else None, charge.text_millicredits if charge else None,
             entry.occurred_at, encode(entry).decode())
        )  # fmt: skip

    def take_pending(self) -> Batch:
        """The rows of the next commit; what is applied from now on goes into the one after."""
        pending, self.pending = self.pending, Pending()
        return Batch(
            ledger=pending.ledger,
            applied=pending.applied,
            accounts=[self.accounts[a].row() for a in pending.accounts],
            calls=[self.calls[c].row() for c in pending.calls],
            holds=[self.holds[c].row() for c in pending.holds],
            ends=pending.ends,
            finished=pending.finished,
            outbox=pending.outbox,
        )

    def committed(self, batch: Batch) -> None:
        """`batch` is durable: let go of its finished calls (the database keeps them), unless
        they changed again since and the change is still to be written."""
        for call_id in batch.finished:
            if call_id in self.pending.calls:
                continue
            call = self.calls.get(call_id)
            if call is not None and call.status == "accepted" and not call.ended:
                continue  # accepted since it was let go (a hold expired before its call.accepted)
            hold = self.holds.get(call_id)
            if hold is None or hold.status != "open":
                self.calls.pop(call_id, None)
                self.holds.pop(call_id, None)


def _cutoff(call: Call, now: datetime) -> CallCutoff:
    return CallCutoff(
        event_id=f"cutoff_{call.call_id}",  # the same every time: JetStream drops a repeat
        occurred_at=timestamp(now),
        call_id=call.call_id,
        number=call.number,
        reason=call.cut_off,
    )


def local_day(occurred_at: str, tz: str) -> date:
    return parse_timestamp(occurred_at).astimezone(_zone(tz)).date()


@lru_cache(maxsize=256)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)
