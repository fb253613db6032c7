"""Keep an in-memory projection fed with every event of a stream: replayed from the
first event at start-up, then followed live (an ordered consumer, no durable state).

`follow()` returns once the projection has caught up with everything the stream
held when it started, so a service decides nothing on a half-built state.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime

import nats.errors
from collections.abc import Callable

import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from schemas import STREAMS, AnyEvent, DecodeError, decode

log = structlog.get_logger()


class Projection:
    def __init__(
        self,
        js: JetStreamContext,
        stream: str,
        apply: Callable[[AnyEvent], None],
        *,
        since: datetime | None = None,
    ) -> None:
        """`since`: replay only the events stored from that time on (e.g. the last day)."""
        self._js = js
        self._since = since
        self._stream = stream
        self._apply = apply
        self._caught_up = asyncio.Event()
        self._target = 0
        self.position = 0  # stream sequence of the last event applied
        self._sub = None

    async def follow(self, timeout: float = 60.0) -> None:
        state = (await self._js.stream_info(self._stream)).state
        self._target = state.last_seq
        nothing_to_replay = state.messages == 0  # empty, or purged (last_seq stays where it was)
        if not nothing_to_replay and self._since is not None:
            with contextlib.suppress(NotFoundError):  # the last one was deleted: replay what is left
                last = await self._js.get_msg(self._stream, seq=self._target)
                nothing_to_replay = last.time is not None and _aware(last.time) < self._since
        if nothing_to_replay:
            self._caught_up.set()
        options = (
            {"deliver_policy": DeliverPolicy.BY_START_TIME, "config": ConsumerConfig(opt_start_time=_rfc3339(self._since))}
            if self._since is not None
            else {"deliver_policy": DeliverPolicy.ALL}
        )
        self._sub = await self._js.subscribe(
            STREAMS[self._stream], stream=self._stream, ordered_consumer=True, cb=self._on_message, **options
        )
        await asyncio.wait_for(self._caught_up.wait(), timeout)
        log.info("projection_ready", stream=self._stream, position=self.position)

    async def catch_up(self, timeout: float = 5.0) -> None:
        """Wait until everything the stream holds now has been applied."""
        target = (await self._js.stream_info(self._stream)).state.last_seq
        deadline = asyncio.get_running_loop().time() + timeout
        while self.position < target:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"projection of {self._stream} is behind ({self.position} < {target})")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):  # the connection may be closed already
                await self._sub.unsubscribe()

    async def _on_message(self, msg: Msg) -> None:
        self.position = msg.metadata.sequence.stream
        try:
            self._apply(decode(msg.data))
        except DecodeError as exc:
            # Durable consumers dead-letter such messages; a projection just skips them.
            log.warning("projection_skipped_undecodable", stream=self._stream, position=self.position, error=str(exc))
        # Caught up: at the last sequence seen at start, or nothing left to deliver (the
        # messages up to that sequence may have been deleted).
        if self.position >= self._target or msg.metadata.num_pending == 0:
            self._caught_up.set()


def _rfc3339(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")



def _aware(when: datetime) -> datetime:
    return when if when.tzinfo else when.replace(tzinfo=UTC)
