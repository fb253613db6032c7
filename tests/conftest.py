from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Iterator

import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from callplane import topology
from schemas import STREAMS
from tests.nats_server import any_server


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real nats-server with JetStream for the whole session."""
    with any_server(tmp_path_factory.mktemp("nats-store")) as url:
        yield url


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    client = await nats.connect(nats_url)
    yield client
    await client.drain()


@pytest.fixture
async def js(nc: Client) -> JetStreamContext:
    """JetStream with every stream, bucket and consumer freshly set up and empty."""
    context = nc.jetstream()
    await fresh_streams(context)
    return context


async def fresh_streams(js: JetStreamContext, names: Iterable[str] | None = None) -> None:
    """Delete `names` (default: every stream and bucket) and set them up again, empty.

    nats-server now and then refuses to create a stream right after deleting it ("error
    creating store for stream", err_code 10049, while the old store is still being removed):
    setup is tried again for up to 5 s."""
    for name in names if names is not None else [*STREAMS, *(f"KV_{bucket}" for bucket in topology.KV_BUCKETS)]:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(name)
    for attempt in range(50):
        try:
            await topology.setup(js)
            return
        except nats.js.errors.ServerError as exc:
            if exc.err_code != 10049 or attempt == 49:
                raise
            await asyncio.sleep(0.1)
