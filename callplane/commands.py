"""Serve a service's commands over NATS request/reply: decode, dispatch, answer a Reply."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from faststream.nats import NatsBroker, NatsMessage

from schemas import Command, Reply, command_name, decode_command, encode_message, rpc


def invalid(exc: Exception) -> Reply:
    """A body msgspec could not decode: name the field ('... - at `$.policy.hours`')."""
    text = str(exc)
    field = text.rsplit("$.", 1)[1].rstrip("`") if "$." in text else None
    return Reply(ok=False, code="invalid", message=text, field=field, rule="schema")


def serve_commands(
    broker: NatsBroker,
    service: str,
    handle: Callable[[Any], Awaitable[Reply] | Reply],
    *,
    accepts: tuple[type[Command], ...] = (Command,),
    concurrency: int = 1,
) -> None:
    """Answer every command sent to `rpc.<service>.<command>` with `handle(command)`;
    a body that does not decode, or a command the service does not take, gets an
    `invalid` Reply (never silence, never a crash). With `concurrency` > 1, up to that many
    commands are handled at once (each still starts in arrival order): for a handler that
    awaits something slow after deciding, such as the meter's commit."""

    options = {"max_workers": concurrency} if concurrency > 1 else {}

    @broker.subscriber(rpc(service, "*"), decoder=_raw_body, **options)
    async def on_command(body: bytes) -> bytes:
        try:
            command = decode_command(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return encode_message(invalid(exc))
        if not isinstance(command, accepts):
            message = f"the {service} does not handle {command_name(type(command))}"
            return encode_message(Reply(ok=False, code="invalid", message=message, field="command", rule="known_command"))
        reply = handle(command)
        return encode_message(await reply if isinstance(reply, Awaitable) else reply)


async def _raw_body(message: NatsMessage) -> bytes:
    return message.body
