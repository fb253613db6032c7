"""A real HTTP server for webhook tests: an ASGI app served by uvicorn in a thread on a
socket bound to a free local port."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import uvicorn


def bound_socket() -> socket.socket:
    """A TCP socket on 127.0.0.1 with a free port (`.getsockname()[1]`), for `serve_app`."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def serve_app(app, sock: socket.socket, **config) -> Iterator[None]:  # noqa: ANN001
    """Serve `app` on `sock` until the block ends (`config`: more uvicorn.Config options, e.g. TLS)."""
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2, **config)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()
