"""The README's run command for real: `callplane up --demo` as a user runs it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

CALLPLANE = [sys.executable, "-m", "callplane.cli"]


def children_of(pid: int) -> list[int]:
    """Every live descendant of pid, via /proc (the stack starts its children in new sessions,
    but they keep the parent pid)."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == parent and fields[0] != "Z":
                found.append(int(entry.name))
                frontier.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_the_demo_runs_for_its_duration_and_shows_decisions_and_charges(tmp_path: Path) -> None:
    run = subprocess.run(
        [*CALLPLANE, "up", "--demo", "--duration", "8", "--port", "0", "--http-port", "0", "--home", str(tmp_path / "home")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    summary = run.stdout.strip().splitlines()[-1]
    assert summary.startswith("demo summary:")
    accepted = int(re.search(r"accepted (\d+)", summary).group(1))
    charged = float(re.search(r"charged ([\d.]+) credits", summary).group(1))
    assert accepted > 0 and charged > 0
    assert re.search(r"rejected \d+ \(.*(busy|caller_blocked|unknown_number) \d+", summary), summary


def test_ctrl_c_stops_the_stack_and_leaves_no_process(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [*CALLPLANE, "up", "--demo", "--port", "0", "--http-port", "0", "--home", str(tmp_path / "home")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # as a background job gets it
    )
    try:
        for line in proc.stdout:
            if line.startswith("offered"):
                break
        started = children_of(proc.pid)
        assert len(started) >= 6, started  # nats-server and five services
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 5
        while any(alive(pid) for pid in started) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [pid for pid in started if alive(pid)] == []
        assert "every process is down" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
