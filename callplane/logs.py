"""structlog setup: JSON lines on stdout (a readable console on a TTY), one per unit of work."""

from __future__ import annotations

import asyncio
import atexit
import logging
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO

import msgspec
import structlog
from structlog.contextvars import bind_contextvars, bound_contextvars, clear_contextvars

__all__ = ["bind_contextvars", "bound_contextvars", "clear_contextvars", "configure", "get_logger"]


def configure(service: str, level: str = "info", *, json: bool | None = None) -> structlog.stdlib.BoundLogger:
    """Configure structlog for a service process and return its logger.

    Every line carries `service`; handlers bind `call_id` and `event_id` per message
    with `bound_contextvars`, so one canonical line per message says what happened.
    """
    json = not sys.stdout.isatty() if json is None else json

    def add_service(_logger: object, _method: str, event_dict: dict) -> dict:
        event_dict.setdefault("service", service)
        return event_dict

    renderer = structlog.processors.JSONRenderer(_json_line) if json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_service,
            structlog.processors.add_log_level,
            _stamp_utc if json else structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=_line_writer(sys.stdout),
        cache_logger_on_first_use=True,
    )
    return structlog.get_logger()


def _stamp_utc(_logger: object, _method: str, event_dict: dict) -> dict:
    """TimeStamper(fmt="iso", utc=True) for JSON lines: msgspec renders the datetime itself
    in the same RFC 3339 form ("...T04:56:21.419169Z"), ~0.8 us cheaper than isoformat()."""
    event_dict["timestamp"] = datetime.now(UTC)
    return event_dict


def _json_line(event_dict: dict, *, default: Callable[[Any], Any] | None = None) -> str:
    """JSONRenderer's serializer: msgspec renders a line ~10x faster than json.dumps (about
    4 us of a decision's ~15 us log line in the gatekeeper, bench/README.md); values it cannot
    encode go through structlog's fallback (`default`: __structlog__, then repr)."""
    return msgspec.json.encode(event_dict, enc_hook=default).decode()


class TurnWriter:
    """structlog's logger: writes each line to `file`, and in an event loop writes and flushes
    the lines of one turn of the loop together, when the turn ends (one write instead of a
    write and a flush per line: ~1.8 us of the ~6 us a line costs, bench/README.md).

    Lines stay in order and are out within the turn that logged them; outside a running loop
    (start-up, a CLI, another thread) a line is written at once. At exit what is left is
    written; a process killed outright loses at most its last turn's lines.
    """

    def __init__(self, file: TextIO) -> None:
        self.file = file
        self._lines: list[str] = []
        self._flush_in: asyncio.AbstractEventLoop | None = None  # the loop its flush is scheduled in
        self._lock = threading.Lock()  # lines may come from threads (a worker, another loop)

    def msg(self, message: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            self._lines.append(message)
            if loop is not None and loop is self._flush_in:
                return  # this turn's flush is scheduled already
            self._flush_in = loop
        if loop is None:
            self.flush()
        else:
            loop.call_soon(self.flush)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg

    def flush(self) -> None:
        with self._lock:  # held while writing: lines from two threads never interleave or swap
            lines, self._lines = self._lines, []
            self._flush_in = None
            if lines:
                lines.append("")
                self.file.write("\n".join(lines))
                self.file.flush()


_writers: dict[int, TurnWriter] = {}


def _line_writer(file: TextIO) -> Callable[..., TurnWriter]:
    """The logger factory: one TurnWriter per file, flushed at exit."""
    writer = _writers.get(id(file))
    if writer is None or writer.file is not file:
        writer = _writers[id(file)] = TurnWriter(file)
        atexit.register(writer.flush)
    return lambda *_args: writer


def get_logger(**bound: object) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger().bind(**bound)
