"""Send commands to running services over NATS request/reply."""

from __future__ import annotations

import asyncio
import os

import nats
import nats.errors
from nats.aio.client import Client

from schemas import Command, Reply, command_name, decode_reply, encode_message, rpc


class Unreachable(RuntimeError):
    """No NATS server answered."""


async def connect(url: str | None = None, *, creds: str | None = None, timeout: float = 3.0) -> Client:
    """Connect for a command-line tool: $NATS_URL (comma-separated) and $NATS_CREDS by
    default, fail fast with one clear error instead of nats-py's retry tracebacks."""
    url = url or os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
    creds = creds or os.environ.get("NATS_CREDS") or None

    async def quiet(_exc: Exception) -> None:
        pass

    try:
        return await asyncio.wait_for(
            nats.connect(url.split(","), user_credentials=creds, connect_timeout=timeout, error_cb=quiet),
            timeout,
        )
    except (nats.errors.NoServersError, OSError, TimeoutError) as exc:
        raise Unreachable(f"cannot reach NATS at {url}: {str(exc) or 'no answer'}") from None


class ServiceUnavailable(RuntimeError):
    """No instance of the service answered in time."""


async def send(nc: Client, service: str, command: Command, *, timeout: float = 5.0) -> Reply:
    subject = rpc(service, command_name(type(command)))
    try:
        response = await nc.request(subject, encode_message(command), timeout=timeout)
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
        raise ServiceUnavailable(f"the {service} service did not answer on {subject}: is it running?") from None
    return decode_reply(response.data)
