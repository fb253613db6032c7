"""Four of nats-py's per-message costs, cut where the consumer runtime pays them most.

Measured on the 2-core machine (nats-py 2.16.0, which pyproject pins exactly: these
functions lean on its internals and are checked against them by tests/test_natswire.py).
`publish_with_header` and `ack` each repeat the few lines of queueing a built command
rather than share a coroutine: sharing one cost ack ~0.2 us more (0.83 -> 1.03 us).

- Parsing a delivery's header block: nats-py tests every character of every header
  name with a generator (`any(c.isspace() for c in key)`), 1.7 us for the runtime's two
  headers. `install()` swaps in the same parse with one regex search per name: 0.9 us.
- Building an output's header block: `Client.publish` builds and checks it from a dict
  on every call, ~1.4 us a header. `publish_with_header` sends a block the caller built
  (the runtime: its origin line once per consumer, the Nats-Msg-Id per output).
- Acking a delivery: `Msg.ack` goes through `Client.publish` (1.5 us); `ack` writes the
  same empty message to the reply subject as one prebuilt PUB (0.3 us).
- Handing a delivery to its subscriber: nats-py parses its headers, builds a Msg, queues
  it, and a task of the subscription takes it off the queue and awaits the callback
  (5.3 us a message, parse included). `divert` lets a subscriber see the raw delivery
  first, as it is parsed: one it only acks costs 2.6 us, and one it takes gets its Msg
  at once.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.protocol.command import hpub_cmd

_CRLF = b"\r\n"
_HEADER_START = b"NATS/1.0\r\n"  # a header block's first line
_WHITESPACE = re.compile(r"\s")  # what str.isspace() is true for, as nats-py tests it
_NEWLINES = str.maketrans({"\r": " ", "\n": " "})  # what nats-py does to a header value
_SUBJECT_INVALID = re.compile(r"[ \t\r\n]")  # nats-py's check of a published subject
NATS_PY_PARSE_HEADER_LINES = Client._parse_header_lines  # before install(): what the tests compare with


def parse_header_lines(raw: bytes) -> dict[str, str]:
    """`Client._parse_header_lines`, with the same result for every input."""
    out: dict[str, str] = {}
    for line in raw.split(_CRLF):
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        try:
            key = name.strip().decode("ascii")
        except UnicodeDecodeError:
            continue
        if _WHITESPACE.search(key):
            continue
        out[key] = value.strip().decode("utf-8", "replace")
    return out


def install() -> None:
    """Parse delivered headers with `parse_header_lines` in every nats-py client."""
    Client._parse_header_lines = staticmethod(parse_header_lines)


def header_line(name: str, value: str) -> bytes:
    """One `Name: value` line, the value cleaned as nats-py cleans it."""
    return f"{name}: {value.strip().translate(_NEWLINES)}\r\n".encode()


def header_block(*lines: bytes) -> bytes:
    return _HEADER_START + b"".join(lines) + _CRLF


async def publish_with_header(nc: Client, subject: str, payload: bytes, *, reply: str, header: bytes) -> None:
    """`nc.publish(subject, payload, reply=reply, headers=...)` with the header block given
    as built by `header_block`. Whatever `publish` would refuse or treat specially (closed,
    draining, not connected, too large, a bad subject) goes through `publish` itself."""
    size = len(payload)
    if (
        nc.is_connected
        and not nc.is_draining_pubs
        and size + len(header) <= nc.max_payload
        and not _SUBJECT_INVALID.search(subject)
        and not _SUBJECT_INVALID.search(reply)
    ):
        nc.stats["out_msgs"] += 1
        nc.stats["out_bytes"] += size
        await nc._send_command(hpub_cmd(subject, reply, header, payload))
        if nc._flush_queue is not None and nc._flush_queue.empty():
            await nc._flush_pending()
        return
    headers = parse_header_lines(header[len(_HEADER_START) :])
    await nc.publish(subject, payload, reply=reply, headers=headers)


async def ack(msg: Msg) -> None:
    """`msg.ack()`: JetStream's ack, an empty message to the delivery's reply subject, with
    the same checks (not a JetStream delivery, acked already) and the same fallback as above."""
    msg._check_reply()
    nc = msg._client
    if nc.is_connected and not nc.is_draining_pubs and not _SUBJECT_INVALID.search(msg.reply):
        nc.stats["out_msgs"] += 1
        await nc._send_command(ack_command(msg.reply.encode()))
        if nc._flush_queue is not None and nc._flush_queue.empty():
            await nc._flush_pending()
        msg._ackd = True
        return
    await msg.ack()


# What `divert`'s `take(subject, reply, headers)` answers for one delivery: a command to send
# instead (its ack), a function to call with its Msg, or None for nats-py's usual way.
Verdict = bytes | Callable[[Msg], None] | None


def divert(nc: Client, sid: int, take: Callable[[bytes, bytes, bytes | None], Verdict] | None) -> None:
    """Show each delivery to subscription `sid` that has a reply subject (a JetStream
    message; statuses have none) to `take` as nats-py's parser reads it, before nats-py
    builds a Msg, queues it and wakes the subscription's task (None: stop). `take` must
    not raise (if it does, nats-py delivers the message as usual) and must not block: it
    runs inside the read loop of the connection."""
    routes: dict[int, Callable[[bytes, bytes, bytes | None], Verdict]] | None = nc.__dict__.get("_callplane_routes")
    if routes is None:
        routes = nc._callplane_routes = {}
        process = nc._process_msg

        async def _process_msg(sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
            take = routes.get(sid)
            verdict = None
            if take is not None and reply:
                try:
                    verdict = take(subject, reply, headers)
                except Exception:  # noqa: BLE001 - never into nats-py's parser: nats-py delivers it
                    verdict = None
            if verdict is None:
                await process(sid, subject, reply, data, headers)
                return
            stats = nc.stats
            stats["in_msgs"] += 1
            stats["in_bytes"] += len(data)
            if isinstance(verdict, bytes):
                stats["out_msgs"] += 1
                await nc._send_command(verdict)
                if nc._flush_queue is not None and nc._flush_queue.empty():
                    await nc._flush_pending()
            else:
                verdict(nc._build_message(sid, subject, reply, data, await nc._process_headers(headers)))

        nc._process_msg = _process_msg
    if take is None:
        routes.pop(sid, None)
    else:
        routes[sid] = take


def ack_command(reply: bytes) -> bytes:
    """JetStream's ack of the delivery with this reply subject, as `ack` sends it."""
    return b"PUB " + reply + b" 0\r\n\r\n"
