"""A projection replays a stream and says when it has caught up, against a real nats-server."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from nats.js import JetStreamContext

from callplane.broker import publish_all
from callplane.projection import Projection
from schemas import NumberAssigned, timestamp

pytestmark = pytest.mark.e2e


def assignments(count: int) -> list[NumberAssigned]:
    return [
        NumberAssigned(event_id=f"assigned-{i}", occurred_at=timestamp(datetime.now(UTC)), number=f"+4812345{i:04d}", agent_id=f"agent_{i}")
        for i in range(count)
    ]


async def test_a_projection_replays_every_event_then_is_caught_up(js: JetStreamContext) -> None:
    await publish_all(js, assignments(5))
    seen: list[str] = []
    projection = Projection(js, "NUMBERS", lambda event: seen.append(event.event_id))
    await asyncio.wait_for(projection.follow(), 5)
    await projection.stop()
    assert seen == [f"assigned-{i}" for i in range(5)]


async def test_a_purged_stream_is_caught_up_at_once(js: JetStreamContext) -> None:
    await publish_all(js, assignments(3))
    await js.purge_stream("NUMBERS")  # last_seq stays at 3, no message is left to deliver
    seen: list[str] = []
    projection = Projection(js, "NUMBERS", lambda event: seen.append(event.event_id))
    await asyncio.wait_for(projection.follow(), 5)
    await projection.stop()
    assert seen == []


async def test_a_stream_whose_last_events_were_deleted_is_caught_up_after_the_rest(js: JetStreamContext) -> None:
    await publish_all(js, assignments(4))
    await js.delete_msg("NUMBERS", 4)
    await js.delete_msg("NUMBERS", 3)
    seen: list[str] = []
    projection = Projection(js, "NUMBERS", lambda event: seen.append(event.event_id))
    await asyncio.wait_for(projection.follow(), 5)
    await projection.stop()
    assert seen == ["assigned-0", "assigned-1"]
