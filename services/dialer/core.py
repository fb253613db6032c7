"""Outbound calls, as pure functions: a place-call request becomes an outbound
call.offered (which goes through the gatekeeper like any call); call.* events move
each outbound call through its statuses."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Literal

from schemas import AnyEvent, CallAccepted, CallAnswered, CallEnded, CallOffered, CallRejected, timestamp
from schemas.commands import PlaceCall

Status = Literal["dispatched", "initiated", "answered", "completed", "failed"]


def place_call(command: PlaceCall, *, now: datetime, new_id: Callable[[str], str]) -> CallOffered:
    return CallOffered(
        event_id=new_id("ev"),
        occurred_at=timestamp(now),
        call_id=command.call_id or new_id("call"),
        direction="outbound",
        to=command.to,
        from_=command.from_number,
        source_ip="",
        transport="tcp",
    )


def next_status(event: AnyEvent) -> Status | None:
    """The status an outbound call reaches with this event (None: no change)."""
    match event:
        case CallAccepted():
            return "initiated"
        case CallRejected():
            return "failed"
        case CallAnswered():
            return "answered"
        case CallEnded():
            return "completed"
    return None
