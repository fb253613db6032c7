"""The log line writer: one write per turn of the event loop, lines in order, none held back."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from datetime import UTC, datetime

import structlog

from callplane import logs
from callplane.logs import TurnWriter


class File:
    """A stdout stand-in that records each write and flush."""

    def __init__(self) -> None:
        self.writes: list[str] = []
        self.flushes = 0

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        self.flushes += 1


def test_outside_an_event_loop_each_line_is_written_and_flushed_at_once() -> None:
    file = File()
    writer = TurnWriter(file)
    writer.msg("one")
    assert file.writes == ["one\n"] and file.flushes == 1
    writer.msg("two")
    assert file.writes == ["one\n", "two\n"] and file.flushes == 2


def test_the_lines_of_one_turn_are_written_together_when_the_turn_ends() -> None:
    file = File()
    writer = TurnWriter(file)
    during_turn: list[list[str]] = []

    async def main() -> None:
        for i in range(3):
            writer.msg(f"first turn {i}")
        during_turn.append(list(file.writes))  # nothing written yet
        await asyncio.sleep(0)  # the turn ends: its lines go out
        during_turn.append(list(file.writes))
        writer.msg("second turn")
        await asyncio.sleep(0)

    asyncio.run(main())
    assert during_turn == [[], ["first turn 0\nfirst turn 1\nfirst turn 2\n"]]
    assert file.writes[1:] == ["second turn\n"] and file.flushes == 2


def test_lines_left_when_a_loop_stops_go_out_with_the_next_line_or_at_flush() -> None:
    file = File()
    writer = TurnWriter(file)
    loop = asyncio.new_event_loop()
    try:

        async def log_and_stop() -> None:
            writer.msg("last of the loop")
            loop.stop()

        loop.create_task(log_and_stop())
        loop.run_forever()  # stops before the turn's flush ran
    finally:
        loop.close()
    writer.msg("after the loop")  # no loop: written at once, with what was left
    assert "".join(file.writes) == "last of the loop\nafter the loop\n"


def test_lines_from_several_threads_are_written_one_write_at_a_time_in_order() -> None:
    class SlowFile(File):
        def __init__(self) -> None:
            super().__init__()
            self.writing = False
            self.overlaps = 0

        def write(self, text: str) -> int:
            if self.writing:
                self.overlaps += 1
            self.writing = True
            time.sleep(0.001)  # widen the window another thread's write could fall into
            self.writing = False
            return super().write(text)

    file = SlowFile()
    writer = TurnWriter(file)

    def log(name: str) -> None:
        for i in range(20):
            writer.msg(f"{name} {i}")

    threads = [threading.Thread(target=log, args=(f"t{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = "".join(file.writes).splitlines()
    assert file.overlaps == 0
    assert sorted(lines) == sorted(f"t{n} {i}" for n in range(4) for i in range(20))
    for n in range(4):  # each thread's lines in the order it logged them
        assert [line for line in lines if line.startswith(f"t{n} ")] == [f"t{n} {i}" for i in range(20)]


def test_a_configured_json_line_has_its_fields_and_a_utc_timestamp(monkeypatch) -> None:  # noqa: ANN001
    file = File()
    monkeypatch.setattr("sys.stdout", file)
    log = logs.configure("gatekeeper", "info", json=True)
    try:
        with structlog.contextvars.bound_contextvars(call_id="call_1"):
            log.info("call_accepted", number="+48123456789")
        [line] = "".join(file.writes).splitlines()
        fields = json.loads(line)
        assert fields["event"] == "call_accepted" and fields["call_id"] == "call_1"
        assert fields["service"] == "gatekeeper" and fields["level"] == "info"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z", fields["timestamp"])
        stamped = datetime.fromisoformat(fields["timestamp"])
        assert abs((datetime.now(UTC) - stamped).total_seconds()) < 5
    finally:
        structlog.reset_defaults()
