"""Run one service process: connect, check the topology, wire handlers, serve until
SIGINT/SIGTERM, then drain. Every service's `__main__` is a few lines over this."""

from __future__ import annotations

import asyncio
import gc
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import nats.errors
from faststream.nats import NatsBroker
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from . import logs, topology
from .broker import consumers, make_broker, start_consumers, stop_consumers
from .config import ConfigError, NatsSettings

# wire(broker, js, settings) registers subscribers and consumers (callplane.broker.consume)
# and starts background work; it may return an async callable that stops that work on shutdown.
Wire = Callable[[NatsBroker, JetStreamContext, Any], Awaitable[Callable[[], Awaitable[None]] | None]]


@dataclass
class Service:
    """A wired service: `open_service` built it, `start` begins consuming, `stop` drains it."""

    name: str
    broker: NatsBroker
    stop_work: Callable[[], Awaitable[None]] | None

    async def start(self) -> None:
        """Start the durable consumers: the last step of start-up."""
        await start_consumers(self.broker)

    async def stop(self) -> None:
        # Stop consuming first (handlers in flight publish and ack), then the broker's
        # subscribers and connection; handlers may still use what stop_work closes.
        await stop_consumers(self.broker)
        await self.broker.stop()
        if self.stop_work is not None:
            await self.stop_work()


async def open_service(name: str, settings: NatsSettings, wire: Wire) -> Service:
    """Connect, wire (projections replayed), check the durables wire registered exist,
    start the broker's request/reply subscribers, and tune the GC (`tune_gc`). Nothing
    is consumed until `Service.start`."""
    broker = make_broker(settings, service=name)
    await broker.connect()
    js = broker.connection.jetstream()
    await _check_streams(js, {c.stream for c in topology.CONSUMERS if c.service == name})
    stop_work = await wire(broker, js, settings)
    # The durables wire chose (a partitioned gatekeeper picks its own): refuse to start,
    # saying to run setup, when one is missing.
    await topology.check(js, tuple(consumer.spec for consumer in consumers(broker)))
    await broker.start()
    tune_gc()
    return Service(name, broker, stop_work)


async def _check_streams(js: JetStreamContext, streams: set[str]) -> None:
    """Fail fast, before wiring replays anything, when setup has not been run."""
    for stream in sorted(streams):
        try:
            await js.stream_info(stream)
        except NotFoundError:
            raise RuntimeError(f"stream {stream} does not exist: run `callplane nats setup` first") from None


# Garbage collector thresholds once a service is up: full collections after 100
# middle-generation collections instead of 10 (young ones as by default: a higher first
# threshold made each middle-generation collection scan more survivors, up to 100 ms).
# In bench/README.md: with the defaults, the gatekeeper paused 5-10 times a minute for
# full collections of up to 500 ms at 1,000 offers/s; with these, none in the minute.
GC_THRESHOLDS = (700, 10, 100)


def tune_gc() -> None:
    """Collect once, move every object alive now (imported frameworks, replayed
    projections) to the GC's permanent generation so that later full collections skip
    them, and make full collections rarer (GC_THRESHOLDS). Objects created later are
    collected as usual."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def serve(name: str, settings: NatsSettings, wire: Wire) -> None:
    log = logs.configure(name, settings.log_level)
    service = await open_service(name, settings, wire)
    try:
        await service.start()
        log.info("service_started", nats_url=settings.nats_url)
        await _until_signalled()
    finally:
        log.info("service_stopping")
        await service.stop()
        log.info("service_stopped")


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def run(name: str, main: Callable[[], Awaitable[None]]) -> None:
    """Entry point wrapper: a clear one-line error and exit code 2 instead of a traceback
    for the failures an operator can fix (bad config, no server, setup not run)."""
    try:
        asyncio.run(main())
    except ConfigError as exc:
        _fail(name, str(exc))
    except (nats.errors.NoServersError, OSError) as exc:
        _fail(name, f"cannot reach NATS: {exc}")
    except RuntimeError as exc:
        _fail(name, str(exc))
    except KeyboardInterrupt:
        pass


def _fail(name: str, message: str) -> None:
    print(f"callplane-{name}: {message}", file=sys.stderr)
    sys.exit(2)
