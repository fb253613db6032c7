"""Keep an in-memory projection fed with every event of a stream: replayed from the
first event at start-up, then followed live (an ordered consumer, no durable state).

`follow()` returns once the projection has caught up with everything the stream
held when it started, so a service decides nothing on a half-built state.
"""

from __future__ import annotations

import asyncio
import contextlib

import nats.errors
from collections.abc import Callable

import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from schemas import STREAMS, AnyEvent, DecodeError, decode

log = structlog.get_logger()


class Projection:
    def __init__(self, js: JetStreamContext, stream: str, apply: Callable[[AnyEvent], None]) -> None:
        self._js = js
        self._stream = stream
        self._apply = apply
        self._caught_up = asyncio.Event()
        self._target = 0
        self.position = 0  # stream sequence of the last event applied
        self._sub = None

    async def follow(self, timeout: float = 60.0) -> None:
        self._target = (await self._js.stream_info(self._stream)).state.last_seq
        if self._target == 0:
            self._caught_up.set()
        self._sub = await self._js.subscribe(
            STREAMS[self._stream],
            stream=self._stream,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
            cb=self._on_message,
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
        if self.position >= self._target:
            self._caught_up.set()
