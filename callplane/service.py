"""Run one service process: connect, check the topology, wire handlers, serve until
SIGINT/SIGTERM, then drain. Every service's `__main__` is a few lines over this."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
from faststream.nats import NatsBroker
from nats.js import JetStreamContext

from . import logs, topology
from .broker import make_broker
from .config import ConfigError, NatsSettings

# wire(broker, js, settings) registers subscribers and starts background work; it may return
# an async callable that stops that work on shutdown.
Wire = Callable[[NatsBroker, JetStreamContext, Any], Awaitable[Callable[[], Awaitable[None]] | None]]


async def serve(name: str, settings: NatsSettings, wire: Wire) -> None:
    log = logs.configure(name, settings.log_level)
    broker = make_broker(settings, service=name)
    await broker.connect()
    js = broker.connection.jetstream()
    await topology.check(js, tuple(c for c in topology.CONSUMERS if c.service == name))
    stop_work = await wire(broker, js, settings)
    await broker.start()
    log.info("service_started", nats_url=settings.nats_url)
    try:
        await _until_signalled()
    finally:
        log.info("service_stopping")
        await broker.stop()  # stop consuming first: handlers may still use what stop_work closes
        if stop_work is not None:
            await stop_work()
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
