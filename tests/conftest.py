from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

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
    for name in [*STREAMS, *(f"KV_{bucket}" for bucket in topology.KV_BUCKETS)]:
        try:
            await context.delete_stream(name)
        except nats.js.errors.NotFoundError:
            pass
    await topology.setup(context)
    return context
