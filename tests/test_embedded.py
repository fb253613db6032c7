"""The embedded stack with real processes: nats-server and every service start, the
streams exist, and nothing is left running after exit, a failed start, or Ctrl-C."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import nats
import pytest

from callplane.embedded import NATS, SERVICES, PortInUse, Stack, StartupFailed
from schemas import STREAMS
from tests.nats_server import free_port

pytestmark = pytest.mark.e2e


def gone(pid: int) -> bool:
    """True when `pid` no longer runs (a zombie waiting to be reaped counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def port_free(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return True
    return False


async def stream_names(url: str) -> set[str]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        return {(await js.stream_info(name)).config.name for name in STREAMS}
    finally:
        await nc.drain()


def test_stack_starts_every_service_and_leaves_nothing_running(tmp_path: Path) -> None:
    with Stack(home=tmp_path, port=0, log_to_files=False) as stack:
        port, pids = stack.port, stack.pids
        assert stack.alive() == dict.fromkeys(SERVICES, True)
        stack.check()
        assert asyncio.run(stream_names(stack.url)) == {"CALLS", "NUMBERS", "ACCOUNTS", "LEDGER", "ALERTS", "DLQ"}
    assert set(pids) == {NATS, *SERVICES}
    assert all(gone(pid) for pid in pids.values())
    assert port_free(port)
    assert (tmp_path / "logs" / "nats.log").exists() and (tmp_path / "logs" / "meter.log").exists()


def test_second_stack_on_the_same_port_is_refused_and_the_first_keeps_running(tmp_path: Path) -> None:
    with Stack(home=tmp_path / "first", port=free_port(), services=()) as first:
        with pytest.raises(PortInUse, match=rf"port {first.port} is already in use.*--port"):
            Stack(home=tmp_path / "second", port=first.port, services=()).__enter__()
        first.check()
        assert asyncio.run(stream_names(first.url)) == set(STREAMS)


def test_service_dying_at_start_names_it_and_stops_everything(tmp_path: Path) -> None:
    stack = Stack(home=tmp_path, port=free_port(), services=("fraud",), env={"LOG_LEVEL": "bogus"})
    with pytest.raises(StartupFailed, match="fraud exited with code") as failure:
        stack.__enter__()
    assert "BOGUS" in failure.value.log_tail
    assert all(gone(pid) for pid in stack.pids.values())
    assert port_free(stack.port)


RUN_STACK = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from callplane.embedded import Stack

    with Stack(home=Path(sys.argv[1]), port=0) as stack:
        print(json.dumps(stack.pids), flush=True)
        time.sleep(60)
    """
)


def test_ctrl_c_to_the_parent_leaves_no_child_behind(tmp_path: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", RUN_STACK, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=Path.cwd()
    )
    try:
        pids = json.loads(parent.stdout.readline())
        assert len(pids) == 1 + len(SERVICES)
        assert not any(gone(pid) for pid in pids.values())
        parent.send_signal(signal.SIGINT)
        parent.wait(timeout=20)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
    assert all(gone(pid) for pid in pids.values())
